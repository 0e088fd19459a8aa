"""Per-program start/end cost of the dense FA3-layout kernel: time it at 1.3B@480p's queries (32 760 rows, 12 heads,
3072 row blocks = 24 waves on 132 SMs) against growing key counts, and fit time = waves * (start/end + tiles * trip).

    cd /tmp && python /path/to/examples/dense_ws_overhead_fit.py   (an sm_90 GPU; prints the fit, writes $OUT json)

A large start/end cost per program is what a persistent form of the kernel would hide (docs/kernels-attention.md).
(The op's kernels one by one: examples/op_kernel_times.py.)
"""
from __future__ import annotations

import json
import os

import torch

from turbocompile.kernels.sage_attention import bench_meta, bench_ms_graph, sage_quantize_triton, structured_qkv
from turbocompile.kernels.sage_attention_ws import sage_attention_ws


def main() -> None:
    dev = torch.device("cuda")
    print(bench_meta(), flush=True)
    n, h = 32760, 12
    q, k, v = structured_qkv(1, h, n, 128, torch.bfloat16, dev, seed=1)
    waves = -(-(-(-n // 128) * h) // torch.cuda.get_device_properties(dev).multi_processor_count)
    rows = []
    for tiles in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        lk = 128 * tiles
        quant = sage_quantize_triton(q, k[:, :, :lk], v[:, :, :lk], 64, 128, v_order="wgmma")
        o = torch.empty_like(q)
        ms = bench_ms_graph(lambda: sage_attention_ws(quant, n, lk, o, 64, 128, split_tail=False))  # noqa: B023
        rows.append({"key_tiles": tiles, "ms": ms, "us_per_program": ms * 1000 / waves})
        print(f"{tiles:4d} key tiles: {ms:.4f} ms = {ms * 1000 / waves:.2f} us per program ({waves} waves)", flush=True)
    xs = torch.tensor([r["key_tiles"] for r in rows], dtype=torch.float64)
    ys = torch.tensor([r["us_per_program"] for r in rows], dtype=torch.float64)
    a = torch.stack([torch.ones_like(xs), xs], 1)
    for lo in (0, 3):  # all points; from 8 tiles up
        c0, c1 = torch.linalg.lstsq(a[lo:], ys[lo:, None]).solution.flatten().tolist()
        print(f"fit from {int(xs[lo])} tiles: {c0:.2f} us start/end per program + {c1:.4f} us per key tile", flush=True)
    probe = persistent_probe(q, k, v)
    with open(os.path.join(os.environ.get("OUT", "."), "dense_ws_overhead_fit.json"), "w") as f:
        json.dump({"meta": bench_meta(), "rows": rows, "persistent_probe": probe}, f, indent=1)


def persistent_probe(q, k, v) -> dict:
    """Dense attention through the persistent one-ring sparse kernel on a LUT that names every key block in order
    (both rows of an item alike: one ring entry per tile), against the dense kernel without and with its split last
    wave; the outputs compared. Whether a persistent dense kernel would pay."""
    from turbocompile.kernels.sage_attention_ws import sage_sla_ws

    n = q.shape[2]
    quant = sage_quantize_triton(q, k, v, 64, 128, v_order="wgmma")
    nq, nk = -(-n // 64), -(-n // 128)
    lut = torch.arange(nk, dtype=torch.int32, device=q.device).expand(1, q.shape[1], nq, nk).contiguous()
    o_dense, o_split, o_pers = (torch.empty_like(q) for _ in range(3))
    res = {}
    for rnd in range(2):
        res[f"dense_no_split_ms_{rnd}"] = bench_ms_graph(
            lambda: sage_attention_ws(quant, n, n, o_dense, 64, 128, split_tail=False))
        res[f"dense_split_ms_{rnd}"] = bench_ms_graph(lambda: sage_attention_ws(quant, n, n, o_split, 64, 128))
        res[f"persistent_full_lut_ms_{rnd}"] = bench_ms_graph(
            lambda: sage_sla_ws(quant, n, n, o_pers, lut, 64, 128))
    res["persistent_bit_equal_to_dense"] = bool(torch.equal(o_pers, o_dense))
    res["persistent_rel_vs_dense"] = float((o_pers.float() - o_dense.float()).norm() / o_dense.float().norm())
    print("persistent probe:", res, flush=True)
    return res


if __name__ == "__main__":
    main()
