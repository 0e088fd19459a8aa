"""Row- and group-scaled 8-bit GEMMs: ``int8-row``, ``fp8-row`` and the cuBLAS path of ``fp8-block``.

With one scale per activation row and one per weight row (output channel), the scales factor out of the K sum:
``out[m, n] = sa[m] * sb[n] * sum_k A[m, k] B[n, k]``. The integer (or fp32, for e4m3) accumulator runs over all
of K on the tensor cores and the scales cost one multiply per output element in the epilogue, which is why these
schemes run close to the 8-bit peak while the 128x128 block scheme pays a rescale per K block.

Backends:

- ``triton``: :func:`gemm_rowscale` (this file), int8 or e4m3 operands, bias and cast fused in the epilogue.
- ``cublas``: ``torch._scaled_mm`` per-row (fp8-row), ``torch._int_mm`` + a torch epilogue (int8-row, kept for
  the measured comparison: the int32 [M, N] round trip costs a full extra pass), and
  ``torch.nn.functional.scaled_mm`` blockwise 1x128 x 128x128 (fp8-block).
"""
from __future__ import annotations

import logging
import math

import torch

from turbocompile.errors import UnsupportedShapeError
from turbocompile.kernels.gemm_int8_block import BLOCK, GemmConfig, launch_tma, residual_args, tma_ok
from turbocompile.kernels.quantize_activations import interp_round_bits

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl

    from turbocompile.kernels.gemm_int8_block import (epilogue_activation, epilogue_residual, load_k_step,
                                                       tile_operands)
    from turbocompile.kernels.quantize_activations import round_bits
except ImportError:  # pragma: no cover
    triton = None
    tl = None

#: Named configurations tried by the benchmark; the first is the default (docs/kernels-linear.md).
ROW_CONFIGS: dict[str, GemmConfig] = {
    "128x256_w8_s3": GemmConfig(block_n=256, num_stages=3),
    "128x256_w8_s4": GemmConfig(block_n=256, num_stages=4),
    "tma_128x256_w8_s3": GemmConfig(block_n=256, num_stages=3, tma=True),
    "tma_128x256_w8_s3_noflat": GemmConfig(block_n=256, num_stages=3, tma=True, flatten=False),
    "tma_128x128_w8_s4_noflat": GemmConfig(num_stages=4, tma=True, flatten=False),
}
DEFAULT_ROW_CONFIG = "128x256_w8_s3"  # pointer-load fallback where TMA cannot be used


def row_config_for(k: int) -> str:
    """Measured on an H200 (docs/kernels-linear.md): the persistent TMA kernel wins everywhere; flattening the
    tile loop into the K loop helps short K (prefetch during the epilogue) and costs a little at long K."""
    return "tma_128x256_w8_s3" if k <= 5120 else "tma_128x256_w8_s3_noflat"
LAST_COMPILED = None


