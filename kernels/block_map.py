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

import torch

from turbocompile.errors import InputError, UnsupportedShapeError


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


def lut_from_pooled(pooled_q: torch.Tensor, pooled_k: torch.Tensor, topk: float) -> torch.Tensor:
    """Top-k key blocks per query block from pooled (smoothed) Q and K [B, H, M, D]; int32 [B, H, Mq, T], ascending."""
    d = pooled_q.shape[-1]
    scores = torch.matmul(pooled_q.float(), pooled_k.float().transpose(-1, -2)) * (d ** -0.5)
    nk = scores.shape[-1]
    t = num_kept_blocks(topk, nk)
    if t == nk:
        idx = torch.arange(t, device=scores.device, dtype=torch.int32)
        return idx.expand(scores.shape[:-1] + (t,)).contiguous()
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
