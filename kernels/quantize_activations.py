"""Fused activation quantization for the W8A8 linears: one read of ``x``, the 8-bit values and fp32 scales written in
the same pass.

Quantizing activations with plain torch ops (abs, amax, div, round, clamp, cast: six passes over ``x``) costs more
than the 8-bit GEMM saves, so each scheme gets a single Triton kernel here. Four granularities:

========================  =================================  ======================  =============================
function                  values                             scale shape             used by
========================  =================================  ======================  =============================
``quant_int8_block``      int8, 128 tokens x 128 channels    [ceil(M/128), ceil(K/128)]  ``int8-block`` (the paper's)
``quant_int8_row``        int8, one scale per token          [M]                     ``int8-row``
``quant_fp8_row``         float8_e4m3fn, one per token       [M]                     ``fp8-row``
``quant_fp8_group``       float8_e4m3fn, 1 x 128 groups      [ceil(K/128), M] (K-major)  ``fp8-block``
========================  =================================  ======================  =============================

Each has a ``*_ref`` twin in plain PyTorch that defines the math (CPU path and test oracle). INT8 block math is
:func:`turbocompile.quantization.quantize_int8_block` (TurboDiffusion's: ``q = rne(x * 128/amax)`` saturated to
[-128, 127], ``scale = amax/128``, amax floored at 1e-8); the per-row INT8 scheme uses the symmetric 127 range.
The ``fp8-block`` scales come out K-major (``[K/128, M]`` contiguous) because that is the column-major layout that
``torch.nn.functional.scaled_mm`` wants for a 1x128 scaled A; ``.t()`` gives the logical ``[M, K/128]`` view.
"""
from __future__ import annotations

import logging
import math
import os

import torch

from turbocompile.quantization import quantize_int8_block

log = logging.getLogger(__name__)

try:  # Triton is optional: without it every caller uses the references.
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

BLOCK = 128
INT8_ROW_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
AMAX_FLOOR = 1e-8
#: The Triton interpreter (CPU tests) lacks libdevice.rint; there the kernels round with the 1.5 * 2**23 trick
#: (exact RNE for |v| < 2**22, and numpy never fuses the multiply into the add). On the GPU they use rint, since
#: NVPTX would contract ``x * inv + C`` into one FMA and break bit-equality with the reference.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def as_2d(x: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` -> ``[M, K]`` with unit stride along K (a view where possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


