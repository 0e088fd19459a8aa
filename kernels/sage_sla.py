"""SageSLA: SLA with SageAttention's INT8 QKᵀ / FP8 P·V sparse branch, as ``torch.ops.turbocompile.sage_sla``.

``o = o_sparse + (o_l @ proj_weight.T + proj_bias)`` exactly as :mod:`.sla`, except that the block-sparse branch
uses the Sage quantization of :mod:`.sage_attention` (INT8 Q/K per block with K smoothing, FP8 P and per-channel
FP8 V, two-level fp32 accumulation). TurboDiffusion's SageSLA uses 64x128 (query x key) blocks on sm90 and 128x64
elsewhere; the block sizes are op arguments and the graph pass picks them per GPU family. The block map's blocks
and the quantization blocks are the same blocks, so the GPU path takes the pooled means for the block map straight
from the fused quantization kernel (one pass over Q and K serves both).

GPU pipeline per call: (1) one Triton pass over K and V for ``φ(K)ᵀV``, ``Σφ(K)``, the token mean of K and the
channel amax of V, and the [D, D] fold with ``proj_weight``; (2) Triton quantization of Q, K (with pooling) and V
(FP8, transposed), where on sm_90 the pass over Q also writes ``φ(q)/(φ(q)·z + 1e-5)``; (3) top-k LUT from the
pooled means, on a second CUDA stream while V is quantized (:data:`LUT_BESIDE_V`); (4) the sparse Sage attention
kernel with the linear branch in its epilogue (the Gluon kernel multiplies the quantizer's φ(q)/den by M, the
Triton kernel computes it all there). The CPU implementation is
:func:`sage_sla_reference` (same quantization emulated in PyTorch).

``python -m turbocompile.kernels.sage_sla --bench`` runs the GPU benchmark of all three attention ops.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os

import torch

from . import sage_attention_ws
from .block_map import lut_buffers, lut_from_pooled, lut_into, sla_block_map
from .lut_pairing import pair_lut_rows
from .sage_attention import (
    ATTENTION_BENCH_SHAPES,
    attention_fp32_reference,
    bench_meta,
    bench_ms,
    bench_ms_graph,
    block_attention_triton,
    quantize_v_into,
    sage_kernel_for,
    sage_quantize_triton,
    structured_qkv,
)
from .sla import (
    dispatch_cuda,
    linear_branch_reference,
    linear_branch_stats,
    sla_family_fake,
    sla_triton,
    sparse_linear_reference,
)

log = logging.getLogger(__name__)

__all__ = ["sage_sla", "sage_sla_reference", "sage_sla_triton", "bench_main"]


def sage_sla_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor,
                       proj_bias: torch.Tensor, topk: float = 0.1, blk_q: int = 64, blk_k: int = 128,
                       lut: torch.Tensor | None = None) -> torch.Tensor:
    """SageSLA in PyTorch: Sage-emulated block-sparse branch over the SLA block map plus the linear branch."""
    return sparse_linear_reference(q, k, v, proj_weight, proj_bias, topk, blk_q, blk_k, lut, sage=True)


#: Run the top-k LUT on a second CUDA stream beside V's quantizer (CUDA only; captured into graphs as a fork/join).
#: H200, A/B through the op (2026-11-27): 1.173 against 1.183 ms at 1.3B@480p, 17.88 against 17.89 at 14B@720p.
LUT_BESIDE_V = True


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One extra CUDA stream per device for the prologue's independent work."""
    return torch.cuda.Stream(device=device)


