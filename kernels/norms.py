"""Fused norm ops of the Wan block: LayerNorm + adaLN modulation, affine LayerNorm, RMSNorm over the hidden dim.

Each is memory-bound: one read of ``x`` and one write of the result (plus the per-token shift/scale for Wan2.2
TI2V), fp32 statistics in registers. Eager PyTorch runs ``x.float()``, the norm, ``1 + scale``, the multiply, the
add and the cast as separate passes; here it is a single kernel, so the target is the device-to-device copy
bandwidth (docs/kernels-linear.md has the measured fraction).

Ops (``torch.ops.turbocompile.*``), all fp32 math and output in ``x.dtype``:

- ``layernorm_modulate(x [B, L, D], shift, scale, eps)``: ``LN_noaffine(x) * (1 + scale) + shift`` with
  shift/scale fp32 broadcastable to [B, L, D] ([B, 1, D] per sample, or [B, L, D] per token).
- ``layer_norm_affine(x [..., D], weight [D], bias [D], eps)``: ``LN(x, weight, bias)``.
- ``rms_norm(x [..., D], weight [D], eps)``: ``x * rsqrt(mean(x^2) + eps) * weight``.
"""
from __future__ import annotations

import logging

import torch

from turbocompile.errors import InputError, UnsupportedShapeError
from turbocompile.kernels.quantize_activations import interp_round_bits

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl

    from turbocompile.kernels.quantize_activations import round_bits
except ImportError:  # pragma: no cover
    triton = None
    tl = None

MAX_D = 16384  # one row is held in registers


# ----------------------------------------------------------------------------------------------------------------
# References (CPU implementation and test oracle)
# ----------------------------------------------------------------------------------------------------------------
def layernorm_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """What diffusers' Wan block computes for norm1/norm3: fp32 LayerNorm without affine, then adaLN."""
    y = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return (y * (1 + scale.float()) + shift.float()).to(x.dtype)


