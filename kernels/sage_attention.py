"""SageAttention (INT8 QKᵀ, FP8 P·V) as ``torch.ops.turbocompile.sage_attention``, plus the attention kernel family
that ``sage_sla`` and ``sla`` reuse.

Layout (B, H, L, D), the one ``aten.scaled_dot_product_attention`` has in the exported Wan graph, softmax scale
``D**-0.5``, output in q's dtype. Lk may differ from Lq (cross-attention).

Numerics of the Sage path (SageAttention2 on sm90, per-block variant):

* K is smoothed by its token mean (exact under softmax: it shifts each score row by a constant).
* Q (times ``D**-0.5 · log2 e``, so the kernel works in exp2) and smoothed K are quantized to INT8 with one
  scale per ``blk_q`` / ``blk_k`` token block (``scale = amax / 127``, round half away from zero).
* ``S = (q_i8 · k_i8ᵀ) · s_q · s_k``; online softmax in exp2 with tile width ``blk_k``.
* P is quantized to FP8 e4m3 as ``P · 448`` (P ≤ 1 after the max subtraction); V to FP8 e4m3 with one scale per
  channel (``amax / 448`` over all tokens), stored transposed (the FP8 wgmma wants the reduction dim contiguous).
* ``P·V`` of every key tile starts from a fresh fp32 accumulator (``max_num_imprecise_acc`` = tile width), then is
  added to the running fp32 accumulator; the epilogue divides by ``448 · l`` and multiplies by the V scale.

The plain-PyTorch reference (:func:`sage_attention_reference`) emulates exactly these quantization steps (the
running maxima of the online softmax are a cumulative max over key tiles), so the Triton kernel can be compared to
it tightly; :func:`attention_fp32_reference` is the exact yardstick. Both process queries in chunks, so any L fits
in memory.

Why ``torch.library.custom_op`` and not ``triton_op``: the op must survive ``torch.export`` as one opaque node
(the ONNX/TensorRT lowering maps it to a plugin), it has a CPU implementation that is not Triton, and Inductor has
nothing to fuse inside a flash-attention kernel.

``python -m turbocompile.kernels.sage_attention --bench`` checks the kernels against the references at the Wan
shapes and times them against cuDNN / FLASH SDPA and FlexAttention (needs a CUDA GPU).
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from turbocompile.errors import InputError, UnsupportedShapeError

from .block_map import check_block_size

log = logging.getLogger(__name__)

__all__ = [
    "sage_attention", "sage_attention_reference", "attention_fp32_reference", "sage_quantize_reference",
    "block_attention_reference", "sage_quantize_triton", "block_attention_triton", "triton_supported",
    "structured_qkv",
]

LOG2E = 1.4426950408889634
FP8_MAX = 448.0
_SCALE_FLOOR = 1e-6  # amax floor of an all-zero block, so its scale is never 0
_REF_BUDGET = 1 << 23  # score elements per reference chunk (a few hundred MB of fp32 temporaries at most)

try:  # Triton is optional: without it every op runs its PyTorch reference.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------------------------
# input checks shared by the three ops
# ----------------------------------------------------------------------------------------------------------------
def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blk_q: int, blk_k: int) -> None:
    """Shapes every attention op accepts: (B, H, L, D), k and v of one length, same B, H, D; raise one-line errors."""
    check_block_size("blk_q", blk_q)
    check_block_size("blk_k", blk_k)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise UnsupportedShapeError(
            f"attention inputs must be (B, H, L, D); got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise UnsupportedShapeError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree; k and v must match and share "
            "B, H and D with q")
    if q.shape[2] < 1 or k.shape[2] < 1:
        raise UnsupportedShapeError("attention needs at least one query and one key token")
    if not (q.is_floating_point() and k.dtype == q.dtype and v.dtype == q.dtype):
        raise InputError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


# ----------------------------------------------------------------------------------------------------------------
# PyTorch reference (CPU implementation and fallback)
# ----------------------------------------------------------------------------------------------------------------
def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _to_fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _quant_int8_blocks(x: torch.Tensor, blk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x fp32 [B, H, L, D] -> (int8 [B, H, L, D], fp32 scale [B, H, ceil(L/blk)]) with one scale per token block."""
    b, h, n, d = x.shape
    nb = -(-n // blk)
    xp = torch.nn.functional.pad(x, (0, 0, 0, nb * blk - n)).view(b, h, nb, blk, d)
    scale = xp.abs().amax(dim=(3, 4)).clamp_min(_SCALE_FLOOR) / 127.0
    q = _round_half_away(xp / scale[..., None, None]).clamp_(-127, 127).to(torch.int8)
    return q.view(b, h, nb * blk, d)[:, :, :n], scale


def sage_quantize_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blk_q: int, blk_k: int) -> dict:
    """Sage quantization in PyTorch: int8 Q (scale·log2e folded) and smoothed K per block, FP8 V per channel."""
    d = q.shape[-1]
    q_i8, q_scale = _quant_int8_blocks(q.float() * (d ** -0.5 * LOG2E), blk_q)
    k_f = k.float()
    k_i8, k_scale = _quant_int8_blocks(k_f - k_f.mean(dim=2, keepdim=True), blk_k)
    v_scale = v.float().abs().amax(dim=2).clamp_min(_SCALE_FLOOR) / FP8_MAX  # [B, H, D]
    v8 = _to_fp8(v.float() / v_scale[:, :, None, :])
    return {"q": q_i8, "q_scale": q_scale, "k": k_i8, "k_scale": k_scale, "v": v8, "v_scale": v_scale}


def _chunks(total: int, step: int):
    for start in range(0, total, step):
        yield start, min(total, start + step)