def sage_sla_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor,
                    proj_bias: torch.Tensor, topk: float = 0.1, blk_q: int = 64, blk_k: int = 128,
                    lut: torch.Tensor | None = None, config: tuple[int, int, int, int] | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """SageSLA on the GPU kernels (the Gluon attention kernel on sm_90, the Triton one elsewhere and on the CPU
    under TRITON_INTERPRET=1); ``lut`` overrides the block map."""
    lin, moments = linear_branch_stats(k, v, proj_weight, proj_bias)  # one pass over K, V: also mean(K), amax(V)
    kernel = sage_kernel_for(q, blk_q, blk_k, config)
    # on the Gluon path the pass over Q also writes φ(q)/den, which the kernel's epilogue multiplies by M
    gluon = kernel == "gluon"
    if gluon:
        from .sage_attention_gluon import uses_lin_phi
    phi = gluon and uses_lin_phi(blk_k, q.shape[-1])
    quant = sage_quantize_triton(q, k, v, blk_q, blk_k, **moments, v_order="wgmma" if gluon else "natural",
                                 linear_z=lin[1] if phi else None, v_later=True)
    bufs = lut_buffers(quant["q_pool"], quant["k_pool"], topk) if lut is None and LUT_BESIDE_V else None
    paired = gluon and sage_attention_ws.wants_paired_lut(q, blk_q, blk_k)
    if bufs is not None:
        # the LUT's two small launches (~20 µs at 1.3B@480p, latency-bound, the scores grid far from filling the
        # GPU) on a second stream beside V's quantizer (memory-bound): both need only what came before; so does
        # the pairing of its rows for the one-ring sparse kernel (4 µs)
        pair_out = torch.empty_like(bufs[-1]) if paired else None
        main, side = torch.cuda.current_stream(q.device), _side_stream(q.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):  # buffers were allocated on the main stream, which joins before freeing
            lut = lut_into(quant["q_pool"], quant["k_pool"], *bufs)
            if paired:
                lut = pair_lut_rows(lut, pair_out)
        quantize_v_into(v, quant)
        main.wait_stream(side)
    else:
        quantize_v_into(v, quant)
        if lut is None:
            lut = lut_from_pooled(quant["q_pool"], quant["k_pool"], topk)
        if paired and lut.dtype == torch.int32 and lut.dim() == 4:
            lut = pair_lut_rows(lut)
    return block_attention_triton(q, k, v, lut, blk_q, blk_k, sage=True, linear=lin, quant=quant, config=config,
                                  out=out)


@torch.library.custom_op("turbocompile::sage_sla", mutates_args=())
def _sage_sla_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor,
                 proj_bias: torch.Tensor, topk: float = 0.1, blk_q: int = 64, blk_k: int = 128) -> torch.Tensor:
    return sage_sla_reference(q, k, v, proj_weight, proj_bias, topk, blk_q, blk_k)


@_sage_sla_op.register_kernel("cuda")
def _sage_sla_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor,
                   proj_bias: torch.Tensor, topk: float = 0.1, blk_q: int = 64, blk_k: int = 128) -> torch.Tensor:
    return dispatch_cuda("sage_sla", sage_sla_triton, sage_sla_reference, q, k, v, proj_weight, proj_bias, topk,
                         blk_q, blk_k)


_sage_sla_op.register_fake(sla_family_fake)


def sage_sla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor,
             topk: float = 0.1, blk_q: int = 64, blk_k: int = 128) -> torch.Tensor:
    """SageSLA of (B, H, L, D) tensors. Same as ``torch.ops.turbocompile.sage_sla``."""
    return torch.ops.turbocompile.sage_sla(q, k, v, proj_weight, proj_bias, topk, blk_q, blk_k)


# ----------------------------------------------------------------------------------------------------------------
# GPU benchmark (not a test): python -m turbocompile.kernels.sage_sla --bench
# ----------------------------------------------------------------------------------------------------------------
def _rel(x: torch.Tensor, ref: torch.Tensor) -> dict:
    x, ref = x.float().flatten(), ref.float().flatten()
    return {
        "cos": float(torch.nn.functional.cosine_similarity(x, ref, dim=0)),
        "rel_l1": float((x - ref).abs().sum() / ref.abs().sum()),
        "rel_l2": float((x - ref).norm() / ref.norm()),
        "nan": bool(torch.isnan(x).any()),
    }