if triton is not None:

    @triton.jit
    def _gemm_rowscale_kernel(
        a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr,
        M, N, K, stride_am, stride_bn, stride_cm,
        HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        RESCALE: tl.constexpr, OUT_ROUND: tl.constexpr, ACT: tl.constexpr = 0,
        res_ptr=None, gate_ptr=None, stride_rm=0, rows_per_gate=1, RESIDUAL: tl.constexpr = 0,
    ):
        pid_m, pid_n, offs_m, offs_n, offs_k, rows_a, rows_b, a_ptrs, b_ptrs = tile_operands(
            a_ptr, b_ptr, M, N, stride_am, stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
        if a_ptr.dtype.element_ty == tl.int8:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(0, tl.cdiv(K, BLOCK_K)):
            a, b = load_k_step(a_ptrs, b_ptrs, offs_k, K - kt * BLOCK_K, EVEN_K)
            acc = tl.dot(a, b, acc, out_dtype=acc.dtype)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        sa = tl.load(sa_ptr + rows_a)
        sb = tl.load(sb_ptr + rows_b)
        out = acc.to(tl.float32) * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        out = epilogue_activation(out, c_ptr, OUT_ROUND, ACT)
        out = epilogue_residual(out, c_ptr, res_ptr, gate_ptr, offs_m, offs_n, M, N, stride_rm, rows_per_gate,
                                OUT_ROUND, RESIDUAL)
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, round_bits(out, OUT_ROUND).to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _check_operands(a_q: torch.Tensor, w_q: torch.Tensor) -> tuple[int, int, int]:
    m, k = a_q.shape
    n, kw = w_q.shape
    if kw != k or a_q.dtype != w_q.dtype:
        raise UnsupportedShapeError(f"GEMM operands disagree: A {tuple(a_q.shape)} {a_q.dtype}, "
                                    f"B {tuple(w_q.shape)} {w_q.dtype}; quantize both with the same scheme")
    return m, n, k


def gemm_rowscale(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype,
                  config: GemmConfig | str | None = None, act: int = 0, residual: torch.Tensor | None = None,
                  gate: torch.Tensor | None = None) -> torch.Tensor:
    """Triton ``(A @ B^T) * sa[:, None] * sb[None, :] + bias`` for int8 or e4m3 A [M, K], B [N, K]; scales fp32.
    ``act`` 1: GELU (tanh) of that, as ``aten.gelu`` computes it on the rounded output, in the epilogue; then
    with ``residual`` [M, N] ``residual + that`` (times ``gate`` fp32 [G, N] if given), see ``residual_args``."""
    if triton is None:
        from turbocompile.errors import BackendUnavailableError
        raise BackendUnavailableError("Triton is not installed: the row-scaled Triton GEMM needs it")
    m, n, k = _check_operands(a_q, w_q)
    if config is None:  # fp32 output: the TMA kernel's 128x256 fp32 epilogue tile does not fit in shared memory
        config = row_config_for(k) if out_dtype != torch.float32 else DEFAULT_ROW_CONFIG
    cfg = ROW_CONFIGS[config] if not isinstance(config, GemmConfig) else config
    out = torch.empty((m, n), dtype=out_dtype, device=a_q.device)
    if m == 0:
        return out
    res = residual_args(out, residual, gate)
    global LAST_COMPILED
    if cfg.tma and tma_ok(a_q, w_q):
        LAST_COMPILED = launch_tma(a_q, w_q, out, a_scale, w_scale, bias, (0, 0, 0, 0), cfg,
                                   a_per_row=False, row_scaled=True, act=act, residual=res)
        return out
    if cfg.tma:
        cfg = ROW_CONFIGS[DEFAULT_ROW_CONFIG]
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    LAST_COMPILED = _gemm_rowscale_kernel[grid](
        a_q, w_q, out, a_scale, w_scale, bias if bias is not None else out,
        m, n, k, a_q.stride(0), w_q.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=k % cfg.block_k == 0,
        OUT_ROUND=interp_round_bits(out_dtype), **({"ACT": act} if act else {}), **res, **cfg.launch_kwargs())
    return out


def cublas_ok(m: int, n: int, k: int) -> bool:
    """Shapes the cuBLASLt 8-bit paths accept (dims multiples of 16, more than 16 rows for ``_int_mm``)."""
    return m > 16 and n % 16 == 0 and k % 16 == 0


def int8_row_int_mm(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``torch._int_mm`` then the scale/bias epilogue in torch (an extra int32 [M, N] round trip)."""
    acc = torch._int_mm(a_q, w_q.t())
    out = acc.float().mul_(a_scale[:, None]).mul_(w_scale[None, :])
    if bias is not None:
        out += bias.float()
    return out.to(out_dtype)


def fp8_row_scaled_mm(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                      bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """cuBLASLt per-row FP8 GEMM with bias in its epilogue (bf16 out, cast after if another dtype is wanted)."""
    out = torch._scaled_mm(a_q, w_q.t(), scale_a=a_scale[:, None], scale_b=w_scale[None, :],
                           bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16)
    return out if out_dtype == torch.bfloat16 else out.to(out_dtype)


def fp8_block_scaled_mm(a_q: torch.Tensor, a_scale_kmajor: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``F.scaled_mm`` blockwise: A e4m3 1x128 groups (scales column-major [M, K/128]), B 128x128 blocks.

    cuBLAS wants the weight scales as a column-major ``[L4, N/128]`` with ``L4 = round_up(K/128, 4)``, so the
    [N/128, K/128] table is zero-padded along K blocks first (a few KB).
    """
    from torch.nn.functional import ScalingType, scaled_mm

    kb = w_scale.shape[1]
    l4 = 4 * math.ceil(kb / 4)
    sb = torch.nn.functional.pad(w_scale, (0, l4 - kb)) if l4 != kb else w_scale.contiguous()
    out = scaled_mm(a_q, w_q.t(), a_scale_kmajor.t(), ScalingType.BlockWise1x128, sb.t(),
                    ScalingType.BlockWise128x128, output_dtype=torch.bfloat16)
    if bias is not None:
        out += bias.to(out.dtype)
    return out if out_dtype == torch.bfloat16 else out.to(out_dtype)


def fp8_block_cublas_ok(m: int, n: int, k: int) -> bool:
    """F.scaled_mm blockwise needs whole 128 blocks along K and N; cuBLASLt (torch 2.11, H200) refused M=4173
    (CUBLAS_STATUS_NOT_SUPPORTED) and ran M=32760, so M must be a multiple of 8 as well."""
    return cublas_ok(m, n, k) and k % BLOCK == 0 and n % BLOCK == 0 and m % 8 == 0
