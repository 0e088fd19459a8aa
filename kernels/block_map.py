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
H200 for 113 MB of scores (~30 µs of bandwidth). The first kernel (``TopkConfig(kernel="radix")``) does a radix
select per row: 32 rounds of "how many keys >= candidate" over the row held in registers, one bit each (0.0155 ms
at 1.3B, 0.52 ms at 14B). The default one (:func:`_topk_search_kernel`) holds a row in one warp, each lane a run
of consecutive columns (591 as 512 + 128 slots, not 1024), and searches the count directly: a first candidate where
a normal sample's T-th largest would lie, then regula falsi on count(x >= c) - T (Illinois), stopping at the first
candidate that exactly T scores reach (~5 rounds on Wan-like scores, against 32 rounds); ties at the boundary, or a
search that stalls, finish by bisection of the int32 key range. Both write the kept indices already in ascending
order through a prefix sum, so neither a sort nor a second pass is needed, and both give the same LUT.
``python -m turbocompile.kernels.block_map --bench`` times them on a GPU.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
from dataclasses import dataclass

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
           "topk_lut_reference", "topk_lut_triton", "TopkConfig", "block_scores_triton", "compare_luts", "bench_main"]

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
    (Running the two kernels a group of heads at a time, so that each group's scores stay in L2, measured slower:
    26.9 against 16.0 µs at 1.3B@480p, 263 against 218 µs at 14B@720p on an H200; removed.)
    """
    # D^-1/2 is left out: a positive scale cannot change which blocks are largest (and one pass over the scores
    # fewer is 0.06 ms at the 14B shape)
    pq, pk = pooled_q.float(), pooled_k.float()
    bufs = lut_buffers(pq, pk, topk)
    if bufs is not None:  # both Triton kernels
        return lut_into(pq, pk, *bufs)
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


def lut_buffers(pooled_q: torch.Tensor, pooled_k: torch.Tensor,
                topk: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Empty (scores, LUT) buffers for :func:`lut_into`, or None where :func:`lut_from_pooled` would not run the two
    Triton kernels (CPU, every block kept, Nk over :data:`TOPK_MAX_NK`, operands the scores kernel declines).
    Allocating them apart from the launches lets a caller allocate on one CUDA stream and launch on another."""
    nk = pooled_k.shape[-2]
    t = num_kept_blocks(topk, nk)
    if not (pooled_q.is_cuda and HAS_TRITON and _block_scores_fits(pooled_q, pooled_k) and t < nk
            and nk <= TOPK_MAX_NK):
        return None
    lead = pooled_q.shape[:-1]
    return (torch.empty(lead + (nk,), dtype=torch.float32, device=pooled_q.device),
            torch.empty(lead + (t,), dtype=torch.int32, device=pooled_q.device))


