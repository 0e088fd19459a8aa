"""The ``sage_sla`` prologue on Hopper: the Q, K and V quantizers (and the statistics' finishing step) in one launch.

``sage_sla`` needs, before its attention kernel: one pass over K and V for the linear branch's statistics
(:func:`.sla.linear_branch_stats`, whose chunk partials a finishing step sums into M, z, the K mean and FP8 V's
scale), then int8 Q (with φ(q)/den for the linear branch), int8 K minus its mean, FP8 Vᵀ. At 1.3B@480p each of
those kernels runs 7-85 µs, so a launch boundary (the last wave draining, the next one filling, ~2-3 µs in a CUDA
graph) is a few percent of each, and the op was ~1% short of its 10x-cuDNN goal there (docs/kernels-attention.md).

``_quant_qkv_kernel`` does the three quantizers in one grid: each group of programs covers 128 tokens of one head,
its first 128/blk_q programs quantize Q blocks, the next 128/blk_k K blocks, the last two 64-key V blocks, so on an
SM the Q programs' exponentials run beside the V programs' plain copies. The int8 blocks are
:func:`.sage_attention._quant_int8_two_pass_block`, V's :func:`.sage_attention._quant_v_fp8_block`: the same bytes
as the separate launches (pooled means up to the fp32 summation order).

With ``FOLD`` the finishing step is folded in too: ``D/ROWS`` more programs per head compute M's rows (the first of
them also writes z, the K mean, V's amax and scale, for the attention kernel's epilogue), and every quantizer
program sums the few chunk partials it needs itself (z for Q, Σ K for K, max |V| for V) in the same order, so its
values are the finishing step's bit for bit.

Used by :func:`.sage_sla.sage_sla_triton` when the Gluon attention kernel runs (the path that takes φ(q)/den);
elsewhere the three launches of :func:`.sage_attention.sage_quantize_triton` remain.
"""
from __future__ import annotations

import torch

from .sage_attention import HAS_TRITON, LOG2E, _interpreting, _PAD
from .sla import _stats_partials, finished_stats_buffers, linear_branch_stats

__all__ = ["sage_sla_prologue", "QKV_QUANT_CONFIG", "FOLD_FINISH"]

