"""Three launches of the Gluon int8-block GEMM at one Wan shape, for Nsight Compute to profile the last one.

    ncu --clock-control none -k regex:_gemm_int8_block_kernel --launch-skip 2 --launch-count 1 --set full \\
        --import-source yes -o gemm python examples/ncu_gemm_int8_block.py
    ncu -i gemm.ncu-rep --page source --print-source sass --csv > gemm.csv && python examples/ncu_stalls.py gemm.csv

(docs/measurements/ncu_gemm_int8_block_gluon_h200_stalls.txt is its output on an H200.)
"""
import torch

from turbocompile.kernels.gemm_int8_block_gluon import _random_inputs, gemm_int8_block_gluon

M, K, N = 32760, 5120, 5120

if __name__ == "__main__":
    gen = torch.Generator(device="cuda").manual_seed(0)
    a, sa, w, sw, bias = _random_inputs(M, K, N, gen, torch.device("cuda"))
    for _ in range(3):
        gemm_int8_block_gluon(a, sa, w, sw, bias)
    torch.cuda.synchronize()
