"""SLA block map: which key blocks each query block attends to exactly.

Shared by ``sage_sla`` and ``sla``. Per (batch, head): mean-pool Q over ``blk_q``-token blocks and the
smoothed K (K minus its token mean) over ``blk_k``-token blocks, score ``pooled_q · pooled_kᵀ · D^-½`` and keep
the ``T = max(1, min(Nk, int(topk * Nk)))`` best key blocks per query block. The result is an int32 LUT
``[B, H, Mq, T]`` of absolute key-block indices, sorted ascending (ascending order is what the kernels walk, and
it keeps the K/V loads of neighbouring programs close together in L2).

Why no softmax over the key blocks: softmax, the positive scale and the smoothing shift are all monotone per
row (the shift subtracts ``pooled_q · mean(K)`` from the whole row), so the kept set is the same without them;
the shift is kept (it comes free with the smoothed K the Sage path quantizes anyway), the scale and the softmax
are skipped.

A partial last block pools only its valid tokens, so padding never moves a score. On the GPU the Sage path gets the
pooled means from its fused quantization kernel and only calls :func:`lut_from_pooled` here, whose scores come from
:func:`block_scores_triton` (3xTF32 tensor-core GEMM, fp32-accurate) and whose selection step runs as the Triton
kernel below (:func:`topk_lut_triton`) instead of ``torch.topk`` + ``torch.sort``.

Why a kernel: at 14B@720p (47 280 rows of 591 scores, 59 kept) ``torch.topk`` + ``torch.sort`` took 2.14 ms on an
H200 for 113 MB of scores (~30 µs of bandwidth). The kernel does a radix select per row (32 rounds of
"how many keys >= candidate" over the row held in registers) and writes the kept indices already in ascending
order with a cumsum, so neither a sort nor a second pass is needed. ``python -m turbocompile.kernels.block_map
--bench`` times both on a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch

from turbocompile.errors import InputError, UnsupportedShapeError

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    triton = None
    tl = None
    HAS_TRITON = False


__all__ = ["num_kept_blocks", "block_mean", "lut_from_pooled", "sla_block_map", "check_block_size",
           "topk_lut_reference", "topk_lut_triton", "block_scores_triton", "compare_luts", "bench_main"]

#: Longest score row the selection kernel holds in registers (padded to a power of two); longer rows use torch.
TOPK_MAX_NK = 8192


def check_block_size(name: str, blk: int) -> None:
    """Block sizes are powers of two between 16 and 256 (what the kernels tile by)."""
    if not isinstance(blk, int) or blk < 16 or blk > 256 or blk & (blk - 1):
        raise UnsupportedShapeError(f"{name}={blk} is not supported; use a power of two from 16 to 256 (64 or 128)")


def num_kept_blocks(topk: float, nk: int) -> int:
    """Key blocks kept per query block: ``int(topk * nk)`` clamped to [1, nk] (never 0, unlike the public SLA code)."""
    if not (0.0 < topk <= 1.0) or math.isnan(topk):
        raise InputError(f"topk={topk} is not a fraction of key blocks; pass a value in (0, 1], e.g. 0.1")
    return max(1, min(nk, int(topk * nk)))


def block_mean(x: torch.Tensor, blk: int) -> torch.Tensor:
    """Mean of ``x`` [B, H, L, D] over ``blk``-token blocks, fp32 [B, H, ceil(L/blk), D]; the tail block averages its valid tokens."""
    b, h, n, d = x.shape
    nb = -(-n // blk)
    full = n // blk
    out = torch.empty((b, h, nb, d), dtype=torch.float32, device=x.device)
    if full:
        body = x[:, :, : full * blk].reshape(b, h, full, blk, d)
        out[:, :, :full] = body.sum(dim=3, dtype=torch.float32) / blk
    if full < nb:
        out[:, :, full] = x[:, :, full * blk:].sum(dim=2, dtype=torch.float32) / (n - full * blk)
    return out


def lut_from_pooled(pooled_q: torch.Tensor, pooled_k: torch.Tensor, topk: float) -> torch.Tensor:
    """Top-k key blocks per query block from pooled (smoothed) Q and K [B, H, M, D]; int32 [B, H, Mq, T], ascending.

    On CUDA the fp32 scores come from :func:`block_scores_triton` (fp32-accurate; the LUT may differ from torch's only
    among scores equal within fp32 rounding) and the selection from :func:`topk_lut_triton`; elsewhere both are torch.
    """
    # D^-1/2 is left out: a positive scale cannot change which blocks are largest (and one pass over the scores
    # fewer is 0.06 ms at the 14B shape)
    pq, pk = pooled_q.float(), pooled_k.float()
    if pq.is_cuda and HAS_TRITON and _block_scores_fits(pq, pk):
        scores = block_scores_triton(pq, pk)
    else:
        scores = torch.matmul(pq, pk.transpose(-1, -2))
    nk = scores.shape[-1]
    t = num_kept_blocks(topk, nk)
    if t == nk:
        idx = torch.arange(t, device=scores.device, dtype=torch.int32)
        return idx.expand(scores.shape[:-1] + (t,)).contiguous()
    if scores.is_cuda and HAS_TRITON and nk <= TOPK_MAX_NK:
        return topk_lut_triton(scores, t)
    return topk_lut_reference(scores, t)


def sla_block_map(q: torch.Tensor, k: torch.Tensor, topk: float = 0.1, blk_q: int = 64, blk_k: int = 128) -> torch.Tensor:
    """SLA block map of q [B, H, Lq, D] and k [B, H, Lk, D]: int32 LUT [B, H, ceil(Lq/blk_q), T] of kept key blocks."""
    check_block_size("blk_q", blk_q)
    check_block_size("blk_k", blk_k)
    if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise UnsupportedShapeError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must both be (B, H, L, D) with the same B, H and D")
    k_mean = k.mean(dim=2, keepdim=True, dtype=torch.float32)
    pooled_q = block_mean(q, blk_q)
    pooled_k = block_mean(k, blk_k) - k_mean  # mean of (k - k_mean) over a block == block mean - k_mean
    return lut_from_pooled(pooled_q, pooled_k, topk)


# ----------------------------------------------------------------------------------------------------------------
# Top-k selection of the LUT: reference and Triton kernel
# ----------------------------------------------------------------------------------------------------------------
def topk_lut_reference(scores: torch.Tensor, t: int) -> torch.Tensor:
    """Indices of the ``t`` largest scores of each row of ``scores`` [..., Nk], int32 [..., t], ascending (torch)."""
    idx = torch.topk(scores, t, dim=-1, sorted=False).indices
    return torch.sort(idx, dim=-1).values.to(torch.int32).contiguous()


if HAS_TRITON:

    @triton.jit
    def _topk_lut_kernel(S, OUT, n_rows, nk, t, stride_s, NK_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
        """BLOCK_R rows per program: radix-select the t-th largest key, then write the kept columns in order."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, NK_PAD)
        row_ok = rows < n_rows
        valid = row_ok[:, None] & (cols[None, :] < nk)
        x = tl.load(S + rows.to(tl.int64)[:, None] * stride_s + cols[None, :], mask=valid, other=0.0)
        # order-preserving int32 key of the fp32 bits (signed compare): positives keep their bits, negatives flip
        # the magnitude bits; -0 and +0 both map to 0; NaN and padding map to INT32_MIN (below -inf)
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        key = tl.where(x == 0.0, 0, key)
        key = tl.where(valid & (x == x), key, -2147483648)
        # thr = the largest int32 with count(key >= thr) >= t, i.e. the t-th largest key, built bit by bit from the
        # sign down (within one sign, setting a lower bit raises a two's-complement value)
        thr = tl.where(tl.sum((key >= 0).to(tl.int32), 1) >= t, 0, -2147483648)
        for b in tl.static_range(30, -1, -1):
            cand = thr | (1 << b)
            thr = tl.where(tl.sum((key >= cand[:, None]).to(tl.int32), 1) >= t, cand, thr)
        # keep every key > thr and the first (t - count(key > thr)) keys == thr in column order: exactly t per row
        gt = key > thr[:, None]
        eq = (key == thr[:, None]) & valid
        need = t - tl.sum(gt.to(tl.int32), 1)
        eq_i = eq.to(tl.int32)
        keep = gt | (eq & ((tl.cumsum(eq_i, 1) - eq_i) < need[:, None]))
        keep_i = keep.to(tl.int32)
        pos = tl.cumsum(keep_i, 1) - keep_i  # exclusive: slot of each kept column, ascending by column
        tl.store(OUT + rows.to(tl.int64)[:, None] * t + pos, tl.broadcast_to(cols[None, :], (BLOCK_R, NK_PAD)),
                 mask=keep)