#: (warps, (rows per chunk, loop unroll factor) of Q's two-pass int8 blocks with φ/den, the same for K's): the best
#: two-pass configs of the separate-launch sweeps (H200, 2026-11-27). None: three launches (and the finishing
#: launch). A/B through the op (H200, 14:30 UTC, graph replays): 1.3B@480p 1.169 against 1.175 ms, 14B@720p 17.68
#: against 17.66 (noise). (Q alone, without φ/den, made the dense ``sage_attention`` slower in one launch: 8.609
#: against 8.550 ms, so the dense op keeps its three.)
QKV_QUANT_CONFIG: tuple[int, tuple[int, int], tuple[int, int]] | None = (4, (8, 2), (16, 4))
#: Fold the statistics' finishing step into the same launch (no separate ``_linear_stats_finish_kernel``).
FOLD_FINISH = True
M_ROWS = 16  # rows of M per folded program

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .sage_attention import _quant_int8_two_pass_block, _quant_v_fp8_block
    from .sla import _chunk_max, _chunk_sum, _finish_moments, _fold_m_rows, _k_mean, _v_scale

    @triton.jit
    def _quantize_unit(u, bh, Q, K, V, K_MEAN, VSCALE, LIN_Z, QO, QS, QP, PHI, KO, KS, KP, VO, ZP, KSUMP, VMAXP,
                       stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh,
                       stride_vl, H, LQ, LK, LQ_PAD, LK_PAD, NQB, NKB, mul_q, BH, n_tokens,
                       BLK_Q: tl.constexpr, BLK_K: tl.constexpr, HEAD_DIM: tl.constexpr, CH_Q: tl.constexpr,
                       UNROLL_Q: tl.constexpr, CH_K: tl.constexpr, UNROLL_K: tl.constexpr, FOLD: tl.constexpr,
                       N_CHUNKS: tl.constexpr, EMULATE: tl.constexpr, WGMMA_ORDER: tl.constexpr):
        """Quantizer unit ``u`` of head ``bh``: units come in groups per 128 tokens, 128/BLK_Q Q blocks (writing
        φ/den), 128/BLK_K K blocks, two 64-key V blocks. The moments are summed from the chunk partials (FOLD) or
        read, finished by the separate launch."""
        cols = tl.arange(0, HEAD_DIM)
        GQ: tl.constexpr = 128 // BLK_Q
        GK: tl.constexpr = 128 // BLK_K
        GROUP: tl.constexpr = GQ + GK + 2
        g = u // GROUP
        r = u % GROUP
        if r < GQ:
            blk = g * GQ + r
            if blk < LQ_PAD // BLK_Q:
                if FOLD:
                    lin_z = _chunk_sum(ZP, bh, BH, HEAD_DIM, N_CHUNKS, True)
                else:
                    lin_z = tl.load(LIN_Z + bh * HEAD_DIM + cols)
                _quant_int8_two_pass_block(Q, 0.0, QO, QS, QP, lin_z, PHI, blk, bh, stride_qb, stride_qh,
                                           stride_ql, H, LQ, LQ_PAD, NQB, mul_q, BLK_Q, HEAD_DIM, CH_Q, False,
                                           True, UNROLL_Q)
        elif r < GQ + GK:
            blk = g * GK + (r - GQ)
            if blk < LK_PAD // BLK_K:
                if FOLD:
                    mean = _k_mean(KSUMP, bh, BH, n_tokens, HEAD_DIM, N_CHUNKS, True)
                else:
                    mean = tl.load(K_MEAN + bh * HEAD_DIM + cols)
                _quant_int8_two_pass_block(K, mean, KO, KS, KP, 0.0, PHI, blk, bh, stride_kb, stride_kh,
                                           stride_kl, H, LK, LK_PAD, NKB, 1.0, BLK_K, HEAD_DIM, CH_K, True,
                                           False, UNROLL_K)
        else:
            vb = g * 2 + (r - GQ - GK)
            if vb < LK_PAD // 64:
                if FOLD:
                    v_scale = _v_scale(_chunk_max(VMAXP, bh, BH, HEAD_DIM, N_CHUNKS, True))
                else:
                    v_scale = tl.load(VSCALE + bh * HEAD_DIM + cols)
                _quant_v_fp8_block(V, v_scale, VO, vb, bh, stride_vb, stride_vh, stride_vl, H, LK, LK_PAD, 64,
                                   HEAD_DIM, EMULATE, WGMMA_ORDER)

    @triton.jit
    def _quant_qkv_kernel(Q, K, V, K_MEAN, VSCALE, LIN_Z,
                          QO, QS, QP, PHI, KO, KS, KP, VO,
                          KVP, ZP, KSUMP, VMAXP, W, BIAS, M_OUT, VAMAX_OUT, BIAS_OUT,
                          stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                          stride_vb, stride_vh, stride_vl,
                          H, LQ, LK, LQ_PAD, LK_PAD, NQB, NKB, mul_q, BH, n_tokens,
                          BLK_Q: tl.constexpr, BLK_K: tl.constexpr, HEAD_DIM: tl.constexpr,
                          CH_Q: tl.constexpr, UNROLL_Q: tl.constexpr, CH_K: tl.constexpr, UNROLL_K: tl.constexpr,
                          FOLD: tl.constexpr, N_CHUNKS: tl.constexpr, ROWS: tl.constexpr,
                          EMULATE: tl.constexpr, WGMMA_ORDER: tl.constexpr):
        """Program ``(u, bh)``: with FOLD, u < D/ROWS computes rows of head bh's M (and u = 0 writes its z, K
        mean, V amax and scale into LIN_Z, K_MEAN, VAMAX_OUT, VSCALE for the attention kernel); every other
        program is a quantizer unit (:func:`_quantize_unit`)."""
        u = tl.program_id(0)
        bh = tl.program_id(1)
        if FOLD:
            GM: tl.constexpr = HEAD_DIM // ROWS
            if u < GM:
                _fold_m_rows(KVP, W, M_OUT, bh, u * ROWS, BH, HEAD_DIM, ROWS, N_CHUNKS, EMULATE)
                if u == 0:
                    _finish_moments(ZP, KSUMP, VMAXP, BIAS, LIN_Z, K_MEAN, VAMAX_OUT, VSCALE, BIAS_OUT, bh, BH,
                                    n_tokens, HEAD_DIM, N_CHUNKS)
            else:
                _quantize_unit(u - GM, bh, Q, K, V, K_MEAN, VSCALE, LIN_Z, QO, QS, QP, PHI, KO, KS, KP, VO, ZP,
                               KSUMP, VMAXP, stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                               stride_vb, stride_vh, stride_vl, H, LQ, LK, LQ_PAD, LK_PAD, NQB, NKB, mul_q, BH,
                               n_tokens, BLK_Q, BLK_K, HEAD_DIM, CH_Q, UNROLL_Q, CH_K, UNROLL_K, FOLD, N_CHUNKS,
                               EMULATE, WGMMA_ORDER)
        else:
            _quantize_unit(u, bh, Q, K, V, K_MEAN, VSCALE, LIN_Z, QO, QS, QP, PHI, KO, KS, KP, VO, ZP,
                           KSUMP, VMAXP, stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                           stride_vb, stride_vh, stride_vl, H, LQ, LK, LQ_PAD, LK_PAD, NQB, NKB, mul_q, BH,
                           n_tokens, BLK_Q, BLK_K, HEAD_DIM, CH_Q, UNROLL_Q, CH_K, UNROLL_K, FOLD, N_CHUNKS,
                           EMULATE, WGMMA_ORDER)


