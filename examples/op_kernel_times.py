"""Each GPU kernel of one attention-op call, by the PyTorch profiler: where an op's time goes, prologue included.

    cd /tmp && python /path/to/examples/op_kernel_times.py [--ops sage_attention,sage_sla] [--shapes 1.3B@480p]

Prints, per op and shape, the GPU time of each kernel per call (mean of 5 calls, by kernel name) and the sum; writes
``$OUT/op_kernel_times.json``. Eager calls (no CUDA graph), so the sum is GPU time without launch gaps.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from turbocompile.kernels.sage_attention import ATTENTION_BENCH_SHAPES, bench_meta, structured_qkv


def op_kernels(fn, calls: int = 5) -> list[tuple[str, int, float]]:
    """(kernel name, launches per call, µs per call) of the GPU kernels ``fn()`` launches, averaged over ``calls``
    calls, in order of first launch. Totals per name, because kernels on two CUDA streams (``sage_sla``'s LUT beside
    V's quantizer) need not start in the same order from call to call."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA], acc_events=True) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            totals.setdefault(e.name, []).append(e.device_time)
    return [(name, len(ts) // calls, sum(ts) / calls) for name, ts in totals.items()]


def main() -> None:
    from turbocompile.kernels.sage_attention import sage_attention
    from turbocompile.kernels.sage_sla import sage_sla

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", default="sage_attention,sage_sla")
    ap.add_argument("--shapes", default="1.3B@480p,14B@720p")
    args = ap.parse_args()
    meta = bench_meta()
    print(meta, flush=True)
    out = {"meta": meta, "ops": {}}
    for shape in args.shapes.split(","):
        b, h, n, d = ATTENTION_BENCH_SHAPES[shape]
        q, k, v = structured_qkv(b, h, n, d, torch.bfloat16, torch.device("cuda"), seed=1)
        w, bias = torch.randn(d, d, device="cuda") * 0.05, torch.randn(d, device="cuda") * 0.05
        fns = {"sage_attention": lambda: sage_attention(q, k, v, 64, 128),  # noqa: B023
               "sage_sla": lambda: sage_sla(q, k, v, w, bias, 0.1, 64, 128)}  # noqa: B023
        for op in args.ops.split(","):
            rows = op_kernels(fns[op])
            print(f"{op} {shape}: {sum(t for *_, t in rows):.1f} us of GPU time per call", flush=True)
            for name, n_launch, t in rows:
                print(f"  {name[:64]:64s} x{n_launch} {t:9.1f} us", flush=True)
            out["ops"][f"{op} {shape}"] = rows
        del q, k, v
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "op_kernel_times.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
