"""A/B of the attention ops (and optionally the fp8-row linear) in one process: earlier states against today's defaults.

Across device calls the same kernel moves by 1-2% (a fresh machine each time), more than the changes it is meant to
judge, so the states are timed here, alternating, as CUDA-graph replays, next to cuDNN SDPA / cuBLAS bf16.

    python examples/ab_sage_sla.py [--shapes 1.3B@480p,14B@720p] [--rounds 5] [--state NAME:knob=value,...]
        [--linear] [--cross] [--out FILE.json]

States: "gluon" = the attention kernels of before 2026-11-27 17:00 UTC (``sage_attention_gluon`` for dense and
block-sparse calls); "17:25" = the FA3-layout ping-pong of that time (``PIPELINE`` 2, 3 stages, no split last wave,
the float row maximum, PyTorch's K/V moments); "now" = today's defaults (dense calls through the FA3-layout kernel,
``sage_attention_ws.DENSE_OPS``; block-sparse calls through its one-ring kernel on a paired LUT, ``SPARSE_OPS``,
since the 2026-11-27 20:16 session; per-thread partial row sums, ``sage_attention_gluon.L_PARTIAL``, since 23:00);
"22:00" = "now" without the partial row sums; "19:15" = "22:00" with block-sparse calls on the Gluon kernel;
``--state NAME:knob=value,...`` adds states over "now" (the knobs are listed by ``--help``). (The 22:58 and 22:59
UTC runs of 2026-11-27, docs/measurements/ab_partial_rowsums_h200_225*.json, compared "22:00" and "now". The 20:42
UTC run, docs/measurements/ab_shared_ring_h200_2042.json, compared "19:15" and "now" with ``--only``. The
18:14-19:05 UTC runs of
2026-11-27, docs/measurements/ab_*_h200_18*.json and ab_split_tail_h200_1905.json, compared the int32 row maximum,
the peeled loop, the fused K/V moments, the exponentials on the FMA pipe and the split last wave. The 17:05 and
17:10 UTC runs, docs/measurements/ab_sparse_ws_h200_17*.json, had ``SPARSE_OPS`` on in "now": the FA3-layout sparse
kernel, 4-5% slower. The 17:00 UTC run compared the dense kernels only. The 14:56 and 15:03 UTC runs compared
"one stream",
``sage_sla``'s prologue launched in order on one CUDA stream, against the top-k LUT on a second stream beside V's
quantizer, ``sage_sla.LUT_BESIDE_V``, now the default. The 15:03 UTC run,
docs/measurements/ab_m_side_h200_1503.json, also had the statistics' M on the side stream: no gain, removed. The
07:45 UTC run compared "06:53", the top-k LUT by the 32-round radix select, against the interpolation search of
``block_map._topk_search_kernel``. The 05:58-06:26 UTC runs in docs/measurements compared against "04:55": sparse
programs loading their tile starts and K scales inside the loop, the one-pass int8 quantizer for Q.) ``--linear``
also times the fp8-row W8A8 linear (activation quantization + GEMM) against cuBLAS bf16 at the twelve Wan shapes
and prints the geomean. ``--cross`` times the cross-attention choice of the ``attention_to_sagesla`` pass (option
``cross``): ``sage_attention`` against the SDPA backends at the video length of each shape against Wan's 512 text
tokens.

(The 14:30 and 14:45 UTC H200 runs, docs/measurements/ab_fused_quant_h200_1430.json and
ab_fold_ksum_h200_1445.json, compared one-launch sage_sla prologues and Σ K by a wgmma in the statistics pass: no
gain or slower, removed; commits ad6627a-d684fb5 have them. The 14:50 UTC run, ab_l_mma_h200_1450.json, the softmax
row sums by a wgmma: slower, removed. The 09:10 and 09:21 UTC H200 runs, docs/measurements/ab_early_loads_h200_*.json,
compared "08:36" against a state whose attention kernel loaded V's scales and the linear bias at its start: no
gain, removed. The 06:26 UTC H100 run in docs/measurements/ab_pdl_h100_0626.* had a third state, programmatic
dependent launch between the kernels, since removed: it was slower. Its "no-pdl" rows are today's code.)
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import statistics

import torch

LINEAR_SHAPES = [(m, k, n) for m in (32760, 75600)
                 for k, n in ((1536, 1536), (1536, 8960), (8960, 1536), (5120, 5120), (5120, 13824), (13824, 5120))]


def main() -> None:
    from turbocompile.kernels import load_ops
    from turbocompile.kernels import sage_attention as sa
    from turbocompile.kernels import sage_attention_gluon as G
    from turbocompile.kernels import sage_attention_ws as WS
    from turbocompile.kernels.sage_attention import ATTENTION_BENCH_SHAPES, bench_meta, bench_ms_graph, structured_qkv
    from turbocompile.kernels.sage_attention import sage_attention
    from turbocompile.kernels.sage_sla import sage_sla

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1.3B@480p,14B@720p", help="attention shapes ('' for none)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--linear", action="store_true", help="also the fp8-row linear against cuBLAS bf16")
    ap.add_argument("--cross", action="store_true", help="also cross-attention (512 keys): sage_attention vs SDPA")
    ap.add_argument("--state", action="append", default=[],
                    help="an extra state NAME:knob=value,... over today's defaults (knobs: preload, topk, "
                         "lut_beside_v, dense_ws, sparse_ws, pipeline, stages, split_tail, int_max, fused_moments, "
                         "l_partial)")
    ap.add_argument("--only", default="", help="comma-separated states to time (default: all)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from turbocompile.kernels import block_map as bm

    load_ops()
    from turbocompile.kernels import sage_sla as sla_mod

    knobs = {"preload": (G, "PRELOAD_SPARSE"), "topk": (bm, "TOPK_CONFIG"), "lut_beside_v": (sla_mod, "LUT_BESIDE_V"),
             "dense_ws": (WS, "DENSE_OPS"), "sparse_ws": (WS, "SPARSE_OPS"), "pipeline": (WS, "PIPELINE"),
             "stages": (WS, "NUM_STAGES"), "split_tail": (WS, "SPLIT_TAIL"), "int_max": (G, "INT_MAX"),
             "fused_moments": (sa, "FUSED_MOMENTS"), "l_partial": (G, "L_PARTIAL")}
    now = {name: getattr(mod, attr) for name, (mod, attr) in knobs.items()}
    states = {"gluon": {**now, "dense_ws": False, "sparse_ws": False, "int_max": False, "fused_moments": False,
                        "l_partial": False},
              "17:25": {**now, "pipeline": 2, "stages": 3, "split_tail": False, "int_max": False,
                        "fused_moments": False, "sparse_ws": False, "l_partial": False},
              "19:15": {**now, "sparse_ws": False, "l_partial": False}, "22:00": {**now, "l_partial": False},
              "now": now}
    for spec in args.state:  # NAME:knob=value,knob=value (values are Python literals)
        name, _, assigns = spec.partition(":")
        states[name] = {**now, **{k: ast.literal_eval(v) for k, v in (a.split("=") for a in assigns.split(","))}}
    if args.only:
        states = {name: states[name] for name in args.only.split(",")}

    def use(state):
        for name, (mod, attr) in knobs.items():
            setattr(mod, attr, state[name])

    def report(shape, times, base, rows):
        med = {key: statistics.median(v) for key, v in times.items()}
        for key, ms in med.items():
            ratio = med[base] / ms
            rows.append({"shape": shape, "what": key, "ms": ms, "x_baseline": ratio, "all_ms": times[key]})
            print(f"{shape:22} {key:24} {ms:8.3f} ms  {ratio:6.3f}x {base}  (rounds: "
                  + " ".join(f"{t:.3f}" for t in times[key]) + ")", flush=True)
        return med

    meta = bench_meta()
    print(meta, flush=True)
    rows: list[dict] = []
    for shape in filter(None, args.shapes.split(",")):
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
                    for tag, state in states.items():
                        use(state)
                        times.setdefault(f"{name} {tag}", []).append(bench_ms_graph(ops[name]))
        use(states["now"])
        report(shape, times, "cudnn", rows)
        del q, k, v
        torch.cuda.empty_cache()

    if args.cross:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for shape in ATTENTION_BENCH_SHAPES:
            b, h, n, d = ATTENTION_BENCH_SHAPES[shape]
            g = torch.Generator(device="cuda").manual_seed(n)
            q = torch.randn(b, h, n, d, device="cuda", generator=g, dtype=torch.bfloat16)
            k, v = (torch.randn(b, h, 512, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
            ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
            times = {}
            for _ in range(args.rounds):
                times.setdefault("sdpa default dispatch", []).append(bench_ms_graph(
                    lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)))  # noqa: B023
                for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                    with sdpa_kernel(backend):
                        times.setdefault(name, []).append(bench_ms_graph(
                            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)))  # noqa: B023
                times.setdefault("sage_attention 64x128", []).append(
                    bench_ms_graph(lambda: sage_attention(q, k, v, 64, 128)))  # noqa: B023
            o = sage_attention(q, k, v, 64, 128).float()
            print(f"cross {shape}: sage_attention rel L2 vs fp32 {float((o - ref).norm() / ref.norm()):.2e}")
            report(f"cross {shape} (Lk 512)", times, "cudnn", rows)
            del q, k, v, ref, o
            torch.cuda.empty_cache()

    if args.linear:
        from turbocompile.kernels.linear_w8a8 import cuda_linear, quantize_weight

        speed: list[float] = []
        for m, k, n in LINEAR_SHAPES:
            g = torch.Generator(device="cuda").manual_seed(m + k + n)
            x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
            wt = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * k ** -0.5
            bl = torch.randn(n, device="cuda", generator=g, dtype=torch.bfloat16)
            wq = quantize_weight(wt, "fp8-row")
            times = {}
            for _ in range(args.rounds):
                times.setdefault("cublas bf16", []).append(
                    bench_ms_graph(lambda: torch.nn.functional.linear(x, wt, bl)))  # noqa: B023
                times.setdefault("fp8-row", []).append(bench_ms_graph(
                    lambda: cuda_linear(x, wq["w_q"], wq["w_scale"], bl, "fp8-row")))  # noqa: B023
            med = report(f"linear {m}x{k}x{n}", times, "cublas bf16", rows)
            speed.append(med["cublas bf16"] / med["fp8-row"])
            del x, wt, wq
        geo = math.exp(sum(math.log(r) for r in speed) / len(speed))
        rows.append({"shape": "linear geomean", "what": "fp8-row", "x_baseline": geo})
        print(f"fp8-row: geomean {geo:.3f}x cuBLAS bf16 over {len(speed)} shapes", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