def layer_norm_affine_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 LayerNorm with weight and bias (the cross-attention pre-norm)."""
    return torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 RMSNorm over the whole last dim (Wan's q/k norms span all heads)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel: one row family, three modes
# ----------------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _norm_kernel(x_ptr, mul_ptr, add_ptr, out_ptr, R, L, D, stride_x, stride_o,
                     mul_sb, mul_sl, add_sb, add_sl, eps,
                     CENTER: tl.constexpr, ONE_PLUS: tl.constexpr, HAS_ADD: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_D: tl.constexpr, OUT_ROUND: tl.constexpr):
        """``y = norm(x) * (ONE_PLUS + mul[b, l]) + add[b, l]``; row r is (b, l) = divmod(r, L)."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < R
        mask = row_ok[:, None] & (cols[None, :] < D)
        r64 = rows.to(tl.int64)
        x = tl.load(x_ptr + r64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if CENTER:
            mean = tl.sum(x, axis=1) / D
            x = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        y = x * rstd[:, None]
        b = r64 // L
        l = r64 % L
        m = tl.load(mul_ptr + (b * mul_sb + l * mul_sl)[:, None] + cols[None, :], mask=mask, other=0.0)
        if ONE_PLUS:
            y = y * (1.0 + m)
        else:
            y = y * m
        if HAS_ADD:
            y += tl.load(add_ptr + (b * add_sb + l * add_sl)[:, None] + cols[None, :], mask=mask, other=0.0)
        y = round_bits(y, OUT_ROUND)
        tl.store(out_ptr + r64[:, None] * stride_o + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def _bl_strides(p: torch.Tensor, b: int, l: int, d: int, name: str) -> tuple[torch.Tensor, int, int]:
    """Expand a parameter to [B, L, D] (as a view) and return it with its batch and token strides."""
    try:
        pe = p.float().expand(b, l, d)
    except RuntimeError:
        raise UnsupportedShapeError(f"{name} of shape {tuple(p.shape)} does not broadcast to x's [{b}, {l}, {d}]; "
                                    "pass [B, 1, D] or [B, L, D]") from None
    if pe.stride(2) != 1:
        pe = pe.contiguous()
    return pe, pe.stride(0), pe.stride(1)


def _launch(x: torch.Tensor, mul: torch.Tensor, add: torch.Tensor | None, eps: float, center: bool,
            one_plus: bool) -> torch.Tensor:
    d = x.shape[-1]
    if d > MAX_D:
        raise UnsupportedShapeError(f"fused norms hold a row in registers: D={d} > {MAX_D}; use the reference")
    x3 = x.reshape(x.shape[0] if x.ndim == 3 else 1, -1, d)
    bsz, seq = x3.shape[0], x3.shape[1]
    x2 = x3.reshape(-1, d)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return out.reshape(x.shape)
    mul, mul_sb, mul_sl = _bl_strides(mul, bsz, seq, d, "scale/weight")
    has_add = add is not None
    if has_add:
        add, add_sb, add_sl = _bl_strides(add, bsz, seq, d, "shift/bias")
    else:
        add, add_sb, add_sl = mul, 0, 0
    block_d = triton.next_power_of_2(d)
    rows = max(1, min(8, 4096 // block_d))
    warps = 8 if block_d >= 4096 else 4
    _norm_kernel[(triton.cdiv(x2.shape[0], rows),)](
        x2, mul, add, out, x2.shape[0], seq, d, x2.stride(0), out.stride(0),
        mul_sb, mul_sl, add_sb, add_sl, float(eps),
        CENTER=center, ONE_PLUS=one_plus, HAS_ADD=has_add, ROWS=rows, BLOCK_D=block_d,
        OUT_ROUND=interp_round_bits(x.dtype), num_warps=warps)
    return out.reshape(x.shape)


def _check_x(op: str, x: torch.Tensor, ndim3: bool = False) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise InputError(f"{op}: x must be bf16/fp16/fp32, got {x.dtype}")
    if ndim3 and x.ndim != 3:
        raise UnsupportedShapeError(f"{op}: x must be [B, L, D], got shape {tuple(x.shape)}")


def _check_vec(op: str, name: str, p: torch.Tensor, d: int) -> None:
    if tuple(p.shape) != (d,):
        raise UnsupportedShapeError(f"{op}: {name} must have shape ({d},), got {tuple(p.shape)}")


# ----------------------------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("turbocompile::layernorm_modulate", mutates_args=())
def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``(LayerNorm_no_affine(x.float()) * (1 + scale) + shift).to(x.dtype)``; x [B, L, D]."""
    _check_x("layernorm_modulate", x, ndim3=True)
    return layernorm_modulate_ref(x, shift, scale, eps)


@layernorm_modulate.register_kernel("cuda")
def _layernorm_modulate_cuda(x, shift, scale, eps):
    _check_x("layernorm_modulate", x, ndim3=True)
    if triton is None:
        return layernorm_modulate_ref(x, shift, scale, eps)
    return _launch(x, scale, shift, eps, center=True, one_plus=True)


@layernorm_modulate.register_fake
def _layernorm_modulate_fake(x, shift, scale, eps):
    _check_x("layernorm_modulate", x, ndim3=True)
    return torch.empty_like(x)


@torch.library.custom_op("turbocompile::layer_norm_affine", mutates_args=())
def layer_norm_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``LayerNorm(x.float(), weight, bias).to(x.dtype)`` over the last dim."""
    _check_x("layer_norm_affine", x)
    _check_vec("layer_norm_affine", "weight", weight, x.shape[-1])
    _check_vec("layer_norm_affine", "bias", bias, x.shape[-1])
    return layer_norm_affine_ref(x, weight, bias, eps)


@layer_norm_affine.register_kernel("cuda")
def _layer_norm_affine_cuda(x, weight, bias, eps):
    _check_x("layer_norm_affine", x)
    _check_vec("layer_norm_affine", "weight", weight, x.shape[-1])
    _check_vec("layer_norm_affine", "bias", bias, x.shape[-1])
    if triton is None:
        return layer_norm_affine_ref(x, weight, bias, eps)
    return _launch(x, weight, bias, eps, center=True, one_plus=False)


@layer_norm_affine.register_fake
def _layer_norm_affine_fake(x, weight, bias, eps):
    _check_x("layer_norm_affine", x)
    return torch.empty_like(x)


@torch.library.custom_op("turbocompile::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the whole last dim with fp32 math, output in ``x.dtype``."""
    _check_x("rms_norm", x)
    _check_vec("rms_norm", "weight", weight, x.shape[-1])
    return rms_norm_ref(x, weight, eps)


@rms_norm.register_kernel("cuda")
def _rms_norm_cuda(x, weight, eps):
    _check_x("rms_norm", x)
    _check_vec("rms_norm", "weight", weight, x.shape[-1])
    if triton is None:
        return rms_norm_ref(x, weight, eps)
    return _launch(x, weight, None, eps, center=False, one_plus=False)


@rms_norm.register_fake
def _rms_norm_fake(x, weight, eps):
    _check_x("rms_norm", x)
    return torch.empty_like(x)


def launch_triton(op: str, *args) -> torch.Tensor:
    """Run an op's Triton kernel directly on any device (CPU under TRITON_INTERPRET=1, used by the tests)."""
    fns = {"layernorm_modulate": _layernorm_modulate_cuda, "layer_norm_affine": _layer_norm_affine_cuda,
           "rms_norm": _rms_norm_cuda}
    return fns[op](*args)