def _quant_buffers(q: torch.Tensor, k: torch.Tensor, blk_q: int, blk_k: int) -> dict:
    """The quantized tensors' buffers, as :func:`.sage_attention.sage_quantize_triton` returns them."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    dev = q.device
    lq_pad, lk_pad = -(-lq // _PAD) * _PAD, -(-lk // _PAD) * _PAD
    nq, nk = -(-lq // blk_q), -(-lk // blk_k)
    return {
        "q": torch.empty((b, h, lq_pad, d), dtype=torch.int8, device=dev),
        "q_scale": torch.empty((b, h, nq), dtype=torch.float32, device=dev),
        "q_pool": torch.empty((b, h, nq, d), dtype=torch.float32, device=dev),
        "k": torch.empty((b, h, lk_pad, d), dtype=torch.int8, device=dev),
        "k_scale": torch.empty((b, h, nk), dtype=torch.float32, device=dev),
        "k_pool": torch.empty((b, h, nk, d), dtype=torch.float32, device=dev),
        "v": torch.empty((b, h, d, lk_pad), dtype=torch.float8_e4m3fn, device=dev),
        "lin_phi": torch.empty((b, h, lq_pad, d), dtype=torch.bfloat16, device=dev),
    }


def sage_sla_prologue(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor,
                      proj_bias: torch.Tensor, blk_q: int, blk_k: int, v_order: str = "wgmma") -> tuple[tuple, dict]:
    """``sage_sla``'s linear statistics and Sage quantization, with φ(q)/den: ``(lin, quant)`` as
    :func:`.sla.linear_branch_stats` (its first element) and :func:`.sage_attention.sage_quantize_triton` (with
    ``linear_z``) return them. Two launches (statistics pass, then :data:`QKV_QUANT_CONFIG`'s one launch with
    the finishing step folded in) or, with FOLD_FINISH off, three; five with QKV_QUANT_CONFIG None."""
    from .sage_attention import sage_quantize_triton

    if QKV_QUANT_CONFIG is None or 128 % blk_q or 128 % blk_k:
        lin, moments = linear_branch_stats(k, v, proj_weight, proj_bias)
        return lin, sage_quantize_triton(q, k, v, blk_q, blk_k, **moments, v_order=v_order, linear_z=lin[1])
    b, h, lq, d = q.shape
    lk = k.shape[2]
    if FOLD_FINISH:
        kv, zp, ksump, vmaxp = _stats_partials(k, v)
        lin, moments = finished_stats_buffers(k)
    else:
        lin, moments = linear_branch_stats(k, v, proj_weight, proj_bias)
        kv = zp = ksump = vmaxp = lin[1]  # not read
    m, z, bias = lin
    out = _quant_buffers(q, k, blk_q, blk_k)
    out.update(k_mean=moments["k_mean"], v_scale=moments["v_scale"], v_wgmma_order=v_order == "wgmma")
    lq_pad, lk_pad = out["q"].shape[2], out["k"].shape[2]
    warps, (ch_q, unroll_q), (ch_k, unroll_k) = QKV_QUANT_CONFIG
    fold_programs = d // M_ROWS if FOLD_FINISH else 0
    groups = max(lq_pad, lk_pad) // 128
    _quant_qkv_kernel[(fold_programs + groups * (128 // blk_q + 128 // blk_k + 2), b * h)](
        q, k, v, moments["k_mean"], moments["v_scale"], z,
        out["q"], out["q_scale"], out["q_pool"], out["lin_phi"], out["k"], out["k_scale"], out["k_pool"], out["v"],
        kv, zp, ksump, vmaxp, proj_weight.contiguous(), proj_bias.contiguous(), m, moments["v_amax"], bias,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        h, lq, lk, lq_pad, lk_pad, out["q_scale"].shape[-1], out["k_scale"].shape[-1], d ** -0.5 * LOG2E, b * h,
        float(lk), BLK_Q=blk_q, BLK_K=blk_k, HEAD_DIM=d, CH_Q=min(ch_q, blk_q), UNROLL_Q=unroll_q,
        CH_K=min(ch_k, blk_k), UNROLL_K=unroll_k, FOLD=FOLD_FINISH, N_CHUNKS=kv.shape[0] if FOLD_FINISH else 1,
        ROWS=M_ROWS, EMULATE=_interpreting(), WGMMA_ORDER=v_order == "wgmma", num_warps=warps)
    return lin, out
