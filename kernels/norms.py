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
- ``layernorm_modulate_fp8_row`` / ``layer_norm_affine_fp8_row``: the first two followed by the fp8-row linears'
  activation quantization, (e4m3 values, fp32 row scales), for a following ``fp8_row_gemm`` (pass
  ``fuse_norm_quant``).
"""
from __future__ import annotations

import logging

import torch

from turbocompile.errors import InputError, UnsupportedShapeError
from turbocompile.kernels.quantize_activations import INTERPRET, interp_round_bits, quant_fp8_row_ref

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl

    from turbocompile.kernels.quantize_activations import round_bits, to_e4m3
except ImportError:  # pragma: no cover
    triton = None
    tl = None

MAX_D = 16384  # one row is held in registers
#: Launch shape (measured on an H200, docs/kernels-linear.md): rows per program and warps per program.
ROWS_PER_PROGRAM = 1
NUM_WARPS = 0  # 0: 2 warps for D <= 2048, else 4 (H200 sweep: 3.4 vs 3.0 TB/s at D=1536, 3.2 vs 2.5 at 5120)
#: Cache hint for row-invariant parameters (a [D] weight, a [B, 1, D] shift/scale), which every program
#: re-reads: "evict_last" for them and "evict_first" for the streamed rows. Measured on the H200 it was 1% faster
#: at D=1536 and 3-4% slower at D=5120 (docs/kernels-linear.md), so it is off ("").
PARAM_EVICT = ""
#: None: per op and D from ``chunk_for``; 0: the whole row in registers (``_norm_kernel``); else the chunk width of
#: ``_norm_chunked_kernel`` (two passes over the row, no padded lanes). The GPU benchmark sweeps ``NORM_SWEEP``.
CHUNK: int | None = None
#: (CHUNK, warps) pairs the benchmark tries on the per-sample modulation and the affine LayerNorm.
NORM_SWEEP = [(0, 0), (0, 8), (512, 2), (512, 4), (1024, 4), (1024, 8), (256, 1), (256, 2)]


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
    def _add_pair(a0, a1, b0, b1):
        return a0 + b0, a1 + b1

    @triton.jit
    def _param_index(rows, L, PARAM_ROWS: tl.constexpr):
        """(b, l) of row(s) ``rows`` = divmod(rows, L) for per-sample/per-token parameters (32-bit divide:
        R < 2**31); zeros for one weight/bias vector shared by all rows (no index arithmetic)."""
        if PARAM_ROWS:
            return (rows // L).to(tl.int64), (rows % L).to(tl.int64)
        zero = rows.to(tl.int64) * 0
        return zero, zero

    @triton.jit
    def _norm_kernel(x_ptr, mul_ptr, add_ptr, out_ptr, R, L, D, stride_x, stride_o,
                     mul_sb, mul_sl, add_sb, add_sl, eps,
                     CENTER: tl.constexpr, ONE_PLUS: tl.constexpr, HAS_ADD: tl.constexpr, PARAM_ROWS: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_D: tl.constexpr, OUT_ROUND: tl.constexpr,
                     X_EVICT: tl.constexpr = "", P_EVICT: tl.constexpr = "", scale_ptr=None,
                     FP8_ROW: tl.constexpr = False, INTERP: tl.constexpr = False):
        """``y = norm(x) * (ONE_PLUS + mul[b, l]) + add[b, l]``; row r is (b, l) = divmod(r, L).

        FP8_ROW: ``y`` rounded to x's dtype (what the unfused op returns), then quantized per row as
        ``quant_fp8_row`` does (e4m3 values to ``out_ptr``, ``amax/448`` to ``scale_ptr``): the fp8-row linear
        that reads the norm's output then needs no quantization pass of its own."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < R
        mask = row_ok[:, None] & (cols[None, :] < D)
        r64 = rows.to(tl.int64)
        x = tl.load(x_ptr + r64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0,
                    eviction_policy=X_EVICT).to(tl.float32)
        if CENTER:
            # One pass over the registers for both moments, shifted by the row's first element so that
            # E[(x-c)^2] - E[x-c]^2 does not cancel (as exact as two passes unless a row is pathological);
            # one fused reduction instead of two dependent ones is what lets the kernel reach copy speed.
            c = tl.load(x_ptr + r64 * stride_x, mask=row_ok, other=0.0).to(tl.float32)
            xc = tl.where(mask, x - c[:, None], 0.0)
            s1, s2 = tl.reduce((xc, xc * xc), 1, _add_pair)
            m1 = s1 / D
            rstd = 1.0 / tl.sqrt(tl.maximum(s2 / D - m1 * m1, 0.0) + eps)
            x = xc - m1[:, None]
        else:
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        y = x * rstd[:, None]
        b, l = _param_index(rows, L, PARAM_ROWS)
        m = tl.load(mul_ptr + (b * mul_sb + l * mul_sl)[:, None] + cols[None, :], mask=mask, other=0.0,
                    eviction_policy=P_EVICT)
        if ONE_PLUS:
            y = y * (1.0 + m)
        else:
            y = y * m
        if HAS_ADD:
            y += tl.load(add_ptr + (b * add_sb + l * add_sl)[:, None] + cols[None, :], mask=mask, other=0.0,
                         eviction_policy=P_EVICT)
        y = round_bits(y, OUT_ROUND)
        if FP8_ROW:  # the same bits as layernorm -> x.dtype -> _quant_row_kernel
            y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
            amax = tl.maximum(tl.max(tl.where(mask, tl.abs(y), 0.0), axis=1), 1e-8)
            inv = tl.math.div_rn(tl.full([ROWS], 448.0, tl.float32), amax)
            q = to_e4m3(tl.minimum(tl.maximum(y * inv[:, None], -448.0), 448.0), INTERP)
            # stored in runs of 8 bytes (the same column offsets, written so that Triton sees 8-element runs):
            # a 16-byte fp8 store would make Triton give every thread 16 columns instead of the bf16 load's 8,
            # which reorders the row sums and moves the norm by an ulp against the unfused kernel
            cols8 = (cols // 8) * 8 + cols % 8
            tl.store(out_ptr + r64[:, None] * stride_o + cols8[None, :], q, mask=mask)
            tl.store(scale_ptr + r64, amax / 448.0, mask=row_ok)
        else:
            tl.store(out_ptr + r64[:, None] * stride_o + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _norm_chunked_kernel(x_ptr, mul_ptr, add_ptr, out_ptr, R, L, D, stride_x, stride_o,
                             mul_sb, mul_sl, add_sb, add_sl, eps,
                             CENTER: tl.constexpr, ONE_PLUS: tl.constexpr, HAS_ADD: tl.constexpr,
                             PARAM_ROWS: tl.constexpr, CHUNK: tl.constexpr, OUT_ROUND: tl.constexpr):
        """One row per program in ``CHUNK``-wide pieces: a pass for the moments, a second (L1/L2-resident) pass
        that normalizes and writes. Why: the whole-row kernel pads D to a power of two (D = 5120 runs 8192 lanes)
        and holds the row in registers, which limits how many rows each SM keeps in flight; chunks that divide D
        waste no lanes and need few registers. Same math as ``_norm_kernel`` (moments shifted by the first
        element), summed in another order."""
        row = tl.program_id(0)
        r64 = row.to(tl.int64)
        cols = tl.arange(0, CHUNK)
        x_row = x_ptr + r64 * stride_x
        if CENTER:
            c = tl.load(x_row).to(tl.float32)
        else:
            c = 0.0
        s1 = tl.zeros([CHUNK], tl.float32)
        s2 = tl.zeros([CHUNK], tl.float32)
        for k0 in range(0, D, CHUNK):
            ok = k0 + cols < D
            xc = tl.where(ok, tl.load(x_row + k0 + cols, mask=ok, other=0.0).to(tl.float32) - c, 0.0)
            s1 += xc
            s2 += xc * xc
        if CENTER:
            m1 = tl.sum(s1, 0) / D
            rstd = 1.0 / tl.sqrt(tl.maximum(tl.sum(s2, 0) / D - m1 * m1, 0.0) + eps)
        else:
            m1 = 0.0
            rstd = 1.0 / tl.sqrt(tl.sum(s2, 0) / D + eps)
        b, l = _param_index(row, L, PARAM_ROWS)
        mul_row = mul_ptr + b * mul_sb + l * mul_sl
        add_row = add_ptr + b * add_sb + l * add_sl
        for k0 in range(0, D, CHUNK):
            ok = k0 + cols < D
            x = tl.load(x_row + k0 + cols, mask=ok, other=0.0).to(tl.float32)
            y = (x - c - m1) * rstd
            m = tl.load(mul_row + k0 + cols, mask=ok, other=0.0)
            if ONE_PLUS:
                y = y * (1.0 + m)
            else:
                y = y * m
            if HAS_ADD:
                y += tl.load(add_row + k0 + cols, mask=ok, other=0.0)
            y = round_bits(y, OUT_ROUND)
            tl.store(out_ptr + r64 * stride_o + k0 + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


#: Chunk widths of the two-pass kernel per GPU (a substring of the device name) for the centred norms above
#: D = 2048, from the sweeps in docs/kernels-linear.md. On the H200 the whole-row kernel leaves bandwidth unused
#: (modulated LayerNorm 73-74% of copy, affine 79-82%) and chunks recover it (1024: 81-84%; 512: 83-86%); on the
#: H100, whose copy bandwidth is lower (3.0 against 4.25 TB/s), the whole row already reaches 92-96% and chunks
#: of 512 fall to 71-74%, so it keeps the whole-row kernel (no entry).
CHUNKS_BY_GPU: dict[str, dict[str, int]] = {"H200": {"modulate": 1024, "affine": 512}}


def chunk_for(d: int, center: bool, one_plus: bool, per_token: bool, device_name: str = "") -> int:
    """Chunk width for ``_norm_chunked_kernel`` on ``device_name``, or 0 for the whole-row kernel. The per-token
    modulation (97-99% of copy), RMSNorm (94-97%) and rows up to 2048 always keep the whole-row kernel."""
    if d <= 2048 or not center or per_token:
        return 0
    for key, table in CHUNKS_BY_GPU.items():
        if key in device_name:
            return table["modulate" if one_plus else "affine"]
    return 0


_DEVICE_NAMES: dict[int, str] = {}


def _device_name(dev: torch.device) -> str:
    """Cached ``torch.cuda.get_device_name`` ("" off CUDA)."""
    if dev.type != "cuda":
        return ""
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _DEVICE_NAMES:
        _DEVICE_NAMES[idx] = torch.cuda.get_device_name(idx)
    return _DEVICE_NAMES[idx]


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
            one_plus: bool, fp8_row: bool = False):
    """The norm's output in ``x.dtype``; with ``fp8_row`` its per-row e4m3 quantization instead, as
    (values [..., D], scales fp32 [...])."""
    d = x.shape[-1]
    if d > MAX_D:
        raise UnsupportedShapeError(f"fused norms hold a row in registers: D={d} > {MAX_D}; use the reference")
    x3 = x.reshape(x.shape[0] if x.ndim == 3 else 1, -1, d)
    bsz, seq = x3.shape[0], x3.shape[1]
    x2 = x3.reshape(-1, d)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], d), dtype=torch.float8_e4m3fn if fp8_row else x.dtype, device=x.device)
    scales = torch.empty((x2.shape[0],), dtype=torch.float32, device=x.device) if fp8_row else None
    if x2.shape[0] == 0:
        return (out.reshape(x.shape), scales.reshape(x.shape[:-1])) if fp8_row else out.reshape(x.shape)
    mul, mul_sb, mul_sl = _bl_strides(mul, bsz, seq, d, "scale/weight")
    has_add = add is not None
    if has_add:
        add, add_sb, add_sl = _bl_strides(add, bsz, seq, d, "shift/bias")
    else:
        add, add_sb, add_sl = mul, 0, 0
    param_rows = bool(mul_sb or mul_sl or add_sb or add_sl)
    chunk = (chunk_for(d, center, one_plus, bool(mul_sl or add_sl), _device_name(x.device)) if CHUNK is None
             else CHUNK)
    if chunk and not fp8_row:  # (the row's amax needs the whole row: the quantizing norm keeps it in registers)
        _norm_chunked_kernel[(x2.shape[0],)](
            x2, mul, add, out, x2.shape[0], seq, d, x2.stride(0), out.stride(0),
            mul_sb, mul_sl, add_sb, add_sl, float(eps),
            CENTER=center, ONE_PLUS=one_plus, HAS_ADD=has_add, PARAM_ROWS=param_rows, CHUNK=chunk,
            OUT_ROUND=interp_round_bits(x.dtype), num_warps=NUM_WARPS or 4)
        return out.reshape(x.shape)
    block_d = triton.next_power_of_2(d)
    rows = ROWS_PER_PROGRAM
    # measured (H200): 2 warps up to D=2048; above, 4 for the modulated and RMS norms, 8 for the affine one
    warps = NUM_WARPS or (2 if block_d <= 2048 else (8 if center and not one_plus else 4))
    _norm_kernel[(triton.cdiv(x2.shape[0], rows),)](
        x2, mul, add, out, x2.shape[0], seq, d, x2.stride(0), out.stride(0),
        mul_sb, mul_sl, add_sb, add_sl, float(eps),
        CENTER=center, ONE_PLUS=one_plus, HAS_ADD=has_add, PARAM_ROWS=param_rows,
        ROWS=rows, BLOCK_D=block_d,
        OUT_ROUND=interp_round_bits(x.dtype), num_warps=warps,
        **({"X_EVICT": "evict_first", "P_EVICT": PARAM_EVICT} if PARAM_EVICT and not (mul_sl or add_sl) else {}),
        **({"scale_ptr": scales, "FP8_ROW": True, "INTERP": INTERPRET} if fp8_row else {}))
    if fp8_row:
        return out.reshape(x.shape), scales.reshape(x.shape[:-1])
    return out.reshape(x.shape)