def lut_into(pooled_q: torch.Tensor, pooled_k: torch.Tensor, scores: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """:func:`lut_from_pooled`'s two Triton launches into buffers from :func:`lut_buffers`; returns ``lut``."""
    block_scores_triton(pooled_q, pooled_k, out=scores)
    return topk_lut_triton(scores, lut.shape[-1], out=lut)


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
# Top-k selection of the LUT: reference and Triton kernels
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

    # --- the search kernel: one row per program, each lane of a warp holding consecutive columns -----------------

    @triton.jit
    def _sel_cols(BASE: tl.constexpr, LANES: tl.constexpr, PER: tl.constexpr):
        """Column of each element of a [LANES, PER] chunk: lane l holds the PER consecutive columns from
        BASE + l * PER, in descending order along PER. (Descending, the compiler sees no contiguity along PER and
        keeps one lane's columns in one thread, the layout the scans want; ascending, it spreads them over threads
        for vector loads and converts layouts through shared memory.)"""
        return BASE + tl.arange(0, LANES)[:, None] * PER + (PER - 1 - tl.arange(0, PER)[None, :])

    @triton.jit
    def _sel_count(m):
        """Number of true elements of a [LANES, PER] mask (int32 scalar)."""
        return tl.sum(tl.sum(m.to(tl.int32), 1), 0)

    @triton.jit
    def _sel_ones(x, c, ASM: tl.constexpr):
        """1.0f where x >= c, else 0 (NaN: 0), as int32 bits. ASM 1: one PTX set.ge.f32 (a single FSET), where the
        plain Triton count compiles to compare + select + popcount bit tricks (~3.4 instructions per element)."""
        if ASM == 1:
            one = tl.inline_asm_elementwise("set.ge.f32.f32 $0, $1, $2;", "=f,f,f", [x, tl.broadcast_to(c, x.shape)],
                                            dtype=tl.float32, is_pure=True, pack=1)
        else:  # the same bits in plain Triton (ASM 2: the interpreter's check of the GPU path's arithmetic)
            one = tl.where(x >= c, 1.0, 0.0)
        return one.to(tl.int32, bitcast=True)

    @triton.jit
    def _sel_count_ge(xA, xB, c, HAS_B: tl.constexpr, ASM: tl.constexpr):
        """count(x >= c) over the row's chunks (NaN never counts), int32 scalar."""
        if ASM == 0:
            nA = tl.sum((xA >= c).to(tl.int32), 1)
            if HAS_B:
                nA += tl.sum((xB >= c).to(tl.int32), 1)
        else:
            # a lane's k ones (0x3F800000 = 127 * 2^23) sum to 127 k 2^23 mod 2^32 with plain integer adds: the top 9
            # bits are 127 k mod 512, and 383 = 127^-1 mod 512 (k <= PA + PB < 512)
            sA = tl.sum(_sel_ones(xA, c, ASM), 1)
            if HAS_B:
                sA += tl.sum(_sel_ones(xB, c, ASM), 1)
            nA = ((sA >> 23) * 383) & 511
        return tl.sum(nA, 0)

    @triton.jit
    def _sel_frac(a, b, ASM: tl.constexpr):
        """a / (a + b) for a, b >= 0, a + b > 0. It only steers the search, so on the GPU (ASM 1) the approximate
        reciprocal (one MUFU.RCP) replaces the division's range fix-ups."""
        s = a + b
        if ASM == 1:
            s = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [s], dtype=tl.float32, is_pure=True,
                                          pack=1)
        else:
            s = 1.0 / s
        return a * s

    @triton.jit
    def _sel_key(f):
        """fp32 -> int32 in value order under a signed compare (-0.0 -> -1, just below +0.0 -> 0; no value has -1,
        so 'key >= -1' and 'key >= 0' select the same values, as x >= -0.0 and x >= +0.0 do)."""
        b = f.to(tl.int32, bitcast=True)
        return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)

    @triton.jit
    def _sel_val(k):
        """The fp32 of key k (inverse of :func:`_sel_key`)."""
        return tl.where(k >= 0, k, k ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)

    @triton.jit
    def _sel_prefix(m):
        """Exclusive prefix count of int32 m [LANES, PER] within each lane, in column order (over the later elements
        along PER, see :func:`_sel_cols`), and each lane's total [LANES]."""
        tot = tl.sum(m, 1)
        return tot[:, None] - tl.cumsum(m, 1), tot

    @triton.jit
    def _sel_positions(mA, mB, HAS_B: tl.constexpr):
        """Exclusive prefix count of the masks over the row in column order (chunk A, then chunk B): one in-thread
        scan per chunk and one lane scan."""
        iA, tA = _sel_prefix(mA.to(tl.int32))
        if HAS_B:
            iB, tB = _sel_prefix(mB.to(tl.int32))
            packed = tA + (tB << 16)  # both chunks' lane totals (< 2^14 each) in one lane scan
            ex = tl.cumsum(packed, 0) - packed
            pA = iA + (ex & 0xFFFF)[:, None]
            pB = iB + (ex >> 16)[:, None] + tl.sum(tA, 0)
        else:
            pA = iA + (tl.cumsum(tA, 0) - tA)[:, None]
            pB = pA
        return pA, pB

    @triton.jit(do_not_specialize=["nk", "t"])  # t or Nk == 1 would become a constexpr (Triton 3.6 specializes 1)
    def _topk_search_kernel(S, OUT, nk, t, stride_s, p0, LANES: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr,
                            MASK_A: tl.constexpr, STRATEGY: tl.constexpr, MAX_INTERP: tl.constexpr,
                            ASM: tl.constexpr):
        """One row per program: the t-th largest score by a search on count(x >= c) that stops at the first c
        with exactly t scores >= c (then the kept set is x >= c); else (ties at the boundary) by bisection down
        to the t-th largest value and the lowest-indexed equal ones. The row is held as chunk A (LANES x PA
        columns) and, when PB > 0, chunk B (the next LANES x PB columns), so 591 scores take 512 + 128 slots.

        Order: x >= c on fp32 ranks NaN below everything (it never counts) and -0.0 equal to +0.0, as the radix
        kernel's keys do. The candidates are fp32 values of int32 keys (_sel_key) inside the current bracket."""
        row = tl.program_id(0).to(tl.int64)
        s_row = S + row * stride_s
        o_row = OUT + row * t
        HAS_B: tl.constexpr = PB > 0
        colA = _sel_cols(0, LANES, PA)
        if MASK_A:  # Nk < LANES * PA (else chunk A is all scores, as always when there is a chunk B)
            xA = tl.load(s_row + colA, mask=colA < nk, other=float("nan"))  # NaN padding: never counts, never ties
        else:
            xA = tl.load(s_row + colA)
        mx = tl.max(tl.max(xA, 1), 0)  # NaN-ignoring max / min
        mn = tl.min(tl.min(xA, 1), 0)
        if HAS_B:
            colB = _sel_cols(LANES * PA, LANES, PB)
            xB = tl.load(s_row + colB, mask=colB < nk, other=float("nan"))
            mx = tl.maximum(mx, tl.max(tl.max(xB, 1), 0))
            mn = tl.minimum(mn, tl.min(tl.min(xB, 1), 0))
        else:
            colB = colA
            xB = xA
        # the t-th largest key lies in [lo, hi): count(key >= lo) >= t > count(key >= hi) (lo = the minimum is
        # assumed to count t; where NaNs make it fewer, the tie path below finds out)
        num = mx == mx  # the row has a number (else all NaN: lo + 1 == hi and the tie path keeps the first t)
        lo = tl.where(num, _sel_key(mn), 0)
        hi = tl.where(num, tl.where(mx == 0.0, 0, _sel_key(mx)) + 1, 1)
        fl = tl.where(num, mn, 0.0)  # the value of lo
        done = t * 0  # 1 once a candidate counts exactly t; its value is then fl
        if STRATEGY == 1:
            # phase 1: regula falsi on count(x >= c) - t in value space (Illinois: an end kept twice has its weight
            # halved), starting at the fraction p0 of [min, max] where a normal sample's t-th largest would lie,
            # while the candidate falls strictly inside (fl, fh), for at most MAX_INTERP rounds. It only steers.
            fh = _sel_val(hi)  # the value of hi (NaN when the max is +inf: no phase 1)
            t_f = t.to(tl.float32)
            cl = nk.to(tl.float32) - t_f  # count(x >= fl) - t
            ch = t_f  # t - count(x >= fh)
            wl = t_f * 0.0 + 1.0
            wh = wl
            side = t * 0
            it = t * 0
            fc = fl + (fh - fl) * p0
            while (fc > fl) & (fc < fh) & (done == 0) & (it < MAX_INTERP):
                n = _sel_count_ge(xA, xB, fc, HAS_B, ASM)
                ge = n >= t
                done = (n == t).to(tl.int32)
                d = (n - t).to(tl.float32)
                fl = tl.where(ge, fc, fl)
                fh = tl.where(ge, fh, fc)
                cl = tl.where(ge, d, cl)
                ch = tl.where(ge, ch, -d)
                wh = tl.where(ge, tl.where(side > 0, wh * 0.5, wh), 1.0)
                wl = tl.where(ge, 1.0, tl.where(side < 0, wl * 0.5, wl))
                side = tl.where(ge, 1, -1)
                fc = fl + (fh - fl) * _sel_frac(cl * wl, ch * wh, ASM)
                it += 1
            lo = _sel_key(fl)
            hi = tl.where(fh == fh, _sel_key(fh), hi)
        # phase 2 (STRATEGY 0: the whole search): bisection of the key range, at most 32 rounds
        while (lo + 1 < hi) & (done == 0):
            c = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
            cf = _sel_val(c)
            n = _sel_count_ge(xA, xB, cf, HAS_B, ASM)
            ge = n >= t
            done = (n == t).to(tl.int32)
            lo = tl.where(ge, c, lo)
            hi = tl.where(ge, hi, c)
            fl = tl.where(ge, cf, fl)
        if done != 0:
            keepA = xA >= fl
            keepB = xB >= fl
        else:
            # lo is the t-th largest key: keep every score above it and the lowest-indexed equal ones
            thr = _sel_val(lo)
            gtA = xA > thr
            eqA = xA == thr
            gtB = xB > thr
            eqB = xB == thr
            n_gt = _sel_count(gtA)
            n_eq = _sel_count(eqA)
            if HAS_B:
                n_gt += _sel_count(gtB)
                n_eq += _sel_count(eqB)
            if n_gt + n_eq < t:  # fewer than t numbers: keep them all and the first NaNs
                gtA = xA == xA
                eqA = (xA != xA) & (colA < nk)
                gtB = xB == xB
                eqB = (xB != xB) & (colB < nk)
                n_gt = _sel_count(gtA)
                if HAS_B:
                    n_gt += _sel_count(gtB)
            need = t - n_gt
            eA, eB = _sel_positions(eqA, eqB, HAS_B)
            keepA = gtA | (eqA & (eA < need))
            keepB = gtB | (eqB & (eB < need))
        pA, pB = _sel_positions(keepA, keepB, HAS_B)
        tl.store(o_row + pA, colA, mask=keepA)
        if HAS_B:
            tl.store(o_row + pB, colB, mask=keepB)