def block_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lut: torch.Tensor | None,
                              blk_q: int, blk_k: int, sage: bool) -> torch.Tensor:
    """Block(-sparse) softmax attention in PyTorch, fp32 result [B, H, Lq, D].

    ``lut`` [B, H, Mq, T] selects the key blocks of each ``blk_q`` query block (None = all blocks: dense).
    ``sage=True`` emulates the Sage kernel's quantization (INT8 Q/K, FP8 P and V, online max per key tile of
    ``blk_k``); ``sage=False`` is exact fp32 softmax over the kept blocks. Padding of the last query or key block
    never reaches the result: padded keys get -inf scores, padded query rows are cut off.
    """
    b, h, lq, d = q.shape
    lk = k.shape[2]
    mq, nk = -(-lq // blk_q), -(-lk // blk_k)
    if sage:
        qq = sage_quantize_reference(q, k, v, blk_q, blk_k)
        qf = qq["q"].float() * qq["q_scale"].repeat_interleave(blk_q, dim=2)[:, :, :lq, None]
        kf = qq["k"].float() * qq["k_scale"].repeat_interleave(blk_k, dim=2)[:, :, :lk, None]
        vf = qq["v"].float()
    else:
        qf, kf, vf = q.float() * d ** -0.5, k.float(), v.float()  # natural-log domain: torch.softmax
    bh = b * h
    qb = torch.nn.functional.pad(qf, (0, 0, 0, mq * blk_q - lq)).reshape(bh, mq, blk_q, d)
    kb = torch.nn.functional.pad(kf, (0, 0, 0, nk * blk_k - lk)).reshape(bh, nk, blk_k, d)
    vb = torch.nn.functional.pad(vf, (0, 0, 0, nk * blk_k - lk)).reshape(bh, nk, blk_k, d)
    key_ok = (torch.arange(nk * blk_k, device=q.device) < lk).view(nk, blk_k)
    lut_f = None if lut is None else lut.reshape(bh, mq, -1).long()
    t = nk if lut_f is None else lut_f.shape[-1]
    out = torch.empty(bh, mq, blk_q, d, dtype=torch.float32, device=q.device)
    per_qblock = blk_q * t * blk_k
    nq = max(1, min(mq, _REF_BUDGET // per_qblock))
    nh = max(1, min(bh, _REF_BUDGET // (per_qblock * mq))) if nq == mq else 1
    for h0, h1 in _chunks(bh, nh):
        for i0, i1 in _chunks(mq, nq):
            qc = qb[h0:h1, i0:i1]  # [n, m, blk_q, d]
            if lut_f is None:
                kc, vc = kb[h0:h1, None], vb[h0:h1, None]  # [n, 1, t, blk_k, d]
                ok = key_ok[None, None]
            else:
                idx = lut_f[h0:h1, i0:i1]  # [n, m, t]
                gather = lambda x: x[torch.arange(h1 - h0, device=x.device)[:, None, None], idx]  # noqa: E731
                kc, vc, ok = gather(kb), gather(vb), key_ok[idx]
            s = torch.einsum("nmqd,nmtkd->nmqtk", qc, kc.expand(-1, qc.shape[1], -1, -1, -1))
            s = s.masked_fill(~ok[:, :, None], float("-inf"))
            if sage:
                m_run = torch.cummax(s.amax(dim=-1), dim=-1).values  # running max after each key tile
                m_fin = m_run[..., -1:]
                p = torch.exp2(s - m_run[..., None])
                w = torch.exp2(m_run - m_fin)  # how much later tiles rescale this tile's contribution
                denom = (p.sum(-1) * w).sum(-1)
                p8 = _to_fp8(p * FP8_MAX).float() * w[..., None]
                acc = torch.einsum("nmqtk,nmtkd->nmqd", p8, vc.expand(-1, qc.shape[1], -1, -1, -1))
                out[h0:h1, i0:i1] = acc / (denom[..., None] * FP8_MAX)
            else:
                s = s.flatten(-2)
                p = torch.softmax(s, dim=-1)
                vflat = vc.expand(-1, qc.shape[1], -1, -1, -1).flatten(2, 3)
                out[h0:h1, i0:i1] = torch.einsum("nmqk,nmkd->nmqd", p, vflat)
    out = out.reshape(b, h, mq * blk_q, d)[:, :, :lq]
    if sage:
        out = out * qq["v_scale"][:, :, None, :]
    return out


def sage_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blk_q: int = 128,
                             blk_k: int = 64) -> torch.Tensor:
    """Dense SageAttention in PyTorch with the kernel's exact quantization; output in q's dtype."""
    check_qkv(q, k, v, blk_q, blk_k)
    return block_attention_reference(q, k, v, None, blk_q, blk_k, sage=True).to(q.dtype)


def attention_fp32_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             rows: torch.Tensor | None = None) -> torch.Tensor:
    """Exact softmax attention in fp32 (the accuracy yardstick), chunked over queries; ``rows`` picks query rows."""
    if rows is not None:
        q = q[:, :, rows]
    d = q.shape[-1]
    kf, vf = k.float(), v.float()
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    step = max(1, _REF_BUDGET // max(1, k.shape[2] * q.shape[0] * q.shape[1]))
    for i0, i1 in _chunks(q.shape[2], step):
        s = torch.matmul(q[:, :, i0:i1].float(), kf.transpose(-1, -2)) * d ** -0.5
        out[:, :, i0:i1] = torch.matmul(torch.softmax(s, dim=-1), vf)
    return out


def structured_qkv(b: int, h: int, n: int, d: int, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", seed: int = 0, nk: int | None = None) -> tuple[torch.Tensor, ...]:
    """Test/bench inputs shaped like video attention, not i.i.d. noise: RoPE-like positional features shared by
    q and k (attention peaks on nearby tokens), a per-head rotation, a large common offset in k (what smoothing
    removes) and a low-rank smooth component in v. Returns (q, k, v) [B, H, L, D] (k, v of length ``nk``)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    gd = torch.Generator(device=device).manual_seed(seed + 1)
    nk = n if nk is None else nk
    rot = torch.linalg.qr(torch.randn(h, d, d, generator=g))[0].to(device)  # [H, D, D]
    offset = (torch.randn(h, 1, d, generator=g) * 2.0).to(device)
    v_dir = (torch.randn(h, d, 4, generator=g) / d ** 0.5).to(device)
    v_mix = v_dir @ v_dir.transpose(1, 2)
    periods = torch.logspace(0.6, 4.2, d // 2, device=device)  # 4 .. 16k tokens

    out = []
    for length, kind in ((n, "q"), (nk, "k"), (nk, "v")):
        ang = torch.arange(length, dtype=torch.float32, device=device)[:, None] * (2 * torch.pi / periods)[None, :]
        p = torch.einsum("ld,hde->hle", torch.cat([ang.cos(), ang.sin()], dim=-1), rot)  # [H, L, D]
        x = torch.randn(b, h, length, d, generator=gd, device=device)
        if kind == "q":
            x += 1.2 * p
        elif kind == "k":
            x += 1.2 * p + offset
        else:
            x = 0.5 * x + 2.0 * torch.einsum("hle,hef->hlf", p, v_mix) + 0.3 * offset
        out.append(x.to(dtype))
        del x, p
    return tuple(out)


#: (B, H, L, D) of one self-attention call at the Wan shapes the attention benchmarks time.
ATTENTION_BENCH_SHAPES = {"1.3B@480p": (1, 12, 32760, 128), "14B@720p": (1, 40, 75600, 128)}


def bench_meta() -> dict:  # pragma: no cover - needs a GPU
    """The card, versions and date the attention benchmarks record with their numbers."""
    import time

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def bench_ms(fn) -> float:  # pragma: no cover - needs a GPU
    """Median milliseconds of ``fn`` by ``triton.testing.do_bench`` (25 ms warm-up, 100 ms of repeats)."""
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def bench_ms_graph(fn) -> float:  # pragma: no cover - needs a GPU
    """Median milliseconds of one replay of a CUDA graph of ``fn`` (``triton.testing.do_bench_cudagraph``): the
    GPU time without the host's launches in the loop."""
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
_PAD = 128  # quantized Q/K/Vᵀ are padded to a multiple of this, so the hot loop loads without masks

if HAS_TRITON:

    @triton.jit
    def _fp8_e4m3(x, EMULATE: tl.constexpr, CLAMP: tl.constexpr):
        """Saturating fp32 -> e4m3 (CLAMP=False where |x| <= 448 already holds, saving two ops per element).
        EMULATE rounds in fp32 first (Triton's CPU interpreter mis-rounds mantissa carries)."""
        if CLAMP or EMULATE:
            x = tl.minimum(tl.maximum(x, -448.0), 448.0)
        if EMULATE:
            xi = x.to(tl.int32, bitcast=True)
            xi = (xi + 0x7FFFF + ((xi >> 20) & 1)) & -1048576  # round-to-nearest-even to 3 mantissa bits
            sub = tl.floor(x * 512.0 + 0.5) / 512.0  # e4m3 subnormals: multiples of 2^-9
            x = tl.where(tl.abs(x) < 0.015625, sub, xi.to(tl.float32, bitcast=True))
        return x.to(tl.float8e4nv)

    @triton.jit
    def _dot16(a, b, EMULATE: tl.constexpr):
        """bf16/fp16 dot with fp32 result; EMULATE widens first (Triton's CPU interpreter mis-multiplies bf16)."""
        if EMULATE:
            return tl.dot(a.to(tl.float32), b.to(tl.float32))
        return tl.dot(a, b)

    @triton.jit
    def _store_phi_over_den(x, lin_z, ptrs):
        """SLA's linear branch short of M for rows ``x`` of the raw query: ``φ/den = e / (Σ e·z + 1e-5·Σ e)``,
        e = exp(x - max x) (φ = softmax over head_dim), one reciprocal per row, stored in bf16."""
        e = tl.math.exp2((x - tl.max(x, 1)[:, None]) * 1.4426950408889634)
        inv = 1.0 / (tl.sum(e * lin_z[None, :], 1) + 1e-5 * tl.sum(e, 1))
        tl.store(ptrs, (e * inv[:, None]).to(tl.bfloat16))

    @triton.jit
    def _store_int8(y, ptrs):
        """``y`` (|y| <= 127 by construction) rounded half away from zero to int8: ``trunc(y ± 0.5)``, the sign
        copied by a bit operation (no floor, select or clamp)."""
        half = ((y.to(tl.int32, bitcast=True) & -2147483648) | 0x3F000000).to(tl.float32, bitcast=True)  # ±.5
        tl.store(ptrs, (y + half).to(tl.int8))

    @triton.jit
    def _quant_int8_kernel(X, MEAN, OUT, SCALE, POOL, LIN_Z, PHI,
                           stride_xb, stride_xh, stride_xl, H, L, L_PAD, NBLK, BPP, mul,
                           BLK: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_MEAN: tl.constexpr,
                           LINEAR: tl.constexpr, PREFETCH: tl.constexpr):
        """``BPP`` consecutive token blocks of one head: subtract the token mean (K), pool, scale by ``mul``,
        quantize to int8 with one scale per block.

        Built to get near the copy bandwidth: several blocks per program with PREFETCH loading the next block into
        registers during this one's arithmetic (Triton's pipeliner leaves loops without a ``tl.dot`` alone), and
        few instructions per element: the scale of ``x·mul`` comes from ``amax(|x|)·mul`` (rounding is monotonic,
        so the same number), ``x·mul/scale`` is one multiply by a per-block factor, round-half-away is
        ``trunc(y ± 0.5)`` with the sign copied by a bit operation (no floor, no select, no clamp: |y| ≤ 127 by
        construction).

        LINEAR (Q of ``sage_sla``): also write ``φ(x) / (φ(x)·z + 1e-5)`` in bf16 to PHI [B·H, L_PAD, D] (φ =
        softmax over head_dim of the raw query, z = Σφ(K)): the SLA linear branch short of its product with M,
        which the Gluon attention epilogue then takes by TMA into one wgmma. This pass reads the query anyway;
        the exponentials, row sums and register shuffles it takes here sat on the attention kernel's critical
        path. (Doing the product with M here too was measured slower: docs/kernels-attention.md.)"""
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        cols = tl.arange(0, HEAD_DIM)
        x_base = X + (bh // H) * stride_xb + (bh % H) * stride_xh
        if LINEAR:
            lin_z = tl.load(LIN_Z + bh * HEAD_DIM + cols)
        if HAS_MEAN:
            mean = tl.load(MEAN + bh * HEAD_DIM + cols)
        first = pid * BPP
        last = tl.minimum(first + BPP, L_PAD // BLK)
        rows = first * BLK + tl.arange(0, BLK)
        nxt = tl.load(x_base + rows[:, None] * stride_xl + cols[None, :], mask=(rows < L)[:, None], other=0.0)
        for blk in range(first, last):
            rows = blk * BLK + tl.arange(0, BLK)
            row_ok = (rows < L)[:, None]
            if PREFETCH:  # the next block's load in flight during this one's arithmetic (registers, by hand)
                x = nxt.to(tl.float32)
                nxt = tl.load(x_base + (rows + BLK)[:, None] * stride_xl + cols[None, :],
                              mask=((rows + BLK) < tl.minimum(L, last * BLK))[:, None], other=0.0)
            else:
                x = tl.load(x_base + rows[:, None] * stride_xl + cols[None, :], mask=row_ok, other=0.0)
                x = x.to(tl.float32)
            if LINEAR:
                _store_phi_over_den(x, lin_z, PHI + bh * L_PAD * HEAD_DIM + rows[:, None] * HEAD_DIM + cols[None, :])
            if HAS_MEAN:
                x = tl.where(row_ok, x - mean[None, :], 0.0)
            scale = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0) * mul, 1e-6) / 127.0
            _store_int8(x * (mul / scale), OUT + bh * L_PAD * HEAD_DIM + rows[:, None] * HEAD_DIM + cols[None, :])
            if blk < NBLK:
                n_valid = tl.minimum(L - blk * BLK, BLK).to(tl.float32)
                tl.store(POOL + (bh * NBLK + blk) * HEAD_DIM + cols, tl.sum(x, 0) / n_valid)
                tl.store(SCALE + bh * NBLK + blk, scale)

    @triton.jit
    def _quant_int8_two_pass_kernel(X, MEAN, OUT, SCALE, POOL, LIN_Z, PHI,
                                    stride_xb, stride_xh, stride_xl, H, L, L_PAD, NBLK, mul,
                                    BLK: tl.constexpr, HEAD_DIM: tl.constexpr, CH: tl.constexpr,
                                    HAS_MEAN: tl.constexpr, LINEAR: tl.constexpr, UNROLL: tl.constexpr):
        """The same outputs as ``_quant_int8_kernel`` (int8 values, scales and φ/den bit for bit; pooled means up
        to the fp32 summation order), one token block per program, read twice in ``CH``-row chunks: the first pass
        keeps only the running |x| maxima and column sums, the second (the same bytes again, from L1/L2)
        quantizes and stores. Holding a whole block and the next one in registers, the one-pass kernel fits two
        programs per SM (228-255 registers; Nsight Compute: 2.4-2.5 TB/s of DRAM traffic at 1.3B@480p against
        3.5 for the V quantizer, which needs no block reduction); this one keeps few registers, so many programs
        per SM keep enough loads in flight."""
        blk = tl.program_id(0)
        bh = tl.program_id(1)
        cols = tl.arange(0, HEAD_DIM)
        x_base = X + (bh // H) * stride_xb + (bh % H) * stride_xh
        if HAS_MEAN:
            mean = tl.load(MEAN + bh * HEAD_DIM + cols)
        amax = tl.zeros([CH, HEAD_DIM], tl.float32)
        csum = tl.zeros([CH, HEAD_DIM], tl.float32)
        for r0 in tl.range(0, BLK, CH, loop_unroll_factor=UNROLL):
            rows = blk * BLK + r0 + tl.arange(0, CH)
            ok = (rows < L)[:, None]
            x = tl.load(x_base + rows[:, None] * stride_xl + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            if HAS_MEAN:
                x = tl.where(ok, x - mean[None, :], 0.0)
            amax = tl.maximum(amax, tl.abs(x))
            csum += x
        scale = tl.maximum(tl.max(tl.max(amax, 1), 0) * mul, 1e-6) / 127.0
        f = mul / scale
        if LINEAR:
            lin_z = tl.load(LIN_Z + bh * HEAD_DIM + cols)
        for r0 in tl.range(0, BLK, CH, loop_unroll_factor=UNROLL):
            rows = blk * BLK + r0 + tl.arange(0, CH)
            ok = (rows < L)[:, None]
            x = tl.load(x_base + rows[:, None] * stride_xl + cols[None, :], mask=ok, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
            if LINEAR:  # φ/den of the raw query rows
                _store_phi_over_den(x, lin_z, PHI + bh * L_PAD * HEAD_DIM + rows[:, None] * HEAD_DIM + cols[None, :])
            if HAS_MEAN:
                x = tl.where(ok, x - mean[None, :], 0.0)
            _store_int8(x * f, OUT + bh * L_PAD * HEAD_DIM + rows[:, None] * HEAD_DIM + cols[None, :])
        if blk < NBLK:
            n_valid = tl.minimum(L - blk * BLK, BLK).to(tl.float32)
            tl.store(POOL + (bh * NBLK + blk) * HEAD_DIM + cols, tl.sum(csum, 0) / n_valid)
            tl.store(SCALE + bh * NBLK + blk, scale)

    @triton.jit
    def _quant_v_fp8_kernel(V, VSCALE, OUT, stride_vb, stride_vh, stride_vl, H, L, L_PAD,
                            BLK: tl.constexpr, HEAD_DIM: tl.constexpr, EMULATE: tl.constexpr,
                            WGMMA_ORDER: tl.constexpr):
        """One token block of V -> FP8 e4m3 with the per-channel scale, written transposed [B·H, D, L_PAD].

        WGMMA_ORDER stores key ``16a + 8e + 2q + i`` at ``16a + 4q + 2e + i`` (the order in which the Gluon
        kernel's P registers arrive, see ``sage_attention_gluon.wgmma_key_order``). It permutes which rows it
        loads (whole rows, by the inverse map) rather than where it stores, so the transposed stores stay runs of
        contiguous keys (permuted stores cost +25% at 14B@720p)."""
        bh = tl.program_id(1)
        pos = tl.program_id(0) * BLK + tl.arange(0, BLK)  # key slots written by this program, in order
        if WGMMA_ORDER:
            rows = (pos & -16) | (((pos >> 2) & 3) << 1) | (((pos >> 1) & 1) << 3) | (pos & 1)
        else:
            rows = pos
        cols = tl.arange(0, HEAD_DIM)
        x = tl.load(V + (bh // H) * stride_vb + (bh % H) * stride_vh + rows[:, None] * stride_vl + cols[None, :],
                    mask=(rows < L)[:, None], other=0.0).to(tl.float32)
        x = x / tl.load(VSCALE + bh * HEAD_DIM + cols)[None, :]
        tl.store(OUT + bh * HEAD_DIM * L_PAD + cols[None, :] * L_PAD + pos[:, None], _fp8_e4m3(x, EMULATE, True))

    @triton.jit
    def _attn_tile(acc, m_i, l_i, q, qs, K_base, V_base, KS_base, start, Lk, stride_kl, stride_vl, stride_vd,
                   sm_scale_log2, offs_n0, offs_d, BLOCK_N: tl.constexpr, BLKK: tl.constexpr, SAGE: tl.constexpr,
                   MASK_LOADS: tl.constexpr, EMULATE: tl.constexpr):
        """One key tile of the online softmax: scores, running max/sum, P·V into the fp32 accumulator."""
        offs_n = start + offs_n0
        if MASK_LOADS:
            k = tl.load(K_base + offs_n[None, :] * stride_kl + offs_d[:, None], mask=(offs_n < Lk)[None, :], other=0.0)
        else:
            k = tl.load(K_base + offs_n[None, :] * stride_kl + offs_d[:, None])
        if SAGE:
            # int32 -> fp32 without the quarter-rate I2F: |s| < 2^22, so bits(1.5·2^23) + s is the float 1.5·2^23 + s
            # and subtracting 1.5·2^23 again is exact (an integer below 2^22)
            sf = (tl.dot(q, k) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
            if start + BLOCK_N > Lk:
                sf = tl.where((offs_n < Lk)[None, :], sf, float("-inf"))
            c = qs * tl.load(KS_base + start // BLKK)  # per-row dequant scale (log2 e / sqrt(D) folded into qs)
            m_new = tl.maximum(m_i, tl.max(sf, 1) * c)
            # one FMA per score: p·448 = exp2(s·c - m + log2 448); l and acc both carry the 448
            p = tl.math.exp2(sf * c[:, None] - (m_new - 8.807354922057604)[:, None])
        else:
            s = _dot16(q, k, EMULATE) * sm_scale_log2
            if start + BLOCK_N > Lk:
                s = tl.where((offs_n < Lk)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASK_LOADS:
            v = tl.load(V_base + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                        mask=(offs_n < Lk)[:, None], other=0.0)
        else:
            v = tl.load(V_base + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd)
        if SAGE:
            # fresh fp32 accumulator per key tile (two-level accumulation; Hopper's FP8 MMA alone is ~fp22)
            pv = tl.dot(_fp8_e4m3(p, EMULATE, False), v, max_num_imprecise_acc=BLOCK_N)
        else:
            pv = _dot16(p.to(v.dtype), v, EMULATE)
        acc = acc * alpha[:, None] + pv
        return acc, m_new, l_i

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, QS, KS, VS, LUT, O, QRAW, LIN_M, LIN_Z, LIN_B,
        stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
        stride_vb, stride_vh, stride_vl, stride_vd, stride_ob, stride_oh, stride_ol,
        stride_rb, stride_rh, stride_rl,
        H, Lq, Lk, NQS, NKS, T, MQ_LUT, sm_scale_log2,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLKQ: tl.constexpr,
        BLKK: tl.constexpr, SAGE: tl.constexpr, SPARSE: tl.constexpr, LINEAR: tl.constexpr,
        MASK_LOADS: tl.constexpr, EMULATE: tl.constexpr,
    ):
        """Flash-attention forward over all key tiles (dense) or the LUT's key blocks (sparse), with an optional
        fused SLA linear branch in the epilogue: ``o += (φ(q) · M) / (φ(q) · z + 1e-5) + bias``, M = (φ(K)ᵀV)·Wᵀ."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n0 = tl.arange(0, BLOCK_N)
        row_ok = offs_m < Lq
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :]
        if MASK_LOADS:
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            q = tl.load(q_ptrs)
        if SAGE:
            qs = tl.load(QS + bh * NQS + offs_m // BLKQ, mask=row_ok, other=0.0)
        else:
            qs = tl.zeros([BLOCK_M], dtype=tl.float32)
        K_base = K + b * stride_kb + h * stride_kh
        V_base = V + b * stride_vb + h * stride_vh
        KS_base = KS + bh * NKS
        m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        if SPARSE:
            lut_base = LUT + (bh * MQ_LUT + (pid_m * BLOCK_M) // BLKQ) * T
            for t in range(0, T):
                kb = tl.load(lut_base + t)
                for sub in tl.static_range(BLKK // BLOCK_N):
                    acc, m_i, l_i = _attn_tile(acc, m_i, l_i, q, qs, K_base, V_base, KS_base,
                                               kb * BLKK + sub * BLOCK_N, Lk, stride_kl, stride_vl, stride_vd,
                                               sm_scale_log2, offs_n0, offs_d, BLOCK_N, BLKK, SAGE, MASK_LOADS,
                                               EMULATE)
        else:
            for start in range(0, Lk, BLOCK_N):
                acc, m_i, l_i = _attn_tile(acc, m_i, l_i, q, qs, K_base, V_base, KS_base, start, Lk,
                                           stride_kl, stride_vl, stride_vd, sm_scale_log2, offs_n0, offs_d,
                                           BLOCK_N, BLKK, SAGE, MASK_LOADS, EMULATE)
        if SAGE:
            o = acc * tl.load(VS + bh * HEAD_DIM + offs_d)[None, :] / l_i[:, None]
        else:
            o = acc / l_i[:, None]
        if LINEAR:
            r = tl.load(QRAW + b * stride_rb + h * stride_rh + offs_m[:, None] * stride_rl + offs_d[None, :],
                        mask=row_ok[:, None], other=0.0).to(tl.float32)
            e = tl.math.exp2((r - tl.max(r, 1)[:, None]) * 1.4426950408889634)
            phi = e / tl.sum(e, 1)[:, None]
            den = tl.sum(phi * tl.load(LIN_Z + bh * HEAD_DIM + offs_d)[None, :], 1) + 1e-5
            lin_m = tl.load(LIN_M + bh * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_d[None, :])
            o += _dot16(phi.to(tl.bfloat16), lin_m, EMULATE) / den[:, None] + tl.load(LIN_B + offs_d)[None, :]
        tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
                 o.to(O.dtype.element_ty), mask=row_ok[:, None])


def triton_supported(q: torch.Tensor, blk_q: int, blk_k: int) -> str | None:
    """None if the Triton path handles this call, else why not (the caller logs it and runs the reference)."""
    if not HAS_TRITON:
        return "triton is not installed"
    if q.device.type != "cuda" and not _interpreting():
        return f"tensors are on {q.device.type}"
    if q.shape[-1] not in (64, 128):
        return f"head_dim {q.shape[-1]} is not 64 or 128"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} is not bf16/fp16"
    if blk_q not in (64, 128) or blk_k not in (64, 128):
        return f"blocks {blk_q}x{blk_k} are not 64/128"
    return None


def sage_quantize_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blk_q: int, blk_k: int,
                         k_mean: torch.Tensor | None = None, v_amax: torch.Tensor | None = None,
                         v_order: str = "natural", linear_z: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None, v_later: bool = False) -> dict:
    """Sage prologue on the GPU: int8 Q/K with block scales and pooled means (the SLA block map reuses them), FP8 Vᵀ.

    One pass over Q, one over K and one over V after the token mean of K and the channel amax of V (one pass over K
    and V, :mod:`.kv_moments`, or given: ``k_mean``/``v_amax`` [B, H, D] fp32 from the SLA linear-statistics
    pass). Q/K/Vᵀ come out
    padded to a multiple of 128 tokens with zeros, so the attention loop needs no masks. ``v_order="wgmma"`` stores
    Vᵀ's keys permuted within each 32-key group for the Gluon kernel (``out["v_wgmma_order"]`` says which).
    ``linear_z`` (z = Σφ(K) [B·H, D] fp32 of :func:`~.sla.linear_branch_stats`): the pass over Q also writes
    ``out["lin_phi"] = φ(q)/(φ(q)·z + 1e-5)`` [B, H, Lq_pad, D] bf16, the SLA linear branch short of its
    product with M, which the Gluon kernel's epilogue takes by TMA. ``v_later``: Vᵀ's buffer is allocated but the
    caller launches its quantizer (:func:`quantize_v_into`), e.g. beside other work on another CUDA stream.
    """
    if v_order not in ("natural", "wgmma"):
        raise ValueError(f"v_order must be 'natural' or 'wgmma', not {v_order!r}")
    b, h, lq, d = q.shape
    lk = k.shape[2]
    dev = q.device
    lq_pad, lk_pad = -(-lq // _PAD) * _PAD, -(-lk // _PAD) * _PAD
    nq, nk = -(-lq // blk_q), -(-lk // blk_k)
    if k_mean is None and v_amax is None and v_scale is None and FUSED_MOMENTS:
        from .kv_moments import kv_moments, supported

        if supported(k, v) is None:
            k_mean, v_scale = kv_moments(k, v)  # one pass over K and V for both
    if k_mean is None:
        k_mean = k.mean(dim=2, dtype=torch.float32)  # [B, H, D]
    k_mean = k_mean.contiguous()
    if v_scale is None:  # (given by the linear-statistics pass, which computes it from v_amax the same way)
        if v_amax is None:
            vmin, vmax = torch.aminmax(v, dim=2)
            v_amax = torch.maximum(vmax.float(), -vmin.float())
        v_scale = v_amax.float().clamp_min(_SCALE_FLOOR) / FP8_MAX
    v_scale = v_scale.contiguous()
    out = {
        "q": torch.empty((b, h, lq_pad, d), dtype=torch.int8, device=dev),
        "q_scale": torch.empty((b, h, nq), dtype=torch.float32, device=dev),
        "q_pool": torch.empty((b, h, nq, d), dtype=torch.float32, device=dev),
        "k": torch.empty((b, h, lk_pad, d), dtype=torch.int8, device=dev),
        "k_scale": torch.empty((b, h, nk), dtype=torch.float32, device=dev),
        "k_pool": torch.empty((b, h, nk, d), dtype=torch.float32, device=dev),
        "v": torch.empty((b, h, d, lk_pad), dtype=torch.float8_e4m3fn, device=dev),
        "v_scale": v_scale, "k_mean": k_mean, "v_wgmma_order": v_order == "wgmma",
        "lin_phi": None if linear_z is None else torch.empty((b, h, lq_pad, d), dtype=torch.bfloat16, device=dev),
    }
    _quantize_int8_into(q, None, out["q"], out["q_scale"], out["q_pool"], blk_q, d ** -0.5 * LOG2E,
                        linear_z, out["lin_phi"])
    _quantize_int8_into(k, k_mean, out["k"], out["k_scale"], out["k_pool"], blk_k, 1.0)
    if not v_later:
        quantize_v_into(v, out)
    return out


#: (warps, pipeline stages, token blocks per program, register prefetch of the next block) of the int8
#: quantizer, per (token-block size, writing φ(q)/den for the linear branch). Swept on an H200 (2026-11-27,
#: docs/kernels-attention.md): 4 warps beat 8 (K: 0.070 against 0.085 ms at 1.3B@480p), and 8 blocks per program
#: with the next block's load prefetched in registers beat one block per program for K (0.070 against 0.116 ms).
#: The blocks per program are a cap: :func:`_quantize_int8_into` lowers it to keep ~8 programs per SM.
#: An entry ending in TWO_PASS runs ``_quant_int8_two_pass_kernel`` instead, read as (warps, loop unroll factor,
#: rows per chunk, TWO_PASS). Swept on an H200 (2026-11-27, 1.3B@480p / 14B@720p, ms): Q with φ/den (sage_sla's)
#: in 8-row chunks 0.084 / 0.572 against 0.094 / 0.643 one-pass; K lost or tied (0.062 / 0.371 against 0.061 /
#: 0.380). Q alone measured 0.061 / 0.363 against 0.066 / 0.402, but the dense op it serves did not get faster
#: (8.640 against 8.565 ms, A/B in one process), so it stays one-pass.
TWO_PASS = 2
#: K's token mean and V's scale by :func:`.kv_moments.kv_moments` (one pass over K and V) where the caller gives
#: neither; False: two PyTorch reductions.
FUSED_MOMENTS = True
QUANT_CONFIGS: dict[tuple[int, bool], tuple[int, int, int, bool | int]] = {
    (64, False): (4, 1, 8, True), (128, False): (4, 1, 8, True),
    (64, True): (4, 2, 8, TWO_PASS), (128, True): (4, 1, 8, True),
}


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132, an H100/H200's, off the GPU: the interpreter's programs)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _quantize_int8_into(x: torch.Tensor, mean: torch.Tensor | None, xq: torch.Tensor, scale: torch.Tensor,
                        pool: torch.Tensor, blk: int, mul: float, linear_z: torch.Tensor | None = None,
                        phi: torch.Tensor | None = None) -> None:
    """x [B, H, L, D] (minus the token ``mean`` [B, H, D] if given) -> pooled block means ``pool``, then x·mul
    -> int8 ``xq`` [B, H, L_pad, D] with one ``scale`` per ``blk``-token block; with ``linear_z`` (z = Σφ(K),
    [B·H, D] fp32) also ``φ(x)/(φ(x)·z + 1e-5)`` into ``phi`` [B, H, L_pad, D] bf16."""
    b, h, n, d = x.shape
    n_pad = xq.shape[2]
    warps, stages, bpp, prefetch = QUANT_CONFIGS[(blk, linear_z is not None)]
    if prefetch == TWO_PASS:  # (warps, loop unroll factor, rows per chunk, TWO_PASS)
        _quant_int8_two_pass_kernel[(n_pad // blk, b * h)](
            x, mean if mean is not None else scale, xq, scale, pool,
            linear_z if linear_z is not None else scale, phi if phi is not None else xq,
            x.stride(0), x.stride(1), x.stride(2), h, n, n_pad, scale.shape[-1], mul, BLK=blk, HEAD_DIM=d,
            CH=min(bpp, blk), HAS_MEAN=mean is not None, LINEAR=linear_z is not None, UNROLL=max(1, stages),
            num_warps=warps)
        return
    # at most ``bpp`` blocks per program, fewer where that leaves under ~8 programs per SM (a half-empty last wave
    # of long programs cost K 25% at 1.3B@480p)
    bpp = max(1, min(bpp, round(n_pad // blk * b * h / (8 * _sm_count(x.device)))))
    _quant_int8_kernel[(-(-(n_pad // blk) // bpp), b * h)](
        x, mean if mean is not None else scale, xq, scale, pool,
        linear_z if linear_z is not None else scale, phi if phi is not None else xq,
        x.stride(0), x.stride(1), x.stride(2), h, n, n_pad, scale.shape[-1], bpp, mul, BLK=blk, HEAD_DIM=d,
        HAS_MEAN=mean is not None, LINEAR=linear_z is not None, PREFETCH=prefetch, num_warps=warps,
        num_stages=stages)


def quantize_v_into(v: torch.Tensor, quant: dict) -> None:
    """Fill ``quant["v"]`` (a :func:`sage_quantize_triton` result made with ``v_later=True``) from ``v``."""
    _quantize_v_into(v, quant["v_scale"], quant["v"], "wgmma" if quant["v_wgmma_order"] else "natural")


def _quantize_v_into(v: torch.Tensor, v_scale: torch.Tensor, vt: torch.Tensor, v_order: str) -> None:
    """V [B, H, Lk, D] -> FP8 Vᵀ ``vt`` [B, H, D, Lk_pad] with the per-channel scale, keys in ``v_order``."""
    b, h, lk, d = v.shape
    lk_pad = vt.shape[-1]
    _quant_v_fp8_kernel[(lk_pad // 64, b * h)](
        v, v_scale, vt, v.stride(0), v.stride(1), v.stride(2), h, lk, lk_pad, BLK=64, HEAD_DIM=d,
        EMULATE=_interpreting(), WGMMA_ORDER=v_order == "wgmma", num_warps=4)


def requantize_v(quant: dict, v: torch.Tensor, v_order: str) -> dict:
    """``quant`` with Vᵀ written again in ``v_order`` (same scales, so the same values): what a fallback from the
    Gluon kernel to the Triton kernel needs, without quantizing Q and K again."""
    vt = torch.empty_like(quant["v"])
    _quantize_v_into(v, quant["v_scale"], vt, v_order)
    return {**quant, "v": vt, "v_wgmma_order": v_order == "wgmma"}


#: (BLOCK_M, BLOCK_N, num_warps, num_stages) per (sage, sparse, blk_q, blk_k); for tuning.
KERNEL_CONFIGS: dict[tuple[bool, bool, int, int], tuple] = {}


def _default_config(sage: bool, sparse: bool, blk_q: int, blk_k: int) -> tuple:
    cfg = KERNEL_CONFIGS.get((sage, sparse, blk_q, blk_k))
    if cfg is not None:
        return cfg
    block_n = blk_k if (sage or sparse) else 64
    block_m = blk_q if sparse else (64 if block_n == 128 else 128)
    warps = 8 if block_m == 128 else 4
    return block_m, block_n, warps, 3


def sage_kernel_for(q: torch.Tensor, blk_q: int, blk_k: int, config: tuple | None = None) -> str:
    """Which Sage attention kernel runs this call: "gluon" (Hopper, async wgmma) where it can, else "triton".
    An explicit Triton ``config`` (benchmarks, tuning) or ``TURBOCOMPILE_SAGE_KERNEL=triton`` picks Triton."""
    if config is not None or os.environ.get("TURBOCOMPILE_SAGE_KERNEL", "auto") == "triton":
        return "triton"
    from . import sage_attention_gluon

    return "gluon" if sage_attention_gluon.supported(q, blk_q, blk_k) is None else "triton"


def block_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lut: torch.Tensor | None,
                           blk_q: int, blk_k: int, sage: bool, linear: tuple | None = None,
                           quant: dict | None = None, config: tuple | None = None,
                           out: torch.Tensor | None = None, kernel: str | None = None) -> torch.Tensor:
    """Launch the attention kernel: dense (lut None) or block-sparse, Sage (INT8/FP8) or plain (input dtype).

    ``linear`` = (M [B·H, D, D] bf16, z [B·H, D] fp32, bias [D] fp32) fuses the SLA linear branch into the epilogue
    (the Gluon kernel takes φ(q)/den from ``quant["lin_phi"]`` where the Q quantizer wrote it).
    ``quant`` reuses a :func:`sage_quantize_triton` result. ``config`` = (BLOCK_M, BLOCK_N, warps, stages).
    ``out`` is written in place when given (tests poison it to prove every element is written). ``kernel`` picks
    the Sage kernel ("triton" or "gluon"; default :func:`sage_kernel_for`); a given ``quant`` must carry Vᵀ in the
    order that kernel reads.
    """
    b, h, lq, d = q.shape
    lk = k.shape[2]
    if sage:
        kernel = kernel or (("gluon" if quant["v_wgmma_order"] else "triton") if quant is not None
                            else sage_kernel_for(q, blk_q, blk_k, config))
        if kernel not in ("gluon", "triton"):
            raise InputError(f"unknown Sage attention kernel {kernel!r}: use 'gluon' or 'triton'")
        if kernel == "gluon":
            from .sage_attention_gluon import supported

            why = supported(q, blk_q, blk_k)
            if why is not None:
                raise UnsupportedShapeError(f"the Gluon attention kernel cannot run this call: {why}")
        if quant is None:
            quant = sage_quantize_triton(q, k, v, blk_q, blk_k, v_order="wgmma" if kernel == "gluon" else "natural")
        if quant["v_wgmma_order"] != (kernel == "gluon"):
            raise UnsupportedShapeError(f"the {kernel} attention kernel cannot read V quantized in "
                                        f"{'wgmma' if quant['v_wgmma_order'] else 'natural'} key order")
        if kernel == "gluon":
            from . import sage_attention_gluon as gluon_attn
            from .sage_attention_ws import dense_ws, sparse_ws

            o = torch.empty((b, h, lq, d), dtype=q.dtype, device=q.device) if out is None else out
            # the FA3-layout ping-pong kernels where they take the call (bit-equal to the Gluon kernel, faster)
            if lut is None and linear is None and dense_ws(quant, lq, lk, o, blk_q, blk_k) is not None:
                return o
            if lut is not None and sparse_ws(quant, lq, lk, o, lut, blk_q, blk_k, linear,
                                             quant.get("lin_phi")) is not None:
                return o
            try:
                return gluon_attn.sage_attention_gluon(quant, lq, lk, o, lut, blk_q, blk_k, q_raw=q, linear=linear,
                                                       lin_phi=quant.get("lin_phi"))
            except Exception as exc:
                if not gluon_attn.GUARD.launch_failed(exc):
                    raise
            quant = requantize_v(quant, v, "natural")  # the Triton kernel reads V in natural key order
            out = o
    cfg = config or _default_config(sage, lut is not None, blk_q, blk_k)
    block_m, block_n, warps, stages = cfg
    if lut is not None and (blk_q % block_m or blk_k % block_n):
        raise UnsupportedShapeError(f"tile {block_m}x{block_n} does not divide the sparse blocks {blk_q}x{blk_k}")
    if sage and blk_k % block_n:
        raise UnsupportedShapeError(f"tile width {block_n} does not divide the K quantization block {blk_k}")
    o = torch.empty((b, h, lq, d), dtype=q.dtype, device=q.device) if out is None else out
    if sage:
        qt = quant if quant is not None else sage_quantize_triton(q, k, v, blk_q, blk_k)
        qa, ka, va, qs, ks, vs = qt["q"], qt["k"], qt["v"], qt["q_scale"], qt["k_scale"], qt["v_scale"]
        v_strides = (va.stride(0), va.stride(1), 1, va.stride(2))
    else:
        qa, ka, va = q, k, v
        qs = ks = vs = o  # unused
        v_strides = (v.stride(0), v.stride(1), v.stride(2), 1)
    lin_m, lin_z, lin_b = linear if linear is not None else (o, o, o)
    lut_t = lut if lut is not None else o
    t = lut.shape[-1] if lut is not None else 0
    mq_lut = lut.shape[2] if lut is not None else 0
    grid = (triton.cdiv(lq, block_m), b * h)
    _attn_fwd_kernel[grid](
        qa, ka, va, qs, ks, vs, lut_t, o, q, lin_m, lin_z, lin_b,
        qa.stride(0), qa.stride(1), qa.stride(2), ka.stride(0), ka.stride(1), ka.stride(2),
        *v_strides, o.stride(0), o.stride(1), o.stride(2), q.stride(0), q.stride(1), q.stride(2),
        h, lq, lk, -(-lq // blk_q), -(-lk // blk_k), t, mq_lut, d ** -0.5 * LOG2E,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, BLKQ=blk_q, BLKK=blk_k, SAGE=sage, SPARSE=lut is not None,
        LINEAR=linear is not None, MASK_LOADS=not sage, EMULATE=_interpreting(), num_warps=warps,
        num_stages=stages)
    return o


# ----------------------------------------------------------------------------------------------------------------
# the op
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("turbocompile::sage_attention", mutates_args=())
def _sage_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blk_q: int = 128,
                       blk_k: int = 64) -> torch.Tensor:
    return sage_attention_reference(q, k, v, blk_q, blk_k)


@_sage_attention_op.register_kernel("cuda")
def _sage_attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blk_q: int = 128,
                         blk_k: int = 64) -> torch.Tensor:
    check_qkv(q, k, v, blk_q, blk_k)
    why = triton_supported(q, blk_q, blk_k)
    if why is not None:
        log.warning("sage_attention: %s; running the PyTorch reference (slow)", why)
        return sage_attention_reference(q, k, v, blk_q, blk_k)
    return block_attention_triton(q, k, v, None, blk_q, blk_k, sage=True)


@_sage_attention_op.register_fake
def _sage_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blk_q: int = 128,
                         blk_k: int = 64) -> torch.Tensor:
    check_qkv(q, k, v, blk_q, blk_k)
    return q.new_empty(q.shape)


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blk_q: int = 128, blk_k: int = 64) -> torch.Tensor:
    """Dense INT8/FP8 SageAttention of (B, H, L, D) tensors; Lk may differ from Lq. Same as the custom op."""
    return torch.ops.turbocompile.sage_attention(q, k, v, blk_q, blk_k)


if __name__ == "__main__":  # pragma: no cover - GPU benchmark entry point
    from turbocompile.kernels.sage_sla import bench_main

    bench_main(only="sage_attention")