def _check_x(op: str, x: torch.Tensor, ndim3: bool = False) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise InputError(f"{op}: x must be bf16/fp16/fp32, got {x.dtype}")
    if ndim3 and x.ndim != 3:
        raise UnsupportedShapeError(f"{op}: x must be [B, L, D], got shape {tuple(x.shape)}")


def _check_vec(op: str, name: str, p: torch.Tensor, d: int) -> None:
    if tuple(p.shape) != (d,):
        raise UnsupportedShapeError(f"{op}: {name} must have shape ({d},), got {tuple(p.shape)}")


def _check_affine(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    _check_x(op, x)
    _check_vec(op, "weight", weight, x.shape[-1])
    _check_vec(op, "bias", bias, x.shape[-1])


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
    _check_affine("layer_norm_affine", x, weight, bias)
    return layer_norm_affine_ref(x, weight, bias, eps)


@layer_norm_affine.register_kernel("cuda")
def _layer_norm_affine_cuda(x, weight, bias, eps):
    _check_affine("layer_norm_affine", x, weight, bias)
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


# The norms that feed an fp8-row W8A8 linear, with that linear's activation quantization fused in (the
# ``fuse_norm_quant`` pass inserts them; the linear becomes ``fp8_row_gemm``). Same bits as the norm followed by
# ``quant_fp8_row``: the row is rounded to x's dtype first, as the norm's output would be.
def _fp8_row(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = quant_fp8_row_ref(y)
    return q.reshape(y.shape), s.reshape(y.shape[:-1])


def _fp8_row_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x, dtype=torch.float8_e4m3fn), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("turbocompile::layernorm_modulate_fp8_row", mutates_args=())
def layernorm_modulate_fp8_row(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``layernorm_modulate`` then per-row e4m3 quantization: (values [B, L, D] e4m3, scales [B, L] fp32)."""
    _check_x("layernorm_modulate_fp8_row", x, ndim3=True)
    return _fp8_row(layernorm_modulate_ref(x, shift, scale, eps))


@layernorm_modulate_fp8_row.register_kernel("cuda")
def _layernorm_modulate_fp8_row_cuda(x, shift, scale, eps):
    _check_x("layernorm_modulate_fp8_row", x, ndim3=True)
    if triton is None:
        return _fp8_row(layernorm_modulate_ref(x, shift, scale, eps))
    return _launch(x, scale, shift, eps, center=True, one_plus=True, fp8_row=True)


@layernorm_modulate_fp8_row.register_fake
def _layernorm_modulate_fp8_row_fake(x, shift, scale, eps):
    _check_x("layernorm_modulate_fp8_row", x, ndim3=True)
    return _fp8_row_fake(x)


@torch.library.custom_op("turbocompile::layer_norm_affine_fp8_row", mutates_args=())
def layer_norm_affine_fp8_row(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer_norm_affine`` then per-row e4m3 quantization: (values [..., D] e4m3, scales [...] fp32)."""
    _check_affine("layer_norm_affine_fp8_row", x, weight, bias)
    return _fp8_row(layer_norm_affine_ref(x, weight, bias, eps))


@layer_norm_affine_fp8_row.register_kernel("cuda")
def _layer_norm_affine_fp8_row_cuda(x, weight, bias, eps):
    _check_affine("layer_norm_affine_fp8_row", x, weight, bias)
    if triton is None:
        return _fp8_row(layer_norm_affine_ref(x, weight, bias, eps))
    return _launch(x, weight, bias, eps, center=True, one_plus=False, fp8_row=True)


@layer_norm_affine_fp8_row.register_fake
def _layer_norm_affine_fp8_row_fake(x, weight, bias, eps):
    _check_x("layer_norm_affine_fp8_row", x)
    return _fp8_row_fake(x)


def launch_triton(op: str, *args):
    """Run an op's Triton kernel directly on any device (CPU under TRITON_INTERPRET=1, used by the tests)."""
    fns = {"layernorm_modulate": _layernorm_modulate_cuda, "layer_norm_affine": _layer_norm_affine_cuda,
           "rms_norm": _rms_norm_cuda, "layernorm_modulate_fp8_row": _layernorm_modulate_fp8_row_cuda,
           "layer_norm_affine_fp8_row": _layer_norm_affine_fp8_row_cuda}
    return fns[op](*args)


# ----------------------------------------------------------------------------------------------------------------
# GPU benchmark: python -m turbocompile.kernels.norms --bench [--out DIR]
# ----------------------------------------------------------------------------------------------------------------
def _bench(out_dir: str | None) -> dict:  # pragma: no cover - needs a GPU
    from triton.testing import do_bench

    from turbocompile.kernels.benchlog import BenchLog

    dev = torch.device("cuda")
    res: dict = {"device": torch.cuda.get_device_name(0), "rows": []}
    log = BenchLog(out_dir, "bench_norms", res)
    say, dump = log.say, log.dump

    def t(fn) -> float:
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    src = torch.randn(2**28, device=dev)
    dst = torch.empty_like(src)
    res["copy_TBps"] = 2 * src.numel() * 4 / t(lambda: dst.copy_(src)) / 1e9
    del src, dst
    say(f"# norms on {res['device']}: copy {res['copy_TBps']:.2f} TB/s (read+write)")
    eps = 1e-6
    # D = 1536 again at the end: the first shape measured 15-20% lower in one run (2026-11-26 21:46) than in others
    for l, d in [(32760, 1536), (32760, 5120), (75600, 5120), (32760, 1536)]:
        x = torch.randn(1, l, d, device=dev, dtype=torch.bfloat16) * 2 + 0.5
        w, bias = torch.randn(d, device=dev), torch.randn(d, device=dev)
        cases = {
            "layernorm_modulate[B,1,D]": (torch.randn(1, 1, d, device=dev), torch.randn(1, 1, d, device=dev) * 0.3),
            "layernorm_modulate[B,L,D]": (torch.randn(1, l, d, device=dev), torch.randn(1, l, d, device=dev) * 0.3),
        }
        for name, (shift, scale) in cases.items():
            got = torch.ops.turbocompile.layernorm_modulate(x, shift, scale, eps)
            want = layernorm_modulate_ref(x, shift, scale, eps)
            nbytes = 2 * x.numel() * 2 + (shift.numel() + scale.numel()) * 4
            _row(res, say, t, name, l, d, got, want, nbytes,
                 lambda: torch.ops.turbocompile.layernorm_modulate(x, shift, scale, eps),
                 lambda: layernorm_modulate_ref(x, shift, scale, eps))
        _row(res, say, t, "layer_norm_affine", l, d, torch.ops.turbocompile.layer_norm_affine(x, w, bias, eps),
             layer_norm_affine_ref(x, w, bias, eps), 2 * x.numel() * 2,
             lambda: torch.ops.turbocompile.layer_norm_affine(x, w, bias, eps),
             lambda: layer_norm_affine_ref(x, w, bias, eps))
        _row(res, say, t, "rms_norm", l, d, torch.ops.turbocompile.rms_norm(x, w, eps), rms_norm_ref(x, w, eps),
             2 * x.numel() * 2, lambda: torch.ops.turbocompile.rms_norm(x, w, eps), lambda: rms_norm_ref(x, w, eps))
        dump()
    global CHUNK, NUM_WARPS
    res["sweep"] = []
    keep_chunk = CHUNK
    for l, d in [(32760, 1536), (32760, 5120), (75600, 5120)]:
        x = torch.randn(1, l, d, device=dev, dtype=torch.bfloat16)
        shift, scale = torch.randn(1, 1, d, device=dev), torch.randn(1, 1, d, device=dev)
        want = layernorm_modulate_ref(x, shift, scale, eps)
        want2 = layer_norm_affine_ref(x, shift[0, 0], scale[0, 0], eps)
        for chunk, warps in NORM_SWEEP:
            CHUNK, NUM_WARPS = chunk, warps
            got = torch.ops.turbocompile.layernorm_modulate(x, shift, scale, eps)
            got2 = torch.ops.turbocompile.layer_norm_affine(x, shift[0, 0], scale[0, 0], eps)
            ulp = max(_max_ulps(got, want), _max_ulps(got2, want2))
            ms = t(lambda: torch.ops.turbocompile.layernorm_modulate(x, shift, scale, eps))
            ms2 = t(lambda: torch.ops.turbocompile.layer_norm_affine(x, shift[0, 0], scale[0, 0], eps))
            bw, bw2 = 2 * x.numel() * 2 / ms / 1e9, 2 * x.numel() * 2 / ms2 / 1e9
            res["sweep"].append({"L": l, "D": d, "chunk": chunk, "warps": warps, "ms": ms, "TBps": bw,
                                 "affine_TBps": bw2, "max_ulps": ulp})
            say(f"sweep L={l} D={d} chunk={chunk or 'whole row'} warps={warps or 'default'}: "
                f"layernorm_modulate[B,1,D] {bw:.2f} TB/s ({bw / res['copy_TBps']:.0%}), "
                f"layer_norm_affine {bw2:.2f} ({bw2 / res['copy_TBps']:.0%}), max err {ulp:.2f} bf16 ulp")
            dump()
    CHUNK, NUM_WARPS = keep_chunk, 0
    return res


def _bench_fp8_row(out_dir: str | None) -> dict:  # pragma: no cover - needs a GPU
    """The norms that feed fp8-row linears, fused with the linear's activation quantization, against the norm
    followed by the quantizer (two kernels, as before ``fuse_norm_quant``), both as CUDA-graph replays."""
    from turbocompile.kernels import quantize_activations as qa
    from turbocompile.kernels.benchlog import BenchLog
    from turbocompile.kernels.sage_attention import bench_ms_graph

    dev = torch.device("cuda")
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
                 "rows": []}
    log = BenchLog(out_dir, "bench_norms_fp8_row", res)
    ops = torch.ops.turbocompile
    for l, d in [(32760, 1536), (75600, 5120)]:
        x = torch.randn(1, l, d, device=dev, dtype=torch.bfloat16) * 2 + 0.5
        shift, scale = torch.randn(1, 1, d, device=dev), torch.randn(1, 1, d, device=dev) * 0.3
        w, bias = torch.randn(d, device=dev), torch.randn(d, device=dev)
        for name, args in (("layernorm_modulate", (x, shift, scale, 1e-6)), ("layer_norm_affine", (x, w, bias, 1e-6))):
            norm, fused = getattr(ops, name), getattr(ops, name + "_fp8_row")
            unfused_ms = bench_ms_graph(lambda: qa.quant_fp8_row(norm(*args)))  # noqa: B023
            fused_ms = bench_ms_graph(lambda: fused(*args))  # noqa: B023
            norm_ms = bench_ms_graph(lambda: norm(*args))  # noqa: B023
            row = {"op": name, "L": l, "D": d, "norm_ms": norm_ms, "norm_then_quant_ms": unfused_ms,
                   "fused_ms": fused_ms, "saved_ms": unfused_ms - fused_ms,
                   "fused_TBps": x.numel() * 3 / fused_ms / 1e9}  # bf16 read + e4m3 write
            res["rows"].append(row)
            log.say(f"{name:<20} L={l:>6} D={d:>5}: norm {norm_ms * 1e3:6.1f} us, norm + quant_fp8_row "
                    f"{unfused_ms * 1e3:6.1f} us, fused {fused_ms * 1e3:6.1f} us ({row['fused_TBps']:.2f} TB/s), "
                    f"saves {row['saved_ms'] * 1e3:5.1f} us")
        log.dump()
    return res


def _max_ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error in units of bf16 spacing at the reference value (floored at 1e-3)."""
    spacing = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp_min(1e-3)
    return ((got.float() - want.float()).abs() / spacing).max().item()


def _row(res, say, t, name, l, d, got, want, nbytes, fused, eager) -> None:  # pragma: no cover - GPU only
    ulps = _max_ulps(got, want)
    ms_f, ms_e = t(fused), t(eager)
    bw = nbytes / ms_f / 1e9
    row = {"op": name, "L": l, "D": d, "ms": ms_f, "eager_ms": ms_e, "TBps": bw,
           "frac_copy": bw / res["copy_TBps"], "max_ulps": ulps, "finite": bool(torch.isfinite(got).all())}
    res["rows"].append(row)
    say(f"{name:<27} L={l:>6} D={d:>5}: {ms_f * 1e3:8.1f} us  {bw:5.2f} TB/s = {row['frac_copy']:.0%} of copy  "
        f"(eager {ms_e * 1e3:8.1f} us, {ms_e / ms_f:.1f}x)  max err {ulps:.2f} bf16 ulp")


if __name__ == "__main__":  # pragma: no cover
    import argparse

    p = argparse.ArgumentParser(description="check and time the fused norm ops on a GPU")
    p.add_argument("--bench", action="store_true", required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--fp8-row", action="store_true",
                   help="only the norms fused with the fp8-row quantization, against norm + quantizer")
    a = p.parse_args()
    if a.fp8_row:
        _bench_fp8_row(a.out)
    else:
        _bench(a.out)