@dataclass(frozen=True)
class TopkConfig:
    """How :func:`topk_lut_triton` selects (every option gives the same LUT).

    ``kernel="search"`` (:func:`_topk_search_kernel`): one row per program on ``warps`` warps, each lane holding
    consecutive columns; ``strategy`` "illinois" (regula falsi on the count, then bisection; ~5 rounds on normal
    scores) or "bisect" (key bisection only, ~13); ``split`` holds Nk in two power-of-two chunks (591 -> 512 + 128
    instead of 1024); ``asm`` uses one PTX ``set.ge`` per score and count (and ``rcp.approx``) on the GPU (off in
    the interpreter, where ``emulate`` runs the same integer arithmetic in plain Triton).
    ``kernel="radix"`` (:func:`_topk_lut_kernel`): the 32-round radix select, ``rows`` rows per program.
    """
    kernel: str = "search"
    warps: int = 1
    rows: int = 1
    strategy: str = "illinois"
    split: bool = True
    asm: bool = True
    emulate: bool = False
    max_interp: int = 12

    def __post_init__(self):
        if self.kernel not in ("search", "radix") or self.strategy not in ("illinois", "bisect") \
                or self.warps not in (1, 2, 4, 8) or self.rows < 1 or self.rows & (self.rows - 1):
            raise UnsupportedShapeError(f"bad top-k config {self}")