def _topk_config(nk_pad: int) -> tuple[int, int]:
    """(rows per program, warps), measured on the H200 (docs/kernels-attention.md): one row per program is fastest
    at both Wan shapes (1.3B, Nk = 256: 1 warp, 0.020 ms; 14B, Nk = 591: 4 warps, 0.52 ms against 0.75 ms for
    4 rows x 4 warps)."""
    return 1, max(1, min(8, nk_pad // 256))


def topk_lut_triton(scores: torch.Tensor, t: int, config: tuple[int, int] | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Same as :func:`topk_lut_reference` by a Triton radix select (CUDA, or CPU under TRITON_INTERPRET=1).

    ``scores`` fp32 [..., Nk] with Nk <= :data:`TOPK_MAX_NK`, 1 <= t <= Nk; returns int32 [..., t], ascending.
    Equal scores are kept lowest column first (torch.topk does not specify which); NaN ranks below -inf (torch.topk
    ranks it above +inf), and -0.0 equals +0.0. ``config`` = (rows per program, warps); ``out`` receives the LUT.
    """
    if not HAS_TRITON:
        raise UnsupportedShapeError("topk_lut_triton needs triton; use topk_lut_reference")
    nk = scores.shape[-1]
    if scores.dtype != torch.float32 or not 1 <= t <= nk or nk > TOPK_MAX_NK:
        raise UnsupportedShapeError(
            f"topk_lut_triton takes fp32 scores with 1 <= t <= Nk <= {TOPK_MAX_NK}; got {scores.dtype}, t={t}, Nk={nk}")
    s2 = scores.reshape(-1, nk)
    if s2.stride(-1) != 1:
        s2 = s2.contiguous()
    n_rows = s2.shape[0]
    if out is None:
        out = torch.empty(scores.shape[:-1] + (t,), dtype=torch.int32, device=scores.device)
    elif out.shape != scores.shape[:-1] + (t,) or out.dtype != torch.int32 or not out.is_contiguous():
        raise UnsupportedShapeError(f"out must be a contiguous int32 {tuple(scores.shape[:-1]) + (t,)} tensor")
    if n_rows == 0:
        return out
    nk_pad = max(16, triton.next_power_of_2(nk))
    block_r, warps = config or _topk_config(nk_pad)
    _topk_lut_kernel[(triton.cdiv(n_rows, block_r),)](s2, out, n_rows, nk, t, s2.stride(0), NK_PAD=nk_pad,
                                                      BLOCK_R=block_r, num_warps=warps)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Block scores pooled_q · pooled_kᵀ on the tensor cores (3xTF32)
# ----------------------------------------------------------------------------------------------------------------
#: Largest head dim :func:`block_scores_triton` takes (the whole D is one dot per tile).
SCORES_MAX_D = 128

if HAS_TRITON:

    @triton.jit
    def _block_scores_kernel(Q, K, OUT, n_heads, mq, nk, sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d,
                             HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr):
        """One BLOCK_M x BLOCK_N tile of Q·Kᵀ of one (b, h): the whole D in one 3xTF32 dot (fp32-accurate)."""
        bh = tl.program_id(2)
        b = (bh // n_heads).to(tl.int64)
        h = (bh % n_heads).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        dd = tl.arange(0, D_PAD)
        d_ok = dd < HEAD_DIM
        q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_m + dd[None, :] * sq_d,
                    mask=(rows[:, None] < mq) & d_ok[None, :], other=0.0)
        k = tl.load(K + b * sk_b + h * sk_h + cols[:, None] * sk_n + dd[None, :] * sk_d,
                    mask=(cols[:, None] < nk) & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="tf32x3")
        tl.store(OUT + bh.to(tl.int64) * mq * nk + rows[:, None] * nk + cols[None, :], s,
                 mask=(rows[:, None] < mq) & (cols[None, :] < nk))


def _block_scores_fits(pooled_q: torch.Tensor, pooled_k: torch.Tensor) -> bool:
    """Whether :func:`block_scores_triton` takes these (fp32) operands: same [B, H] and D <= 128, grid in range."""
    return (pooled_q.ndim == 4 and pooled_k.ndim == 4 and pooled_q.shape[:2] == pooled_k.shape[:2]
            and pooled_q.shape[-1] == pooled_k.shape[-1] and 1 <= pooled_q.shape[-1] <= SCORES_MAX_D
            and pooled_q.dtype == pooled_k.dtype == torch.float32 and pooled_q.device == pooled_k.device
            and pooled_q.shape[0] * pooled_q.shape[1] <= 65535)


#: (BLOCK_M, BLOCK_N, warps) of :func:`block_scores_triton`, measured on the H200 (CUDA-graph replay, D = 128):
#: 128 x 128 x 8 warps took 9.7 µs at 1.3B (64 x 64 x 4: 9.6) and 143 µs at 14B (64 x 64 x 4: 151; cuBLAS 14.0 and
#: 213 µs). A 1-pass TF32 dot took 6.3 / 93 µs, so the three passes of 3xTF32 are most of the time.
SCORES_CONFIG: tuple[int, int, int] = (128, 128, 8)


def block_scores_triton(pooled_q: torch.Tensor, pooled_k: torch.Tensor, out: torch.Tensor | None = None,
                        config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``pooled_q @ pooled_kᵀ`` of fp32 [B, H, Mq, D] and [B, H, Nk, D] (any strides, D <= 128) as contiguous fp32
    [B, H, Mq, Nk], by 3xTF32 tensor-core dots (error ~1e-7 relative, like fp32 FMA in another order).

    Why: at 1.3B (12 x 512 x 256, D = 128) cuBLAS picked an fp32 FFMA sgemm that took 15 µs on an H200, as long as
    the whole top-k selection after it. CUDA, or CPU under TRITON_INTERPRET=1; ``out`` receives the scores,
    ``config`` = (BLOCK_M, BLOCK_N, warps).
    """
    if not HAS_TRITON:
        raise UnsupportedShapeError("block_scores_triton needs triton; use torch.matmul")
    if not _block_scores_fits(pooled_q, pooled_k):
        raise UnsupportedShapeError(
            f"block_scores_triton takes fp32 [B, H, M, D] operands with the same B, H, D, D <= {SCORES_MAX_D} and "
            f"B*H <= 65535 on one device; got {tuple(pooled_q.shape)} {pooled_q.dtype} and "
            f"{tuple(pooled_k.shape)} {pooled_k.dtype}")
    b, h, mq, d = pooled_q.shape
    nk = pooled_k.shape[2]
    shape = (b, h, mq, nk)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=pooled_q.device)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise UnsupportedShapeError(f"out must be a contiguous fp32 {shape} tensor")
    if out.numel() == 0:
        return out
    block_m, block_n, warps = config or SCORES_CONFIG
    grid = (triton.cdiv(mq, block_m), triton.cdiv(nk, block_n), b * h)
    _block_scores_kernel[grid](pooled_q, pooled_k, out, h, mq, nk, *pooled_q.stride(), *pooled_k.stride(),
                               HEAD_DIM=d, D_PAD=max(16, triton.next_power_of_2(d)), BLOCK_M=block_m,
                               BLOCK_N=block_n, num_warps=warps)
    return out


# ----------------------------------------------------------------------------------------------------------------
# GPU benchmark: python -m turbocompile.kernels.block_map --bench [--out DIR]
# ----------------------------------------------------------------------------------------------------------------
#: (B, H, Mq, Nk, T) of the LUT at the Wan shapes (blk_q 64, blk_k 128, top-k 0.1).
BENCH_SHAPES = {"1.3B@480p": (1, 12, 512, 256, 25), "14B@720p": (1, 40, 1182, 591, 59)}


def compare_luts(scores: torch.Tensor, lut: torch.Tensor, ref: torch.Tensor) -> dict:
    """``equal``: identical LUTs; ``rows_differ``; ``same_scores``: every row keeps the same multiset of scores, so any
    difference is only which of equal scores was kept (torch.topk's choice among ties is unspecified)."""
    kept = lambda idx: torch.sort(scores.gather(-1, idx.long()), dim=-1).values  # noqa: E731
    return {"equal": bool(torch.equal(lut, ref)), "rows_differ": int((lut != ref).any(-1).sum()),
            "same_scores": bool(torch.equal(kept(lut), kept(ref)))}


def _bench_scores(pq: torch.Tensor, pk: torch.Tensor, t: int) -> dict:  # pragma: no cover - needs a GPU
    """torch.matmul vs :func:`block_scores_triton` (default config and a few tiles): GPU times (CUDA-graph replay;
    ``eager_*`` with the host's launch cost), errors against float64 relative to sum |q_i k_i|, and whether the LUT
    selected from the Triton scores keeps torch's scores."""
    from .sage_attention import bench_ms as eager, bench_ms_graph as bench

    s_torch = torch.matmul(pq, pk.transpose(-1, -2))
    s_tri = block_scores_triton(pq, pk, out=torch.full_like(s_torch, float("nan")))
    ref = torch.matmul(pq.double(), pk.double().transpose(-1, -2))
    scale = torch.matmul(pq.double().abs(), pk.double().abs().transpose(-1, -2))
    rel = lambda s: float(((s.double() - ref).abs() / scale).max())  # noqa: E731
    lut_torch = topk_lut_triton(s_torch, t)
    res = {"torch_matmul_ms": bench(lambda: torch.matmul(pq, pk.transpose(-1, -2))),
           "triton_ms": bench(lambda: block_scores_triton(pq, pk)), "default_config": list(SCORES_CONFIG),
           "nan": bool(torch.isnan(s_tri).any()),
           "max_rel_diff": float(((s_tri.double() - s_torch.double()).abs() / scale).max()),
           "rel_err_triton": rel(s_tri), "rel_err_torch": rel(s_torch),
           "lut": compare_luts(s_torch, topk_lut_triton(s_tri, t), lut_torch), "sweep": {}}
    res["speedup"] = res["torch_matmul_ms"] / res["triton_ms"]
    res["eager_torch_matmul_ms"] = eager(lambda: torch.matmul(pq, pk.transpose(-1, -2)))
    res["eager_triton_ms"] = eager(lambda: block_scores_triton(pq, pk))
    # the whole LUT stage before (torch scores) and now (lut_from_pooled)
    res["stage_torch_scores_ms"] = bench(lambda: topk_lut_triton(torch.matmul(pq, pk.transpose(-1, -2)), t))
    res["stage_ms"] = bench(lambda: lut_from_pooled(pq, pk, 0.1))
    for cfg in ((64, 64, 4), (64, 128, 4), (128, 64, 8), (128, 128, 4), (128, 128, 8)):
        s_cfg = block_scores_triton(pq, pk, config=cfg)
        res["sweep"]["{}x{}x{}w".format(*cfg)] = {"ms": bench(lambda: block_scores_triton(pq, pk, config=cfg)),
                                                  "rel_err": rel(s_cfg)}
    return res


def bench_main(argv: list[str] | None = None) -> None:  # pragma: no cover - needs a GPU
    """Time torch.topk + torch.sort against the Triton selection, and the torch fp32 score matmul against
    :func:`block_scores_triton`, at the Wan shapes; check the LUTs agree."""
    ap = argparse.ArgumentParser(description="SLA top-k LUT: torch.topk + sort vs the Triton radix select, "
                                             "torch fp32 matmul vs the 3xTF32 score kernel")
    ap.add_argument("--bench", action="store_true", help="run the benchmark (needs a CUDA GPU)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for topk_lut_bench.json")
    args = ap.parse_args(argv)
    if not args.bench:
        ap.print_help()
        return
    if not (HAS_TRITON and torch.cuda.is_available()):
        ap.error("--bench needs a CUDA GPU and triton")
    from .sage_attention import bench_meta, bench_ms as bench

    dev = torch.device("cuda")
    meta = bench_meta()
    results = []
    for shape, (b, h, mq, nk, t) in BENCH_SHAPES.items():
        g = torch.Generator(device=dev).manual_seed(0)
        pq = torch.randn(b, h, mq, 128, device=dev, generator=g)
        pk = torch.randn(b, h, nk, 128, device=dev, generator=g)
        scores = torch.matmul(pq, pk.transpose(-1, -2)) * 128 ** -0.5  # as lut_from_pooled computes them
        ref = topk_lut_reference(scores, t)
        row = {"shape": shape, "rows": b * h * mq, "nk": nk, "t": t,
               "default_config": list(_topk_config(max(16, triton.next_power_of_2(nk)))),
               "torch_topk_sort_ms": bench(lambda: topk_lut_reference(scores, t)),
               "scores_matmul_ms": bench(lambda: torch.matmul(pq, pk.transpose(-1, -2)) * 128 ** -0.5),
               "triton_ms": bench(lambda: topk_lut_triton(scores, t)),
               **compare_luts(scores, topk_lut_triton(scores, t, out=torch.full_like(ref, -7)), ref), "sweep": {}}
        row["speedup"] = row["torch_topk_sort_ms"] / row["triton_ms"]
        row["lut_from_pooled_ms"] = bench(lambda: lut_from_pooled(pq, pk, 0.1))  # the whole stage (scores + select)
        row["scores"] = _bench_scores(pq, pk, t)
        print(shape, {k: v for k, v in row.items() if k != "sweep"}, flush=True)
        for block_r in (1, 2, 4, 8):
            for warps in (1, 2, 4):
                cfg = (block_r, warps)
                ok = compare_luts(scores, topk_lut_triton(scores, t, cfg, out=torch.full_like(ref, -7)), ref)
                row["sweep"][f"{block_r}x{warps}w"] = {"ms": bench(lambda: topk_lut_triton(scores, t, cfg)),
                                                       "same_scores": ok["same_scores"]}
                print(f"  {shape} {block_r} rows x {warps} warps: {row['sweep'][f'{block_r}x{warps}w']}", flush=True)
        results.append(row)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "topk_lut_bench.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(meta)
    print(f"{'shape':10} {'rows':>6} {'Nk':>4} {'T':>3} {'matmul ms':>9} {'topk+sort ms':>12} {'triton ms':>9} "
          f"{'speedup':>7} {'equal':>5} {'rows differ':>11} {'same scores':>11}")
    for r in results:
        print(f"{r['shape']:10} {r['rows']:>6} {r['nk']:>4} {r['t']:>3} {r['scores_matmul_ms']:>9.4f} "
              f"{r['torch_topk_sort_ms']:>12.4f} {r['triton_ms']:>9.4f} {r['speedup']:>6.1f}x {str(r['equal']):>5} "
              f"{r['rows_differ']:>11} {str(r['same_scores']):>11}")
    print("scores, CUDA-graph replay (eager in brackets); errors vs float64 relative to sum |q_i k_i|; LUT from "
          "the 3xTF32 scores vs from torch's; LUT stage = scores + selection")
    print(f"{'shape':10} {'torch ms':>16} {'3xTF32 ms':>16} {'speedup':>7} {'max rel diff':>12} {'err 3xTF32':>10} "
          f"{'err torch':>9} {'rows differ':>11} {'same scores':>11} {'NaN':>4} {'LUT stage ms torch -> now':>25}")
    for r in results:
        sc = r["scores"]
        print(f"{r['shape']:10} {sc['torch_matmul_ms']:>7.4f} ({sc['eager_torch_matmul_ms']:.4f}) "
              f"{sc['triton_ms']:>7.4f} ({sc['eager_triton_ms']:.4f}) {sc['speedup']:>6.2f}x "
              f"{sc['max_rel_diff']:>12.2e} {sc['rel_err_triton']:>10.2e} {sc['rel_err_torch']:>9.2e} "
              f"{sc['lut']['rows_differ']:>11} {str(sc['lut']['same_scores']):>11} {str(sc['nan']):>4} "
              f"{sc['stage_torch_scores_ms']:>15.4f} -> {sc['stage_ms']:.4f}")
        print(f"{r['shape']} score tiles (BLOCK_M x BLOCK_N x warps, default {sc['default_config']}): "
              + ", ".join(f"{k} {v['ms']:.4f} (err {v['rel_err']:.1e})" for k, v in sc["sweep"].items()))
    for r in results:
        best = min(r["sweep"].items(), key=lambda kv: kv[1]["ms"])
        print(f"{r['shape']} sweep (rows/program x warps, default {r['default_config']}): "
              + ", ".join(f"{k} {v['ms']:.4f}{'' if v['same_scores'] else ' WRONG'}" for k, v in r["sweep"].items())
              + f"; best {best[0]}")
    print(f"wrote {path}")


if __name__ == "__main__":  # pragma: no cover - GPU benchmark entry point
    bench_main()
