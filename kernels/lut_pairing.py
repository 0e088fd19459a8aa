"""LUT pairing: reorder the key blocks of each pair of adjacent LUT rows so that the blocks both rows keep sit at the
same positions, first.

The FA3-layout sparse kernel (:mod:`.sage_attention_ws`, one K/V ring for its two consumers) runs two adjacent
64-row query blocks side by side, position j of one row beside position j of the other; where both rows name the
same key block it copies the tile once. Adjacent query blocks of video attention keep mostly the same key blocks
(75% on the benchmark's inputs at 1.3B@480p, top-k 0.1), but a sorted row moves a shared block to another position
whenever the other row keeps a different block before it. Pairing puts the shared blocks at positions 0 .. s-1 of
both rows (ascending) and each row's own blocks after them (ascending): every row keeps its set of key blocks, so
attention over it is the same sum; only the order of the online softmax changes. The last row of an odd number of
rows stays as it is. Input rows must be sorted ascending (as :func:`.block_map.sla_block_map` returns them).
"""
from __future__ import annotations

import torch

from .sage_attention import HAS_TRITON, _interpreting


def _shared_first(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of ``a`` (int64, sorted) with the blocks the same rows of ``b`` (sorted) also hold first."""
    at = torch.searchsorted(b.contiguous(), a.contiguous()).clamp(max=b.shape[-1] - 1)
    shared = b.gather(-1, at) == a
    key = a + (~shared).long() * (1 << 40)  # sort by (not shared, block)
    return key.sort(dim=-1).values.remainder(1 << 40)


def pair_lut_rows_reference(lut: torch.Tensor) -> torch.Tensor:
    """The pairing in PyTorch (any device): ``lut`` [B, H, Mq, T] int32, rows sorted ascending."""
    out = lut.clone()
    m2 = lut.shape[2] // 2 * 2
    even, odd = lut[:, :, 0:m2:2].long(), lut[:, :, 1:m2:2].long()
    out[:, :, 0:m2:2] = _shared_first(even, odd).to(lut.dtype)
    out[:, :, 1:m2:2] = _shared_first(odd, even).to(lut.dtype)
    return out


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _pair_rows_half(LUT, OUT, row_a, row_b, T, T_PAD: tl.constexpr, CH: tl.constexpr):
        """Row ``row_a`` (offsets into LUT/OUT) reordered against row ``row_b``: its blocks that ``row_b`` also holds
        first, then the others, each group in the row's order."""
        idx = tl.arange(0, T_PAD)
        ok = idx < T
        a = tl.load(LUT + row_a + idx, mask=ok, other=-1)
        shared = tl.zeros([T_PAD], tl.int32)
        for c0 in range(0, T_PAD, CH):
            cols = c0 + tl.arange(0, CH)
            b = tl.load(LUT + row_b + cols, mask=cols < T, other=-2)
            shared = tl.maximum(shared, tl.max((a[:, None] == b[None, :]).to(tl.int32), 1))
        shared = tl.where(ok, shared, 0)
        own = tl.where(ok, 1 - shared, 0)
        n_shared = tl.sum(shared, 0)
        pos = tl.where(shared != 0, tl.cumsum(shared, 0) - 1, n_shared + tl.cumsum(own, 0) - 1)
        tl.store(OUT + row_a + pos, a, mask=ok)

    @triton.jit
    def _pair_lut_kernel(LUT, OUT, MQ, T, T_PAD: tl.constexpr, CH: tl.constexpr):
        """One pair of rows (2m, 2m + 1) of one (batch, head); a lone last row is copied."""
        m = tl.program_id(0)
        bh = tl.program_id(1)
        row0 = (bh * MQ + 2 * m) * T
        if 2 * m + 1 < MQ:
            _pair_rows_half(LUT, OUT, row0, row0 + T, T, T_PAD, CH)
            _pair_rows_half(LUT, OUT, row0 + T, row0, T, T_PAD, CH)
        else:
            idx = tl.arange(0, T_PAD)
            tl.store(OUT + row0 + idx, tl.load(LUT + row0 + idx, mask=idx < T), mask=idx < T)


def pair_lut_rows(lut: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The pairing of ``lut`` [B, H, Mq, T] int32 (rows sorted ascending) into ``out`` (a new tensor if None): one
    Triton launch of Mq/2 × B·H small programs on the GPU (or under the interpreter),
    :func:`pair_lut_rows_reference` elsewhere."""
    if lut.dim() != 4 or lut.dtype != torch.int32:
        raise ValueError(f"expected an int32 LUT [B, H, Mq, T], got {lut.dtype} {tuple(lut.shape)}")
    if not HAS_TRITON or (lut.device.type != "cuda" and not _interpreting()):
        ref = pair_lut_rows_reference(lut)
        return ref if out is None else out.copy_(ref)
    lut = lut.contiguous()
    b, h, mq, t = lut.shape
    out = torch.empty_like(lut) if out is None else out
    t_pad = triton.next_power_of_2(t)
    _pair_lut_kernel[((mq + 1) // 2, b * h)](lut, out, mq, t, T_PAD=t_pad, CH=min(t_pad, 32),
                                               num_warps=1 if t_pad <= 64 else 4)
    return out