def _topk_config(nk_pad: int) -> tuple[int, int]:
    """(rows per program, warps) of the radix kernel, measured on the H200 (docs/kernels-attention.md): one row per
    program is fastest at both Wan shapes (1.3B, Nk = 256: 1 warp, 0.020 ms; 14B, Nk = 591: 4 warps, 0.52 ms
    against 0.75 ms for 4 rows x 4 warps)."""
    return 1, max(1, min(8, nk_pad // 256))


def _search_warps(nk: int) -> int:
    """Warps per row of the search kernel: one while a lane holds at most 32 scores (Nk <= 1024: fewest
    instructions per row, and no cross-warp reduction per round; ``--bench`` also times 2 and 4), then enough for
    32 per lane."""
    return max(1, min(8, triton.next_power_of_2(nk) // 1024))


#: Default selection of :func:`topk_lut_triton` (``config=None``; its warps / rows come from :func:`_search_warps` /
#: :func:`_topk_config`): ``TopkConfig(kernel="radix")`` here brings back the radix kernel.
TOPK_CONFIG = TopkConfig()


def _search_chunks(nk: int, lanes: int, split: bool) -> tuple[int, int]:
    """Per-lane columns (PA, PB) of the search kernel's two chunks: chunk A the largest power of two <= Nk (at least
    one column per lane), chunk B the next power of two covering the rest, unless one chunk of next_pow2(Nk) is as
    small."""
    pad = max(lanes, triton.next_power_of_2(nk))
    a, b = pad, 0
    if split:
        a = max(lanes, 1 << (nk.bit_length() - 1))
        b = 0 if nk <= a else max(lanes, triton.next_power_of_2(nk - a))
        if a + b >= pad:
            a, b = pad, 0
    return a // lanes, b // lanes


@functools.lru_cache(maxsize=64)
def _search_prior(nk: int, t: int) -> float:
    """Where the t-th largest of Nk normal samples falls between their expected min and max (Blom's plotting
    positions), as a fraction from the min: the search's first candidate. It only steers (fewer rounds on
    normal-like scores, 0.73 at Nk = 256, t = 25)."""
    if nk < 2:
        return 0.5
    nd = statistics.NormalDist()
    emax = nd.inv_cdf((nk - 0.375) / (nk + 0.25))
    q = nd.inv_cdf(min(max((nk - t + 0.625) / (nk + 0.25), 1e-6), 1 - 1e-6))
    return min(max((q + emax) / (2 * emax), 0.02), 0.98)


def topk_lut_triton(scores: torch.Tensor, t: int, config: TopkConfig | tuple[int, int] | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Same as :func:`topk_lut_reference` by a Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1).

    ``scores`` fp32 [..., Nk] with Nk <= :data:`TOPK_MAX_NK`, 1 <= t <= Nk; returns int32 [..., t], ascending.
    Equal scores are kept lowest column first (torch.topk does not specify which); NaN ranks below -inf (torch.topk
    ranks it above +inf), and -0.0 equals +0.0. ``config``: a :class:`TopkConfig` (default :data:`TOPK_CONFIG`),
    or (rows per program, warps) of the radix kernel; ``out`` receives the LUT.
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
    auto = config is None
    if auto:
        config = TOPK_CONFIG
    elif isinstance(config, tuple):
        config = TopkConfig(kernel="radix", rows=config[0], warps=config[1])
    if config.kernel == "radix":
        nk_pad = max(16, triton.next_power_of_2(nk))
        block_r, warps = _topk_config(nk_pad) if auto else (config.rows, config.warps)
        _topk_lut_kernel[(triton.cdiv(n_rows, block_r),)](s2, out, n_rows, nk, t, s2.stride(0), NK_PAD=nk_pad,
                                                          BLOCK_R=block_r, num_warps=warps)
        return out
    if n_rows > 2 ** 31 - 1:
        raise UnsupportedShapeError(f"topk_lut_triton takes at most 2^31 - 1 rows; got {n_rows}")
    warps = _search_warps(nk) if auto else config.warps
    pa, pb = _search_chunks(nk, 32 * warps, config.split)
    asm = 2 if config.emulate else int(config.asm and scores.is_cuda and os.environ.get("TRITON_INTERPRET") != "1")
    _topk_search_kernel[(n_rows,)](s2, out, nk, t, s2.stride(0), _search_prior(nk, t), LANES=32 * warps, PA=pa, PB=pb,
                                   MASK_A=nk < 32 * warps * pa,
                                   STRATEGY=int(config.strategy == "illinois"), MAX_INTERP=config.max_interp,
                                   ASM=asm, num_warps=warps)
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


def _bench_scores(pq: torch.Tensor, pk: torch.Tensor, t: int, sweep: bool = False) -> dict:  # pragma: no cover
    """torch.matmul vs :func:`block_scores_triton` (default config; ``sweep``: and a few tiles): GPU times (CUDA-graph
    replay), errors against float64 relative to sum |q_i k_i|, and whether the LUT selected from the Triton scores
    keeps torch's scores. Needs a GPU."""
    from .sage_attention import bench_ms_graph as bench

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
    for cfg in ((64, 64, 4), (64, 128, 4), (128, 64, 8), (128, 128, 4), (128, 128, 8)) if sweep else ():
        s_cfg = block_scores_triton(pq, pk, config=cfg)
        res["sweep"]["{}x{}x{}w".format(*cfg)] = {"ms": bench(lambda: block_scores_triton(pq, pk, config=cfg)),
                                                  "rel_err": rel(s_cfg)}
    return res


def _select_options(nk: int) -> dict:
    """The selection options ``--bench`` times: the old default (the radix kernel), the new one (``None``) and the
    search kernel's variants."""
    radix = TopkConfig(kernel="radix", rows=1, warps=_topk_config(max(16, triton.next_power_of_2(nk)))[1])
    w = _search_warps(nk)
    opts = {"radix (old default)": radix, "search (default)": None, "search no-asm": TopkConfig(asm=False, warps=w),
            "search bisect": TopkConfig(strategy="bisect", warps=w), f"search {2 * w} warps": TopkConfig(warps=2 * w)}
    if nk > 512:
        opts[f"search {4 * w} warps"] = TopkConfig(warps=4 * w)
    if _search_chunks(nk, 32 * w, True) != _search_chunks(nk, 32 * w, False):
        opts["search no-split"] = TopkConfig(split=False, warps=w)
    return opts


def bench_main(argv: list[str] | None = None) -> None:  # pragma: no cover - needs a GPU
    """Time the top-k selection options (old default: the radix kernel; new: the search kernel and its variants)
    and the LUT stage (scores + selection), the torch references beside, at the Wan shapes; check every LUT against
    torch. ``--sweep`` adds the radix kernel's rows x warps and the score kernel's tiles."""
    ap = argparse.ArgumentParser(description="SLA top-k LUT: the Triton selection kernels (radix select, search) vs "
                                             "torch.topk + sort, and the LUT stage (3xTF32 scores + selection)")
    ap.add_argument("--bench", action="store_true", help="run the benchmark (needs a CUDA GPU; ~1 min on an H200)")
    ap.add_argument("--sweep", action="store_true", help="also sweep the radix kernel's and the score kernel's tiles")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for topk_lut_bench.json")
    args = ap.parse_args(argv)
    if not args.bench:
        ap.print_help()
        return
    if not (HAS_TRITON and torch.cuda.is_available()):
        ap.error("--bench needs a CUDA GPU and triton")
    from .sage_attention import bench_meta, bench_ms_graph as bench

    dev = torch.device("cuda")
    meta = bench_meta()
    print(meta, flush=True)
    results = []
    for shape, (b, h, mq, nk, t) in BENCH_SHAPES.items():
        g = torch.Generator(device=dev).manual_seed(0)
        pq = torch.randn(b, h, mq, 128, device=dev, generator=g)
        pk = torch.randn(b, h, nk, 128, device=dev, generator=g)
        scores = block_scores_triton(pq, pk)  # as lut_from_pooled computes them
        ref = topk_lut_reference(scores, t)
        opts = _select_options(nk)
        row = {"shape": shape, "rows": b * h * mq, "nk": nk, "t": t, "torch_topk_sort_ms": bench(
            lambda: topk_lut_reference(scores, t)), "select": {}, "stage": {}, "radix_sweep": {}}
        for name, cfg in opts.items():
            lut = topk_lut_triton(scores, t, cfg, out=torch.full_like(ref, -7))
            row["select"][name] = {"config": repr(cfg), "ms": bench(lambda: topk_lut_triton(scores, t, cfg)),
                                   **compare_luts(scores, lut, ref)}
            print(f"  {shape} select {name}: {row['select'][name]}", flush=True)
        # the LUT stage: scores + selection before (radix) and now (lut_from_pooled)
        radix = opts["radix (old default)"]
        lut_new = lut_from_pooled(pq, pk, 0.1)
        stages = {"old (scores + radix)": lambda: topk_lut_triton(block_scores_triton(pq, pk), t, radix),
                  "new (lut_from_pooled)": lambda: lut_from_pooled(pq, pk, 0.1)}
        for name, fn in stages.items():
            row["stage"][name] = {"ms": bench(fn), "equal": bool(torch.equal(fn(), lut_new))}
            print(f"  {shape} stage {name}: {row['stage'][name]}", flush=True)
        row["scores"] = _bench_scores(pq, pk, t, args.sweep)
        for block_r in (1, 2, 4, 8) if args.sweep else ():
            for warps in (1, 2, 4):
                cfg = (block_r, warps)
                ok = compare_luts(scores, topk_lut_triton(scores, t, cfg, out=torch.full_like(ref, -7)), ref)
                row["radix_sweep"][f"{block_r}x{warps}w"] = {"ms": bench(lambda: topk_lut_triton(scores, t, cfg)),
                                                             "same_scores": ok["same_scores"]}
        results.append(row)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "topk_lut_bench.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(meta)
    print("GPU times by CUDA-graph replay (us); 'equal': the LUT equals torch.topk + sort's on these scores "
          "(the 3xTF32 ones lut_from_pooled selects from), output pre-filled with -7")
    for r in results:
        sel, base = r["select"], r["select"]["radix (old default)"]["ms"]
        print(f"SUMMARY {r['shape']} select ({r['rows']} rows, Nk {r['nk']}, T {r['t']}): "
              + " | ".join(f"{k} {v['ms'] * 1e3:.1f}" + ("" if k.startswith("radix") else
                                                        f" ({base / v['ms']:.2f}x)")
                           + ("" if v["equal"] else " NOT EQUAL") for k, v in sel.items())
              + f" | torch topk+sort {r['torch_topk_sort_ms'] * 1e3:.1f}")
        st, sc = r["stage"], r["scores"]
        print(f"SUMMARY {r['shape']} LUT stage (scores + select): "
              + " | ".join(f"{k} {v['ms'] * 1e3:.1f}" + ("" if v["equal"] else " NOT EQUAL") for k, v in st.items())
              + f" | scores alone: 3xTF32 {sc['triton_ms'] * 1e3:.1f}, torch {sc['torch_matmul_ms'] * 1e3:.1f}"
              + f" (err {sc['rel_err_triton']:.1e} vs {sc['rel_err_torch']:.1e})")
        if r["scores"]["sweep"]:
            print(f"{r['shape']} score tiles (BLOCK_M x BLOCK_N x warps, default {r['scores']['default_config']}): "
                  + ", ".join(f"{k} {v['ms'] * 1e3:.1f}" for k, v in r["scores"]["sweep"].items()))
        if r["radix_sweep"]:
            print(f"{r['shape']} radix sweep (rows/program x warps): " + ", ".join(
                f"{k} {v['ms'] * 1e3:.1f}{'' if v['same_scores'] else ' WRONG'}" for k, v in r["radix_sweep"].items()))
    print(f"wrote {path}")


if __name__ == "__main__":  # pragma: no cover - GPU benchmark entry point
    bench_main()
