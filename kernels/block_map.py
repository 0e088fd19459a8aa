"""SLA block map: which key blocks each query block attends to exactly.

Shared by ``sage_sla`` and ``sla``. Per (batch, head): mean-pool Q over ``blk_q``-token blocks and the
smoothed K (K minus its token mean) over ``blk_k``-token blocks, score ``pooled_q · pooled_kᵀ · D^-½`` and keep
the ``T = max(1, min(Nk, int(topk * Nk)))`` best key blocks per query block. The result is an int32 LUT
``[B, H, Mq, T]`` of absolute key-block indices, sorted ascending (ascending order is what the kernels walk, and
it keeps the K/V loads of neighbouring programs close together in L2).

Why no softmax over the key blocks: softmax, the positive scale and the smoothing shift are all monotone per
row (the shift subtracts ``pooled_q · mean(K)`` from the whole row), so the kept set is the same without them;
the scale and the shift are kept so the scores equal the published definition, the softmax is skipped.

A partial last block pools only its valid tokens, so padding never moves a score. This module is plain PyTorch:
on the GPU the Sage path gets the pooled means from its fused quantization kernel and only calls
:func:`lut_from_pooled` here.
"""
from __future__ import annotations

import math
import os

import torch

from turbocompile.errors import InputError, UnsupportedShapeError

try:  # the GPU top-k; without Triton the LUT comes from torch.topk
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

__all__ = ["num_kept_blocks", "block_mean", "lut_from_pooled", "sla_block_map", "check_block_size"]


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


if HAS_TRITON:

    @triton.jit
    def _topk_lut_kernel(S, LUT, NROWS, NK, T, ROWS: tl.constexpr, NKP: tl.constexpr):
        """Rows of block scores -> their T best column indices, ascending. One bitonic sort of (score, index) keys
        packed in int64 (score order first, lower index first on ties), a second sort of the kept indices."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, NKP)
        ok = (rows < NROWS)[:, None] & (cols < NK)[None, :]
        s = tl.load(S + rows[:, None].to(tl.int64) * NK + cols[None, :], mask=ok, other=float("-inf"))
        bits = s.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int32 with the order of the floats
        packed = (key.to(tl.int64) << 32) | (NKP - 1 - cols)[None, :].to(tl.int64)
        packed = tl.sort(packed, dim=1, descending=True)
        idx = (NKP - 1 - (packed & 0xFFFFFFFF)).to(tl.int32)
        idx = tl.where(cols[None, :] < T, idx, NKP + cols[None, :])  # past T: large and distinct, sorts last
        idx = tl.sort(idx, dim=1)
        tl.store(LUT + rows[:, None].to(tl.int64) * T + cols[None, :], idx,
                 mask=(rows < NROWS)[:, None] & (cols < T)[None, :])


def _topk_lut_triton(scores: torch.Tensor, t: int) -> torch.Tensor:
    nk = scores.shape[-1]
    nkp = max(16, triton.next_power_of_2(nk))
    rows_per = max(1, min(16, 4096 // nkp))
    flat = scores.reshape(-1, nk).contiguous()
    lut = torch.empty(scores.shape[:-1] + (t,), dtype=torch.int32, device=scores.device)
    _topk_lut_kernel[(triton.cdiv(flat.shape[0], rows_per),)](flat, lut, flat.shape[0], nk, t, ROWS=rows_per,
                                                                NKP=nkp, num_warps=4)
    return lut


def lut_from_pooled(pooled_q: torch.Tensor, pooled_k: torch.Tensor, topk: float) -> torch.Tensor:
    """Top-k key blocks per query block from pooled (smoothed) Q and K [B, H, M, D]; int32 [B, H, Mq, T], ascending.

    On CUDA (and under TRITON_INTERPRET=1) the selection is one Triton kernel (a bitonic sort per row, up to 4096
    key blocks); ``torch.topk`` + ``torch.sort`` took 2.1 ms for 40 heads x 1182 x 591 on an H200."""
    d = pooled_q.shape[-1]
    scores = torch.matmul(pooled_q.float(), pooled_k.float().transpose(-1, -2)) * (d ** -0.5)
    t = num_kept_blocks(topk, scores.shape[-1])
    if t == scores.shape[-1]:
        idx = torch.arange(t, device=scores.device, dtype=torch.int32)
        return idx.expand(scores.shape[:-1] + (t,)).contiguous()
    fast = scores.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"
    if HAS_TRITON and fast and scores.shape[-1] <= 4096:
        return _topk_lut_triton(scores, t)
    idx = torch.topk(scores, t, dim=-1, sorted=False).indices
    return torch.sort(idx, dim=-1).values.to(torch.int32).contiguous()


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