# ----------------------------------------------------------------------------------------------------------------
# References (CPU path, and the definition every kernel is tested against)
# ----------------------------------------------------------------------------------------------------------------
def quant_int8_block_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 block INT8 (the paper's activation quantization): int8 [M, K], fp32 [ceil(M/128), ceil(K/128)]."""
    return quantize_int8_block(as_2d(x))


def _inv(qmax: float, amax: torch.Tensor) -> torch.Tensor:
    """``qmax / amax`` correctly rounded (``float / tensor`` in torch is reciprocal-then-multiply: two roundings)."""
    return torch.full_like(amax, qmax) / amax


def _row_amax(x2: torch.Tensor) -> torch.Tensor:
    return x2.float().abs().amax(dim=1).clamp_min(AMAX_FLOOR)


def quant_int8_row_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric INT8: ``q = rne(x * 127/amax)``, ``scale = amax/127``; int8 [M, K], fp32 [M]."""
    x2 = as_2d(x)
    amax = _row_amax(x2)
    q = torch.round(x2.float() * _inv(INT8_ROW_MAX, amax)[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, amax / INT8_ROW_MAX


def quant_fp8_row_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 e4m3: ``q = e4m3(x * 448/amax)``, ``scale = amax/448``; float8_e4m3fn [M, K], fp32 [M]."""
    x2 = as_2d(x)
    amax = _row_amax(x2)
    q = (x2.float() * _inv(FP8_MAX, amax)[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, amax / FP8_MAX


def quant_fp8_group_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 in 1x128 groups along K; returns float8 [M, K] and fp32 scales K-major ``[ceil(K/128), M]``."""
    x2 = as_2d(x).float()
    m, k = x2.shape
    kb = math.ceil(k / BLOCK)
    xp = torch.nn.functional.pad(x2, (0, kb * BLOCK - k)).view(m, kb, BLOCK)
    amax = xp.abs().amax(dim=2).clamp_min(AMAX_FLOOR)  # [M, Kb]
    q = (xp * _inv(FP8_MAX, amax)[:, :, None]).clamp_(-FP8_MAX, FP8_MAX).view(m, kb * BLOCK)[:, :k]
    return q.to(torch.float8_e4m3fn).contiguous(), (amax / FP8_MAX).t().contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def rne(v, INTERP: tl.constexpr):
        """Round half to even (exact for |v| < 2**22)."""
        if INTERP:
            return (v + 12582912.0) - 12582912.0
        else:
            return libdevice.rint(v)

    @triton.jit
    def round_bits(v, DROP: tl.constexpr):
        """Round fp32 ``v`` to nearest even with the low ``DROP`` mantissa bits cleared (no-op for DROP == 0).

        The Triton interpreter's narrowing casts (to bf16, fp16, fp8) round half up and lose the carry into the
        exponent (31.9 -> 16 in e4m3): under TRITON_INTERPRET the kernels pre-round with this so that the cast
        only drops zero bits. Normal numbers only, which is all the CPU tests need.
        """
        if DROP > 0:
            bits = v.to(tl.int32, bitcast=True)
            bits = (bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)) & (-(1 << DROP))
            v = bits.to(tl.float32, bitcast=True)
        return v

    @triton.jit
    def to_e4m3(v, INTERP: tl.constexpr):
        """Cast to float8_e4m3fn rounding to nearest even (v already clamped to +-448)."""
        if INTERP:
            v = round_bits(v, 20)
        return v.to(tl.float8e4nv)

    @triton.jit
    def load_tile(x_ptr, offs_m, offs_k, M, K, stride_xm):
        """Masked fp32 load of rows ``offs_m`` x channels ``offs_k`` (int64 row offsets: M*K may pass 2**31)."""
        mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        rows = offs_m.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        return x, rows, mask

    @triton.jit
    def _quant_int8_block_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm,
                                 BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, INTERP: tl.constexpr):
        """One program per 128 x (GROUPS x 128) slab: load once, amax per 128x128 block, scale, round, store.

        More than one block per program puts more bytes in flight per program (the kernel is latency-bound at
        one 32 KiB tile per program)."""
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = pid_k * (GROUPS * 128) + tl.arange(0, GROUPS * 128)
        x, rows, mask = load_tile(x_ptr, offs_m, offs_k, M, K, stride_xm)
        x3 = tl.reshape(x, [BLOCK_M, GROUPS, 128])
        amax = tl.maximum(tl.max(tl.max(tl.abs(x3), axis=2), axis=0), 1e-8)  # [GROUPS]
        inv = tl.math.div_rn(tl.full([GROUPS], 128.0, tl.float32), amax)
        v = tl.reshape(x3 * inv[None, :, None], [BLOCK_M, GROUPS * 128])
        q = tl.minimum(tl.maximum(rne(v, INTERP), -128.0), 127.0).to(tl.int8)
        tl.store(q_ptr + rows * stride_qm + offs_k[None, :], q, mask=mask)
        offs_g = pid_k * GROUPS + tl.arange(0, GROUPS)
        tl.store(s_ptr + pid_m * stride_sm + offs_g, amax / 128.0, mask=offs_g * 128 < K)

    @triton.jit
    def _quant_row_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm,
                          QMAX: tl.constexpr, IS_FP8: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                          INTERP: tl.constexpr):
        """``ROWS`` whole rows per program held in registers (BLOCK_K >= K): one read of x."""
        pid = tl.program_id(0)
        offs_m = pid * ROWS + tl.arange(0, ROWS)
        offs_k = tl.arange(0, BLOCK_K)
        x, rows, mask = load_tile(x_ptr, offs_m, offs_k, M, K, stride_xm)
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-8)
        inv = tl.math.div_rn(tl.full([ROWS], QMAX, tl.float32), amax)
        v = x * inv[:, None]
        if IS_FP8:
            q = to_e4m3(tl.minimum(tl.maximum(v, -QMAX), QMAX), INTERP)
        else:
            q = tl.minimum(tl.maximum(rne(v, INTERP), -QMAX), QMAX).to(tl.int8)
        tl.store(q_ptr + rows * stride_qm + offs_k[None, :], q, mask=mask)
        tl.store(s_ptr + offs_m, amax / QMAX, mask=offs_m < M)

    @triton.jit
    def _quant_fp8_group_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sk,
                                BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, INTERP: tl.constexpr):
        """``BLOCK_M`` rows x ``GROUPS`` groups of 128 channels per program; scales stored K-major."""
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = pid_k * (GROUPS * 128) + tl.arange(0, GROUPS * 128)
        x, rows, mask = load_tile(x_ptr, offs_m, offs_k, M, K, stride_xm)
        x3 = tl.reshape(x, [BLOCK_M, GROUPS, 128])
        amax = tl.maximum(tl.max(tl.abs(x3), axis=2), 1e-8)  # [BLOCK_M, GROUPS]
        inv = tl.math.div_rn(tl.full([BLOCK_M, GROUPS], 448.0, tl.float32), amax)
        v = tl.reshape(x3 * inv[:, :, None], [BLOCK_M, GROUPS * 128])
        q = to_e4m3(tl.minimum(tl.maximum(v, -448.0), 448.0), INTERP)
        tl.store(q_ptr + rows * stride_qm + offs_k[None, :], q, mask=mask)
        offs_g = pid_k * GROUPS + tl.arange(0, GROUPS)
        s_mask = (offs_m[:, None] < M) & (offs_g[None, :] * 128 < K)
        tl.store(s_ptr + offs_g[None, :].to(tl.int64) * stride_sk + offs_m[:, None], amax / 448.0, mask=s_mask)


def interp_round_bits(dtype: torch.dtype) -> int:
    """Mantissa bits a kernel must pre-round before casting fp32 to ``dtype`` (non-zero only when interpreting)."""
    if not INTERPRET:
        return 0
    return {torch.bfloat16: 16, torch.float16: 13}.get(dtype, 0)


def _need_triton() -> None:
    if triton is None:
        from turbocompile.errors import BackendUnavailableError
        raise BackendUnavailableError("Triton is not installed: install triton, or use the *_ref functions")


#: (128-channel blocks per program, warps) of the int8-block quantizer; the GPU benchmark sweeps
#: ``INT8_BLOCK_QUANT_SWEEP`` and docs/kernels-linear.md has the numbers.
INT8_BLOCK_QUANT_CONFIG = (1, 4)  # H200: 4 warps 48 / 237 µs, 8 warps 52 / 264 µs at K = 1536 / 8960, M = 32760
INT8_BLOCK_QUANT_SWEEP = [(1, 4), (1, 8), (1, 2), (2, 8), (4, 16)]


def quant_int8_block(x: torch.Tensor, config: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`quant_int8_block_ref` (bit-identical): int8 [M, K], fp32 [ceil(M/128), ceil(K/128)].

    ``config`` = (128-channel blocks per program, warps), default ``INT8_BLOCK_QUANT_CONFIG``."""
    _need_triton()
    groups, warps = config or INT8_BLOCK_QUANT_CONFIG
    x2 = as_2d(x)
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((math.ceil(m / BLOCK), math.ceil(k / BLOCK)), dtype=torch.float32, device=x.device)
    grid = (s.shape[0], triton.cdiv(s.shape[1], groups))
    _quant_int8_block_kernel[grid](x2, q, s, m, k, x2.stride(0), q.stride(0), s.stride(0),
                                   BLOCK_M=BLOCK, GROUPS=groups, INTERP=INTERPRET, num_warps=warps)
    return q, s


def _quant_row(x: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _need_triton()
    x2 = as_2d(x)
    m, k = x2.shape
    block_k = triton.next_power_of_2(k)
    if block_k > 16384:
        from turbocompile.errors import UnsupportedShapeError
        raise UnsupportedShapeError(f"per-row quantization supports K <= 16384, got K={k}: use the int8-block scheme")
    rows = max(1, min(16, 4096 // block_k))
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    warps = 8 if block_k >= 4096 else 4
    _quant_row_kernel[(triton.cdiv(m, rows),)](x2, q, s, m, k, x2.stride(0), q.stride(0),
                                               QMAX=FP8_MAX if fp8 else INT8_ROW_MAX, IS_FP8=fp8,
                                               ROWS=rows, BLOCK_K=block_k, INTERP=INTERPRET,
                                               num_warps=warps)
    return q, s


def quant_int8_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`quant_int8_row_ref` (bit-identical)."""
    return _quant_row(x, fp8=False)


def quant_fp8_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`quant_fp8_row_ref` (same values; e4m3 cast on the GPU rounds to nearest even)."""
    return _quant_row(x, fp8=True)


def quant_fp8_group(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`quant_fp8_group_ref`: float8 [M, K] and K-major fp32 scales ``[ceil(K/128), M]``."""
    _need_triton()
    x2 = as_2d(x)
    m, k = x2.shape
    kb = math.ceil(k / BLOCK)
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((kb, m), dtype=torch.float32, device=x.device)
    groups = 4 if kb >= 4 else triton.next_power_of_2(kb)
    block_m = 16
    grid = (triton.cdiv(m, block_m), triton.cdiv(kb, groups))
    _quant_fp8_group_kernel[grid](x2, q, s, m, k, x2.stride(0), q.stride(0), s.stride(0),
                                  BLOCK_M=block_m, GROUPS=groups, INTERP=INTERPRET, num_warps=4)
    return q, s


#: scheme -> (triton function, reference)
QUANTIZERS = {
    "int8-block": (quant_int8_block, quant_int8_block_ref),
    "int8-row": (quant_int8_row, quant_int8_row_ref),
    "fp8-row": (quant_fp8_row, quant_fp8_row_ref),
    "fp8-block": (quant_fp8_group, quant_fp8_group_ref),
}
