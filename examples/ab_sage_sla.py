"""A/B of the attention ops in one process: the code of a named earlier state against today's defaults.

Across device calls the same kernel moves by 1-2% (a fresh machine each time), more than the changes it is meant to
judge, so both states are timed here, alternating, as CUDA-graph replays, next to cuDNN SDPA bf16.

    python examples/ab_sage_sla.py [--shapes 1.3B@480p,14B@720p] [--rounds 5]

"before" = the 2026-11-27 04:55 UTC state (sparse programs load their tile starts and K scales inside the loop;
the one-pass int8 quantizer for Q); "after" = the module defaults.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch


def main() -> None:
    from turbocompile.kernels import load_ops
    from turbocompile.kernels import sage_attention as sa
    from turbocompile.kernels import sage_attention_gluon as G
    from turbocompile.kernels.sage_attention import ATTENTION_BENCH_SHAPES, bench_meta, bench_ms_graph, structured_qkv
    from turbocompile.kernels.sage_attention import sage_attention
    from turbocompile.kernels.sage_sla import sage_sla

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1.3B@480p,14B@720p")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    load_ops()
    after = (G.PRELOAD_SPARSE, dict(sa.QUANT_CONFIGS))
    before = (False, {**sa.QUANT_CONFIGS, (64, True): (4, 1, 8, True)})

    def use(state):
        G.PRELOAD_SPARSE = state[0]
        sa.QUANT_CONFIGS.clear()
        sa.QUANT_CONFIGS.update(state[1])

    meta = bench_meta()
    print(meta, flush=True)
    rows = []
    for shape in args.shapes.split(","):
        b, h, n, d = ATTENTION_BENCH_SHAPES[shape]
        q, k, v = structured_qkv(b, h, n, d, torch.bfloat16, torch.device("cuda"), seed=1)
        w, bias = torch.randn(d, d, device="cuda") * 0.05, torch.randn(d, device="cuda") * 0.05
        ops = {"cudnn": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
               "sage_sla": lambda: sage_sla(q, k, v, w, bias, 0.1, 64, 128),
               "sage_attention": lambda: sage_attention(q, k, v, 64, 128)}
        times: dict[str, list[float]] = {}
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            for _ in range(args.rounds):
                times.setdefault("cudnn", []).append(bench_ms_graph(ops["cudnn"]))
                for name in ("sage_sla", "sage_attention"):
                    for tag, state in (("before", before), ("after", after)):
                        use(state)
                        times.setdefault(f"{name} {tag}", []).append(bench_ms_graph(ops[name]))
        use(after)
        med = {key: statistics.median(v) for key, v in times.items()}
        for key, ms in med.items():
            ratio = med["cudnn"] / ms
            rows.append({"shape": shape, "what": key, "ms": ms, "x_cudnn": ratio, "all_ms": times[key]})
            print(f"{shape:10} {key:24} {ms:8.3f} ms  {ratio:6.2f}x cuDNN  (rounds: "
                  + " ".join(f"{t:.3f}" for t in times[key]) + ")", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