def _sparse_rows_reference(q, k, v, lut, rows, blk_q, blk_k):
    """Exact fp32 block-sparse attention for some query rows (mask built from each row's LUT entry)."""
    lk = k.shape[2]
    nk = -(-lk // blk_k)
    sel = lut[:, :, rows // blk_q].long()  # [B, H, R, T]
    blk_mask = torch.zeros(sel.shape[:3] + (nk,), dtype=torch.bool, device=q.device).scatter_(-1, sel, True)
    key_mask = blk_mask.repeat_interleave(blk_k, dim=-1)[..., :lk]
    s = torch.matmul(q[:, :, rows].float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~key_mask, float("-inf"))
    return torch.matmul(torch.softmax(s, -1), v.float())


def bench_main(only: str | None = None, argv: list[str] | None = None) -> None:  # pragma: no cover - needs a GPU
    """Check the kernels at the Wan shapes and time them against cuDNN/FLASH SDPA and FlexAttention."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--shapes", default="1.3B@480p,14B@720p")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sweep", action="store_true", help="also time several kernel configs")
    ap.add_argument("--quick", action="store_true", help="skip the odd-length checks")
    ap.add_argument("--kernels", default="gluon,triton",
                    help="Sage kernels to time and check: gluon (Hopper only) and/or triton")
    ap.add_argument("--only", choices=["sage_attention", "sage_sla", "sla"], help="time one op family")
    ap.add_argument("--no-flex", action="store_true", help="skip the FlexAttention baseline (slow to compile)")
    ap.add_argument("--topk", default="0.05,0.1,0.15", help="top-k fractions to time")
    ap.add_argument("--profile", action="store_true",
                    help="also print the GPU kernels of 20 sage_sla calls (torch.profiler), largest first")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="time every row, baselines included, as the replay of a CUDA graph of the call (how a "
                         "built engine runs it: no launch gaps between an op's kernels)")
    args = ap.parse_args(argv)
    only = args.only or only
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dev = torch.device("cuda")
    cc = torch.cuda.get_device_capability(dev)
    blk_sla = (64, 128) if cc[0] == 9 else (128, 64)
    meta = {**bench_meta(), "cc": list(cc), "sla_blocks": list(blk_sla),
            "timing": "CUDA graph replay" if args.cuda_graph else "triton.testing.do_bench"}
    log.info("%s", meta)
    results: list[dict] = []
    rows_out: list[tuple] = []

    def record(shape, name, ms, flops, err=None, extra=None):
        tf = flops / (ms * 1e-3) / 1e12
        r = {"shape": shape, "name": name, "ms": ms, "tflops_eff": tf, **(err or {}), **(extra or {})}
        results.append(r)
        rows_out.append((shape, name, f"{ms:.3f}", f"{tf:.0f}", f"{r.get('cos', float('nan')):.5f}",
                         f"{r.get('rel_l1', float('nan')):.4f}"))
        log.debug("%s", r)
        print(f"{shape:10} {name:52} {ms:9.3f} ms {tf:7.0f} TF/s  cos {r.get('cos', float('nan')):.5f}"
              f"  relL1 {r.get('rel_l1', float('nan')):.4f}  own_relL2 {r.get('own_rel_l2', float('nan')):.4f}",
              flush=True)

    # 1. correctness at odd lengths, one head, all three kernels, poisoned outputs (NaN = unwritten)
    if not args.quick:
        for n in (1, 7, 129, 4097, 80000):
            q, k, v = structured_qkv(1, 1, n, 128, torch.bfloat16, dev, seed=n)
            w = torch.randn(128, 128, device=dev) * 0.05
            bias = torch.randn(128, device=dev) * 0.05
            o_sl = sla_triton(q, k, v, w, bias, 0.1, *blk_sla, out=torch.full_like(q, float("nan")))
            rows = torch.randperm(n, device=dev)[:256]
            ref = attention_fp32_reference(q, k, v, rows)
            lut = sla_block_map(q, k, 0.1, *blk_sla)
            ref_s = _sparse_rows_reference(q, k, v, lut, rows, *blk_sla) + linear_branch_reference(
                q[:, :, rows], k, v, w, bias)
            for kern in args.kernels.split(","):
                with sage_kernel_env(kern):
                    o_sa = block_attention_triton(q, k, v, None, 128, 64, sage=True,
                                                  out=torch.full_like(q, float("nan")))
                    o_ss = sage_sla_triton(q, k, v, w, bias, 0.1, *blk_sla, out=torch.full_like(q, float("nan")))
                chk = {"L": n, "kernel": kern, "sage_attention": _rel(o_sa[:, :, rows], ref),
                       "sage_sla_vs_sparse_fp32": _rel(o_ss[:, :, rows], ref_s),
                       "sla_vs_sparse_fp32": _rel(o_sl[:, :, rows], ref_s),
                       "any_nan": bool(torch.isnan(o_sa).any() or torch.isnan(o_ss).any() or torch.isnan(o_sl).any())}
                if n <= 4097:  # the Sage-emulating reference of the same block map, whole tensor
                    chk["sage_sla_vs_own_ref"] = _rel(o_ss, sage_sla_reference(
                        q, k, v, w, bias, 0.1, *blk_sla, lut=lut_from_pooled(*_pools(q, k, blk_sla), 0.1)))
                log.info("check %s", chk)
                results.append({"check": chk})
            del q, k, v

    # 2. speed at the Wan shapes
    for shape in args.shapes.split(","):
        try:
            _bench_shape(shape, ATTENTION_BENCH_SHAPES[shape], only, args, blk_sla,
                         bench_ms_graph if args.cuda_graph else bench_ms, record)
        except Exception:  # noqa: BLE001 - report and go on to the next shape
            log.exception("shape %s failed", shape)
        torch.cuda.empty_cache()

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "attention_bench.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"\n{meta}")
    print(f"{'shape':10} {'name':44} {'ms':>9} {'TF/s eff':>9} {'cos':>8} {'relL1':>7}")
    for r in rows_out:
        print(f"{r[0]:10} {r[1]:44} {r[2]:>9} {r[3]:>9} {r[4]:>8} {r[5]:>7}")


def _bench_shape(shape, dims, only, args, blk_sla, bench, record):  # pragma: no cover - needs a GPU
    """Time every variant at one Wan shape (see :func:`bench_main`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda")
    if True:
        b, h, n, d = dims
        q, k, v = structured_qkv(b, h, n, d, torch.bfloat16, dev, seed=1)
        w = torch.randn(d, d, device=dev) * 0.05
        bias = torch.randn(d, device=dev) * 0.05
        dense_flops = 4.0 * b * h * n * n * d
        rows = torch.randperm(n, device=dev)[:192].sort().values
        ref = attention_fp32_reference(q, k, v, rows)

        def err(o):
            return _rel(o[:, :, rows], ref)

        for backend, label in ((SDPBackend.CUDNN_ATTENTION, "sdpa_cudnn"), (SDPBackend.FLASH_ATTENTION, "sdpa_flash")):
            with sdpa_kernel(backend):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
                o = fn()
                record(shape, label, bench(fn), dense_flops, err(o))
        kernels = args.kernels.split(",")
        if only in (None, "sage_attention"):
            for kern in kernels:
                with sage_kernel_env(kern):
                    for blks in ((128, 64), (64, 128)):
                        fn = lambda: torch.ops.turbocompile.sage_attention(q, k, v, *blks)  # noqa: E731
                        o = fn()
                        record(shape, f"sage_attention {blks[0]}x{blks[1]} [{kern}]", bench(fn), dense_flops, err(o))
            if args.sweep:
                for blks, cfg in (((64, 128), (128, 128, 8, 3)),):
                    try:
                        fn = lambda: block_attention_triton(q, k, v, None, *blks, sage=True, config=cfg)  # noqa: E731
                        o = fn()
                        record(shape, f"sage_attention {blks[0]}x{blks[1]} cfg{cfg}", bench(fn), dense_flops, err(o))
                    except Exception as exc:  # noqa: BLE001 - a config that fails to compile is reported, not fatal
                        log.info("config %s %s failed: %s", blks, cfg, exc)
        if only in (None, "sage_sla", "sla"):
            for topk in [float(t) for t in args.topk.split(",")]:
                t_kept = max(1, int(topk * -(-n // blk_sla[1])))
                lut = sla_block_map(q, k, topk, *blk_sla)
                sub = rows[:96]
                ref_s = _sparse_rows_reference(q, k, v, lut, sub, *blk_sla) + linear_branch_reference(
                    q[:, :, sub], k, v, w, bias)
                extra = {"topk": topk, "T": t_kept, "density": t_kept / -(-n // blk_sla[1])}
                for kern in kernels if only in (None, "sage_sla") else ():
                    with sage_kernel_env(kern):
                        fn = lambda: torch.ops.turbocompile.sage_sla(q, k, v, w, bias, topk, *blk_sla)  # noqa: E731
                        o = fn()
                        e = {**err(o), **{f"own_{kk}": vv for kk, vv in _rel(o[:, :, sub], ref_s).items()}}
                        record(shape, f"sage_sla top{topk} (all stages) [{kern}]", bench(fn), dense_flops, e, extra)
                        if args.profile and topk == 0.1:
                            _profile(fn, f"{shape} sage_sla top{topk} [{kern}]")
                if only in (None, "sla"):
                    fn = lambda: torch.ops.turbocompile.sla(q, k, v, w, bias, topk, *blk_sla)  # noqa: E731
                    o = fn()
                    e = {**err(o), **{f"own_{kk}": vv for kk, vv in _rel(o[:, :, sub], ref_s).items()}}
                    record(shape, f"sla bf16 top{topk} (all stages)", bench(fn), dense_flops, e, extra)
            # stage breakdown of sage_sla at topk 0.1 and FlexAttention block-sparse baseline
            topk = 0.1
            lin, moments = linear_branch_stats(k, v, w, bias)
            quant = sage_quantize_triton(q, k, v, *blk_sla, **moments)
            lut = lut_from_pooled(quant["q_pool"], quant["k_pool"], topk)
            record(shape, "  stage: linear stats + K mean, V amax", bench(lambda: linear_branch_stats(k, v, w, bias)),
                   dense_flops)
            record(shape, "  stage: quantize+pool Q, K, V",
                   bench(lambda: sage_quantize_triton(q, k, v, *blk_sla, **moments)), dense_flops)
            record(shape, "  (alt: K mean + V amax in torch)",
                   bench(lambda: (k.mean(dim=2, dtype=torch.float32), torch.aminmax(v, dim=2))), dense_flops)
            record(shape, "  stage: top-k LUT", bench(lambda: lut_from_pooled(quant["q_pool"], quant["k_pool"], topk)),
                   dense_flops)

            from . import sla as sla_mod

            if args.sweep:  # (the statistics' configs are swept by `python -m turbocompile.kernels.sla --prologue`)
                def torch_stats():
                    phi = torch.softmax(k, dim=-1)
                    return torch.matmul(phi.transpose(-1, -2), v), phi.sum(2, dtype=torch.float32)

                record(shape, "  (linear stats in torch, bf16 φ)", bench(torch_stats), dense_flops)
                _compile_report(sla_mod._linear_stats_kernel, "linear_stats")
            fn = lambda: block_attention_triton(q, k, v, lut, *blk_sla, sage=True, linear=lin, quant=quant)  # noqa
            record(shape, "  stage: sparse kernel+lin epilogue [triton]", bench(fn), dense_flops)
            if "gluon" in kernels:
                quant_g = sage_quantize_triton(q, k, v, *blk_sla, **moments, v_order="wgmma", linear_z=lin[1])
                record(shape, "  stage: quantize+pool Q (+φ/den), K, V (wgmma V order)",
                       bench(lambda: sage_quantize_triton(q, k, v, *blk_sla, **moments, v_order="wgmma",
                                                          linear_z=lin[1])), dense_flops)
                fn = lambda: block_attention_triton(q, k, v, lut, *blk_sla, sage=True, linear=lin,  # noqa: E731
                                                    quant=quant_g)
                o = fn()
                record(shape, "  stage: sparse kernel+lin epilogue [gluon]", bench(fn), dense_flops, err(o))
                # (the Gluon kernel's variants are swept by ``python -m turbocompile.kernels.sage_attention_gluon``)
                from .sage_attention_gluon import _sage_attn_fwd_gluon

                _compile_report(_sage_attn_fwd_gluon, "sage_attn_fwd_gluon")
            from .sage_attention import _attn_fwd_kernel

            _compile_report(_attn_fwd_kernel, "attn_fwd")
            if args.sweep:
                for cfg in ((64, 64, 4, 2), (64, 128, 4, 2), (64, 128, 8, 3), (64, 128, 8, 2)):
                    try:
                        fn = lambda: block_attention_triton(q, k, v, lut, *blk_sla, sage=True, linear=lin,  # noqa
                                                            quant=quant, config=cfg)
                        o = fn()
                        record(shape, f"  sparse kernel cfg{cfg}", bench(fn), dense_flops, err(o))
                    except Exception as exc:  # noqa: BLE001
                        log.info("config %s failed: %s", cfg, exc)
                lut_b = sla_block_map(q, k, topk, *blk_sla)
                for cfg in ((64, 128, 4, 2),):
                    try:
                        fn = lambda: block_attention_triton(q, k, v, lut_b, *blk_sla, sage=False, linear=lin,  # noqa
                                                            config=cfg)
                        o = fn()
                        record(shape, f"  sla bf16 kernel cfg{cfg}", bench(fn), dense_flops, err(o))
                    except Exception as exc:  # noqa: BLE001
                        log.info("config %s failed: %s", cfg, exc)
            try:
                if args.no_flex:
                    raise RuntimeError("skipped (--no-flex)")
                from torch.nn.attention.flex_attention import BlockMask, flex_attention

                flex = torch.compile(flex_attention, dynamic=False)
                lut_f = sla_block_map(q, k, topk, 128, 128)
                nkb = -(-n // 128)
                kv_idx = torch.zeros((b, h, lut_f.shape[2], nkb), dtype=torch.int32, device=dev)
                kv_idx[..., : lut_f.shape[-1]] = lut_f
                kv_num = torch.full((b, h, lut_f.shape[2]), lut_f.shape[-1], dtype=torch.int32, device=dev)
                bm = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=128, seq_lengths=(n, n))
                fn = lambda: flex(q, k, v, block_mask=bm)  # noqa: E731
                o = fn()
                record(shape, "flex bf16 top0.1 128x128 (kernel only)", bench(fn), dense_flops, err(o),
                       {"T": lut_f.shape[-1]})
            except Exception as exc:  # noqa: BLE001 - the baseline is optional
                log.info("flex attention baseline failed: %s", exc)
        del q, k, v



class sage_kernel_env:  # pragma: no cover - bench helper
    """``with sage_kernel_env("triton"):`` makes the ops pick that Sage kernel (through TURBOCOMPILE_SAGE_KERNEL)."""

    def __init__(self, kernel: str):
        if kernel not in ("gluon", "triton"):
            raise ValueError(f"unknown Sage kernel {kernel!r}: gluon or triton")
        self.value = "auto" if kernel == "gluon" else "triton"

    def __enter__(self):
        self.keep = os.environ.get("TURBOCOMPILE_SAGE_KERNEL")
        os.environ["TURBOCOMPILE_SAGE_KERNEL"] = self.value

    def __exit__(self, *exc):
        if self.keep is None:
            os.environ.pop("TURBOCOMPILE_SAGE_KERNEL", None)
        else:
            os.environ["TURBOCOMPILE_SAGE_KERNEL"] = self.keep


def _compile_report(kernel, name: str) -> None:  # pragma: no cover - bench helper
    """Registers, spills and the MMA instructions of every compiled variant of a Triton kernel (no device time)."""
    try:
        for dev_cache in kernel.device_caches.values():
            for key, ck in dev_cache[0].items():
                ptx = ck.asm.get("ptx", "")
                log.info("compiled %s: regs %s spills %s wgmma %d mma.sync %d shared %s", name, ck.n_regs,
                         ck.n_spills, ptx.count("wgmma.mma_async"), ptx.count("mma.sync"), ck.metadata.shared)
    except Exception as exc:  # noqa: BLE001 - Triton internals differ between versions
        log.info("compile report for %s unavailable: %s", name, exc)


def _profile(fn, title: str, calls: int = 20) -> None:  # pragma: no cover - bench helper
    """Print each GPU kernel's time per call over ``calls`` calls of ``fn`` (where the op's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / calls / 1e3, e.count // calls) for e in prof.key_averages()
            if e.device_time_total > 0]
    print(f"-- {title}: GPU time per call by kernel (ms, launches per call)", flush=True)
    for key, ms, cnt in sorted(rows, key=lambda r: -r[1]):
        print(f"   {ms:8.4f} ms  x{cnt:<3} {key[:100]}", flush=True)
    print(f"   {sum(r[1] for r in rows):8.4f} ms  total GPU time per call", flush=True)


def _pools(q, k, blk):  # pragma: no cover - bench helper
    from .block_map import block_mean

    return block_mean(q, blk[0]), block_mean(k, blk[1]) - k.mean(dim=2, keepdim=True, dtype=torch.float32)


if __name__ == "__main__":  # pragma: no cover
    bench_main()
