"""Drive the dense attention kernels for Nsight Compute: today's Gluon kernel three times, then the FA3-layout
kernel (``sage_attention_ws``) three times, on the 1.3B@480p shape (L = 32 760, 12 heads, D 128).

Usage (on the GPU machine; pipe utilisation, issue and stall statistics of one launch of each):

    ncu --clock-control none -k 'regex:_sage_attn_fwd_gluon|_sage_attn_ws_kernel' --launch-skip 2 --launch-count 2 \\
        --section ComputeWorkloadAnalysis --section SchedulerStats --section WarpStateStats \\
        --metrics 'regex:^sm__inst_executed_pipe_.*\\.avg\\.pct_of_peak_sustained_active$' \\
        python examples/ncu_dense_attention.py
"""
from __future__ import annotations

import torch

from turbocompile.kernels.sage_attention import sage_quantize_triton, structured_qkv
from turbocompile.kernels.sage_attention_gluon import sage_attention_gluon
from turbocompile.kernels.sage_attention_ws import sage_attention_ws


def main() -> None:
    n = 32760
    q, k, v = structured_qkv(1, 12, n, 128, torch.bfloat16, torch.device("cuda"), seed=1)
    quant = sage_quantize_triton(q, k, v, 64, 128, v_order="wgmma")
    out = torch.empty_like(q)
    for _ in range(3):
        sage_attention_gluon(quant, n, n, out, None, 64, 128)
    for _ in range(3):
        sage_attention_ws(quant, n, n, out, 64, 128)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
