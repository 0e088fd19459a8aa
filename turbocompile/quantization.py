"""The paper's INT8 128x128 block quantization, in plain PyTorch: the reference every kernel and loader uses.

TurboDiffusion's ``-quant`` checkpoints store ``int8_weight`` [N, K] and ``scale`` [ceil(N/128), ceil(K/128)]
made this way, so these functions are bit-compatible with them:
per 128x128 block ``amax = max(1e-8, max|w|)``, ``q = round_half_even(w * 128 / amax)`` saturated to
[-128, 127], ``scale = amax / 128``.
"""
from __future__ import annotations

import torch

BLOCK = 128


def _pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    n, k = w.shape
    pn, pk = (-n) % block, (-k) % block
    if pn or pk:
        w = torch.nn.functional.pad(w, (0, pk, 0, pn))
    return w


def quantize_int8_block(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D tensor in ``block``x``block`` tiles; returns (int8 [N, K], fp32 scale [N/b, K/b] rounded up)."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    wp = _pad_to_blocks(w.float(), block)
    nb, kb = wp.shape[0] // block, wp.shape[1] // block
    tiles = wp.view(nb, block, kb, block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(1e-8)  # [nb, kb]
    q = torch.round(tiles * (128.0 / amax)[:, None, :, None]).clamp_(-128, 127).to(torch.int8)
    q = q.view(nb * block, kb * block)[:n, :k].contiguous()
    return q, (amax / 128.0).contiguous()


def dequantize_int8_block(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                          block: int = BLOCK) -> torch.Tensor:
    """Inverse of :func:`quantize_int8_block`: ``q * scale`` broadcast over each tile."""
    n, k = q.shape
    s = scale.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    return (q.float() * s).to(dtype)
