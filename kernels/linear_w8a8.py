"""W8A8 linear custom ops: quantize the activations on the fly, 8-bit GEMM, bias and output cast, one op per scheme.

==============  =======================================  ==========================  ==========================
scheme          op                                       weight (``quantize_weight``)  activations
==============  =======================================  ==========================  ==========================
``int8-block``  ``turbocompile::int8_block_linear``      int8, 128x128 blocks        int8, 128 tok x 128 ch
``int8-row``    ``turbocompile::int8_row_linear``        int8, per output channel    int8, per token
``fp8-row``     ``turbocompile::fp8_row_linear``         e4m3, per output channel    e4m3, per token
``fp8-block``   ``turbocompile::fp8_block_linear``       e4m3, 128x128 blocks        e4m3, 1x128 groups
==============  =======================================  ==========================  ==========================

Every op has the schema ``(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias) -> Tensor``: ``x [..., K]`` in
bf16/fp16/fp32, output ``[..., N]`` in ``x.dtype``. The default (CPU) implementation is the readable reference:
it quantizes the activations exactly as the kernels do and multiplies the integer / e4m3 values, so it agrees with
the GPU path in the integer part and differs only by fp32 summation order after scaling. The CUDA implementation
is a fused Triton quantization kernel followed by the fastest measured GEMM for that scheme
(``GEMM_BACKENDS``). ``auto_scheme`` picks a scheme per GPU architecture from the measured table in
docs/kernels-linear.md.

Run ``python -m turbocompile.kernels.linear_w8a8 --bench`` on a GPU to check every path against its reference and
time it against cuBLAS bf16 at the Wan shapes.
"""
from __future__ import annotations

import logging
import math

import torch

from turbocompile.errors import InputError, UnsupportedShapeError
from turbocompile.kernels import quantize_activations as qa
from turbocompile.kernels import gemm_int8_block_gluon as gluon_int8
from turbocompile.kernels.gemm_int8_block import BLOCK, gemm_block_scaled
from turbocompile.kernels.gemm_scaled import (
    cublas_ok,
    fp8_block_cublas_ok,
    fp8_block_scaled_mm,
    fp8_row_scaled_mm,
    gemm_rowscale,
    int8_row_int_mm,
)

log = logging.getLogger(__name__)

#: scheme -> op name in the ``turbocompile`` namespace
OP_NAMES: dict[str, str] = {
    "int8-block": "int8_block_linear",
    "int8-row": "int8_row_linear",
    "fp8-row": "fp8_row_linear",
    "fp8-block": "fp8_block_linear",
}
_W_DTYPE = {"int8-block": torch.int8, "int8-row": torch.int8,
            "fp8-row": torch.float8_e4m3fn, "fp8-block": torch.float8_e4m3fn}

#: GEMM used by the CUDA implementation of each scheme (measured winners; docs/kernels-linear.md).
#: "triton" = this package's kernels; "gluon" = gemm_int8_block_gluon (Hopper only; Triton elsewhere);
#: "cublas" = torch._scaled_mm / F.scaled_mm / torch._int_mm.
GEMM_BACKENDS: dict[str, str] = {
    "int8-block": "gluon",  # the Gluon kernel on sm_90 (async wgmma, 1.18x the Triton one), else Triton
    "int8-row": "triton",
    "fp8-row": "triton",
    "fp8-block": "cublas",
}

#: Measured choice of scheme per target (fastest one that meets the accuracy bar): docs/kernels-linear.md.
AUTO_TABLE: dict[str, str] = {
    "sm_90": "fp8-row",
    "cpu": "int8-block",
}


def auto_scheme(gpu_arch: str) -> str:
    """The fastest accurate scheme measured for ``gpu_arch`` ("sm_90", "sm90a", "9.0", "cpu"); "int8-block" else.

    Architectures nobody has measured fall back to the paper's ``int8-block``: it needs only int8 tensor cores
    (sm_80 and newer) and matches TurboDiffusion's checkpoints.
    """
    arch = gpu_arch.strip().lower().replace("cuda:", "")
    if arch != "cpu":
        digits = "".join(c for c in arch if c.isdigit())
        arch = f"sm_{digits}" if digits else arch
    if arch not in AUTO_TABLE:
        log.info("no measured W8A8 scheme for %s; using int8-block", gpu_arch)
    return AUTO_TABLE.get(arch, "int8-block")


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------
def _fp8_block_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    nb, kb = math.ceil(n / BLOCK), math.ceil(k / BLOCK)
    wp = torch.nn.functional.pad(w.float(), (0, kb * BLOCK - k, 0, nb * BLOCK - n)).view(nb, BLOCK, kb, BLOCK)
    amax = wp.abs().amax(dim=(1, 3)).clamp_min(qa.AMAX_FLOOR)
    q = (wp * qa._inv(qa.FP8_MAX, amax)[:, None, :, None]).clamp_(-qa.FP8_MAX, qa.FP8_MAX)
    q = q.view(nb * BLOCK, kb * BLOCK)[:n, :k].to(torch.float8_e4m3fn).contiguous()
    return q, (amax / qa.FP8_MAX).contiguous()


def quantize_weight(w: torch.Tensor, scheme: str) -> dict[str, torch.Tensor]:
    """Quantize a Linear weight ``[N, K]`` for ``scheme``; returns ``{"w_q": ..., "w_scale": fp32 ...}``.

    Done once at build time (the graph pass stores the result as buffers); row schemes give ``w_scale [N]``,
    block schemes ``[ceil(N/128), ceil(K/128)]``.
    """
    if scheme not in OP_NAMES:
        raise InputError(f"unknown W8A8 scheme {scheme!r}: use one of {sorted(OP_NAMES)}")
    if w.ndim != 2:
        raise UnsupportedShapeError(f"expected a 2-D Linear weight [N, K], got shape {tuple(w.shape)}")
    if scheme == "int8-block":
        q, s = qa.quant_int8_block_ref(w)
    elif scheme == "int8-row":
        q, s = qa.quant_int8_row_ref(w)
    elif scheme == "fp8-row":
        q, s = qa.quant_fp8_row_ref(w)
    else:
        q, s = _fp8_block_weight(w)
    return {"w_q": q, "w_scale": s}


def dequantize_weight(w_q: torch.Tensor, w_scale: torch.Tensor, scheme: str) -> torch.Tensor:
    """fp32 weight that ``quantize_weight`` encoded (for references and drift checks)."""
    n, k = w_q.shape
    if scheme in ("int8-row", "fp8-row"):
        return w_q.float() * w_scale.float()[:, None]
    s = w_scale.float().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:n, :k]
    return w_q.float() * s


# ----------------------------------------------------------------------------------------------------------------
# Checks shared by every implementation (and the fake, so export catches bad shapes)
# ----------------------------------------------------------------------------------------------------------------
def _check(scheme: str, x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
           bias: torch.Tensor | None) -> None:
    op = OP_NAMES[scheme]
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise InputError(f"{op}: x must be bf16/fp16/fp32, got {x.dtype}")
    if w_q.ndim != 2 or w_q.dtype != _W_DTYPE[scheme]:
        raise InputError(f"{op}: w_q must be a 2-D {_W_DTYPE[scheme]} tensor, got {w_q.dtype} "
                         f"{tuple(w_q.shape)}; make it with quantize_weight(w, {scheme!r})")
    n, k = w_q.shape
    if x.shape[-1] != k:
        raise UnsupportedShapeError(f"{op}: x has {x.shape[-1]} input features but the weight has {k}")
    want = (n,) if scheme.endswith("-row") else (math.ceil(n / BLOCK), math.ceil(k / BLOCK))
    if tuple(w_scale.shape) != want or w_scale.dtype != torch.float32:
        raise UnsupportedShapeError(f"{op}: w_scale must be fp32 {want}, got {w_scale.dtype} "
                                    f"{tuple(w_scale.shape)}; make it with quantize_weight(w, {scheme!r})")
    if bias is not None and tuple(bias.shape) != (n,):
        raise UnsupportedShapeError(f"{op}: bias must have shape ({n},), got {tuple(bias.shape)}")


# ----------------------------------------------------------------------------------------------------------------
# References (the ops' default implementation: CPU and any device without a kernel)
# ----------------------------------------------------------------------------------------------------------------
def _finish(out2d: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is not None:
        out2d = out2d + bias.float()
    return out2d.to(x.dtype).reshape(*x.shape[:-1], out2d.shape[-1])


def reference_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                     scheme: str) -> torch.Tensor:
    """Readable reference of every scheme: quantize x like the kernel, exact integer products, fp32 scaling."""
    _check(scheme, x, w_q, w_scale, bias)
    x2 = qa.as_2d(x)
    m, k = x2.shape
    n = w_q.shape[0]
    if scheme == "int8-block":
        q, s = qa.quant_int8_block_ref(x2)
        acc = torch.zeros(m, n, dtype=torch.float32, device=x.device)
        for kb in range(s.shape[1]):
            ks = slice(kb * BLOCK, min(k, (kb + 1) * BLOCK))
            # 128 products of int8 stay below 2**21: exact in fp32 whatever the summation order.
            ints = q[:, ks].float() @ w_q[:, ks].float().t()
            scale = (s[:, kb].repeat_interleave(BLOCK)[:m, None] * w_scale[:, kb].repeat_interleave(BLOCK)[None, :n])
            acc += ints * scale
        return _finish(acc, x, bias)
    if scheme == "int8-row":
        q, s = qa.quant_int8_row_ref(x2)
        ints = (q.double() @ w_q.double().t()).float()  # exact: |sum| < 2**53
        return _finish(ints * s[:, None] * w_scale[None, :], x, bias)
    if scheme == "fp8-row":
        q, s = qa.quant_fp8_row_ref(x2)
        xd = q.float() * s[:, None]
    else:
        q, s = qa.quant_fp8_group_ref(x2)
        xd = q.float() * s.t().repeat_interleave(BLOCK, 1)[:, :k]
    return _finish(xd @ dequantize_weight(w_q, w_scale, scheme).t(), x, bias)


# ----------------------------------------------------------------------------------------------------------------
# CUDA implementation: fused quantization kernel + GEMM
# ----------------------------------------------------------------------------------------------------------------
def cuda_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                scheme: str, backend: str | None = None) -> torch.Tensor:
    """Fused path: Triton activation quantization, then the scheme's GEMM (``backend`` overrides the table)."""
    _check(scheme, x, w_q, w_scale, bias)
    if qa.triton is None:
        return reference_linear(x, w_q, w_scale, bias, scheme)
    backend = backend or GEMM_BACKENDS[scheme]
    x2 = qa.as_2d(x)
    m, k = x2.shape
    n = w_q.shape[0]
    if m == 0:
        return x.new_empty((*x.shape[:-1], n))
    quant, _ = qa.QUANTIZERS[scheme]
    q, s = quant(x2)
    if scheme == "int8-block":
        use_gluon = backend == "gluon" and gluon_int8.available()
        if use_gluon:
            try:
                gluon_int8.check_inputs(q, s, w_q, w_scale, bias, x.dtype)
            except UnsupportedShapeError:  # K or N not a multiple of 128, a strided view: the Triton kernel takes it
                use_gluon = False
        out = None
        if use_gluon:
            try:
                out = gluon_int8.gemm_int8_block_gluon(q, s, w_q, w_scale, bias, x.dtype)
            except Exception as exc:  # an incompatible Triton fails the first launch: the Triton kernel takes over
                if not gluon_int8.GUARD.launch_failed(exc):
                    raise
        if out is None:
            out = gemm_block_scaled(q, s, w_q, w_scale, bias, x.dtype)
    elif scheme == "fp8-block":
        if backend == "cublas" and fp8_block_cublas_ok(m, n, k):
            out = fp8_block_scaled_mm(q, s, w_q, w_scale, bias, x.dtype)
        else:
            out = gemm_block_scaled(q, s, w_q, w_scale, bias, x.dtype, a_per_row=True)
    else:
        out = _row_gemm(q, s, w_q, w_scale, bias, x.dtype, scheme, backend)
    return out.reshape(*x.shape[:-1], n)


def _row_gemm(q: torch.Tensor, s: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, scheme: str, backend: str,
              act: int = 0, residual: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> torch.Tensor:
    """The GEMM of a per-row scheme on quantized 2-D activations ``q`` [M, K] with row scales ``s`` [M]; ``act``
    1 applies GELU (tanh) to the result, then ``residual`` [M, N] (and ``gate`` fp32 [G, N]) the residual update
    of :func:`residual_update` (in the Triton kernel's epilogue, after cuBLAS in torch)."""
    m, k = q.shape
    if backend == "cublas" and cublas_ok(m, w_q.shape[0], k):
        fn = fp8_row_scaled_mm if scheme == "fp8-row" else int8_row_int_mm
        out = fn(q, s, w_q, w_scale, bias, out_dtype)
        out = torch.nn.functional.gelu(out, approximate="tanh") if act else out
        return residual_update(out, residual, None if gate is None else gate.repeat_interleave(m // len(gate), 0))
    return gemm_rowscale(q, s, w_q, w_scale, bias, out_dtype, act=act, residual=residual, gate=gate)


def residual_update(out: torch.Tensor, residual: torch.Tensor | None, gate: torch.Tensor | None) -> torch.Tensor:
    """A Wan block's residual step on a linear's rounded output, as the graph writes it: ``residual + out``
    (cross-attention), or ``(residual.float() + out.float() * gate).to(dtype)`` with the fp32 adaLN gate
    (self-attention and FFN). The reference of ``fp8_row_gemm``'s ``residual``/``gate`` (pass ``fuse_residual``)."""
    if residual is None:
        return out
    if gate is None:
        return residual + out
    return (residual.float() + out.float() * gate).to(out.dtype)


_SCHEMA = "(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias) -> Tensor"


def _define(scheme: str):
    """Register ``turbocompile::<op>`` for ``scheme``: reference default, CUDA kernel, fake."""
    def reference(x, w_q, w_scale, bias):
        return reference_linear(x, w_q, w_scale, bias, scheme)

    def cuda(x, w_q, w_scale, bias):
        return cuda_linear(x, w_q, w_scale, bias, scheme)

    def fake(x, w_q, w_scale, bias):
        _check(scheme, x, w_q, w_scale, bias)
        return x.new_empty((*x.shape[:-1], w_q.shape[0]))

    reference.__name__ = OP_NAMES[scheme]
    op = torch.library.custom_op(f"turbocompile::{OP_NAMES[scheme]}", reference, mutates_args=(), schema=_SCHEMA)
    op.register_kernel("cuda")(cuda)
    op.register_fake(fake)
    return op


int8_block_linear = _define("int8-block")
int8_row_linear = _define("int8-row")
fp8_row_linear = _define("fp8-row")
fp8_block_linear = _define("fp8-block")

# ----------------------------------------------------------------------------------------------------------------
# fp8-row GEMM on activations a fused norm already quantized (``norms.*_fp8_row``; pass ``fuse_norm_quant``)
# ----------------------------------------------------------------------------------------------------------------
#: ``fp8_row_gemm``'s ``activation`` values -> the epilogue's ACT code (pass ``fuse_gelu`` sets "gelu_tanh")
ACTIVATIONS = {"": 0, "gelu_tanh": 1}


def _check_prequant(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype, activation: str = "",
                    residual: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> None:
    out_shape = (*x_q.shape[:-1], w_q.shape[0])
    if residual is not None and (tuple(residual.shape) != out_shape or residual.dtype != out_dtype):
        raise UnsupportedShapeError(f"fp8_row_gemm: residual must be {out_dtype} {out_shape} (the output's), "
                                    f"got {residual.dtype} {tuple(residual.shape)}")
    if gate is not None and (residual is None or gate.dtype != torch.float32 or gate.numel() == 0
                             or gate_rows(gate.shape, out_shape) is None):
        raise UnsupportedShapeError(f"fp8_row_gemm: gate must be fp32 [{w_q.shape[0]}] or [B, 1, {w_q.shape[0]}] "
                                    f"for x_q [B, L, K], with a residual; got {gate.dtype} {tuple(gate.shape)}"
                                    + ("" if residual is not None else " and no residual"))
    if activation not in ACTIVATIONS:
        raise InputError(f"fp8_row_gemm: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if x_q.dtype != torch.float8_e4m3fn or x_q.ndim < 1:
        raise InputError(f"fp8_row_gemm: x_q must be float8_e4m3fn [..., K], got {x_q.dtype} {tuple(x_q.shape)}")
    if x_scale.dtype != torch.float32 or tuple(x_scale.shape) != tuple(x_q.shape[:-1]):
        raise UnsupportedShapeError(f"fp8_row_gemm: x_scale must be fp32 {tuple(x_q.shape[:-1])} (one per row), "
                                    f"got {x_scale.dtype} {tuple(x_scale.shape)}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise InputError(f"fp8_row_gemm: out_dtype must be bf16/fp16/fp32, got {out_dtype}")
    _check("fp8-row", x_q.new_empty((0, x_q.shape[-1]), dtype=out_dtype), w_q, w_scale, bias)


def gate_rows(gate_shape, out_shape) -> int | None:
    """Rows of the [G, N] gate table a gate of ``gate_shape`` stands for, for an output of ``out_shape`` [..., N]:
    1 for [N] (or [1, 1, N]: the same gate for every row), B for [B, 1, N] with a [B, L, N] output; None for any
    other shape (what ``fp8_row_gemm`` and the ``fuse_residual`` pass accept)."""
    n = out_shape[-1]
    if tuple(gate_shape[-1:]) != (n,):
        return None
    if math.prod(gate_shape) == n:
        return 1
    return out_shape[0] if len(out_shape) == 3 and tuple(gate_shape) == (out_shape[0], 1, n) else None


@torch.library.custom_op("turbocompile::fp8_row_gemm", mutates_args=())
def fp8_row_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None, out_dtype: torch.dtype, activation: str = "",
                 residual: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> torch.Tensor:
    """``fp8_row_linear`` without its activation quantization: ``x_q`` e4m3 [..., K] with fp32 row scales
    ``x_scale`` [...] (what ``layernorm_modulate_fp8_row`` / ``layer_norm_affine_fp8_row`` / ``quant_fp8_row``
    return); output [..., N] in ``out_dtype``. Reference: the same dequantized product as ``reference_linear``'s
    fp8-row branch. ``activation="gelu_tanh"``: ``gelu(that, approximate="tanh")`` on the rounded output (pass
    ``fuse_gelu``). ``residual`` [..., N] in ``out_dtype`` (and the fp32 adaLN ``gate`` [N] or [B, 1, N]): the
    block's residual step on the rounded output, :func:`residual_update` (pass ``fuse_residual``)."""
    _check_prequant(x_q, x_scale, w_q, w_scale, bias, out_dtype, activation, residual, gate)
    xd = x_q.reshape(-1, x_q.shape[-1]).float() * x_scale.reshape(-1, 1)
    out = xd @ dequantize_weight(w_q, w_scale, "fp8-row").t()
    if bias is not None:
        out = out + bias.float()
    out = out.to(out_dtype).reshape(*x_q.shape[:-1], w_q.shape[0])
    out = torch.nn.functional.gelu(out, approximate="tanh") if activation else out
    return residual_update(out, residual, gate)


@fp8_row_gemm.register_kernel("cuda")
def _fp8_row_gemm_cuda(x_q, x_scale, w_q, w_scale, bias, out_dtype, activation="", residual=None, gate=None):
    _check_prequant(x_q, x_scale, w_q, w_scale, bias, out_dtype, activation, residual, gate)
    n = w_q.shape[0]
    q2 = x_q.reshape(-1, x_q.shape[-1])
    if q2.shape[0] == 0:
        return x_q.new_empty((*x_q.shape[:-1], n), dtype=out_dtype)
    if q2.stride(-1) != 1:
        q2 = q2.contiguous()
    r2 = None if residual is None else qa.as_2d(residual)
    g2 = None if gate is None else gate.reshape(-1, n).contiguous()
    out = _row_gemm(q2, x_scale.reshape(-1).contiguous(), w_q, w_scale, bias, out_dtype, "fp8-row",
                    GEMM_BACKENDS["fp8-row"], act=ACTIVATIONS[activation], residual=r2, gate=g2)
    return out.reshape(*x_q.shape[:-1], n)


@fp8_row_gemm.register_fake
def _fp8_row_gemm_fake(x_q, x_scale, w_q, w_scale, bias, out_dtype, activation="", residual=None, gate=None):
    _check_prequant(x_q, x_scale, w_q, w_scale, bias, out_dtype, activation, residual, gate)
    return x_q.new_empty((*x_q.shape[:-1], w_q.shape[0]), dtype=out_dtype)


@torch.library.custom_op("turbocompile::quant_fp8_row", mutates_args=())
def quant_fp8_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp8-row linear's activation quantization as an op of its own: (e4m3 values [..., K], fp32 row scales
    [...]) for an ``fp8_row_gemm``, the same bits ``fp8_row_linear`` feeds its GEMM (pass ``fuse_residual``
    splits a linear so that its GEMM can take the residual step)."""
    _check_quant_input(x)
    q, s = qa.quant_fp8_row_ref(qa.as_2d(x))
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


def _check_quant_input(x: torch.Tensor) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x.ndim < 1:
        raise InputError(f"quant_fp8_row: x must be bf16/fp16/fp32 [..., K], got {x.dtype} {tuple(x.shape)}")


@quant_fp8_row.register_kernel("cuda")
def _quant_fp8_row_cuda(x):
    _check_quant_input(x)
    if qa.triton is None or x.numel() == 0:
        q, s = qa.quant_fp8_row_ref(qa.as_2d(x))
    else:
        q, s = qa.quant_fp8_row(qa.as_2d(x))
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


@quant_fp8_row.register_fake
def _quant_fp8_row_fake(x):
    return torch.empty_like(x, dtype=torch.float8_e4m3fn), x.new_empty(x.shape[:-1], dtype=torch.float32)


#: scheme -> the op overload the ``linear_to_w8a8`` pass inserts
SCHEMES: dict[str, torch._ops.OpOverload] = {
    scheme: getattr(torch.ops.turbocompile, name).default for scheme, name in OP_NAMES.items()
}


def w8a8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                scheme: str) -> torch.Tensor:
    """Call the op of ``scheme`` (what the ``linear_to_w8a8`` pass inserts)."""
    if scheme not in SCHEMES:
        raise InputError(f"unknown W8A8 scheme {scheme!r}: use one of {sorted(SCHEMES)}")
    return SCHEMES[scheme](x, w_q, w_scale, bias)




# ----------------------------------------------------------------------------------------------------------------
# GPU benchmark: python -m turbocompile.kernels.linear_w8a8 --bench [--out DIR]
# ----------------------------------------------------------------------------------------------------------------
WAN_SHAPES = [(1536, 1536), (1536, 8960), (8960, 1536), (5120, 5120), (5120, 13824), (13824, 5120)]
BENCH_M = (32760, 75600)
#: (scheme, backend) pairs the benchmark times end to end (activation quantization included).
BENCH_VARIANTS = [("int8-block", "gluon"), ("int8-block", "triton"), ("int8-row", "triton"), ("int8-row", "cublas"),
                  ("fp8-row", "cublas"), ("fp8-row", "triton"), ("fp8-block", "cublas"), ("fp8-block", "triton")]


def _bench(out_dir: str | None, quick: bool = False) -> dict:  # pragma: no cover - needs a GPU
    import datetime
    import platform

    import triton
    from triton.testing import do_bench

    from turbocompile.kernels import gemm_int8_block as gib
    from turbocompile.kernels import gemm_scaled as gs
    from turbocompile.kernels.benchlog import BenchLog

    dev = torch.device("cuda")
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "host": platform.node()}
    log = BenchLog(out_dir, "bench_linear", res)
    say, dump = log.say, log.dump

    def t(fn) -> float:
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    def rel(a, b) -> float:
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    say(f"# {res['device']}  torch {res['torch']}  triton {res['triton']}  {res['date']}")
    # ---- ceilings -------------------------------------------------------------------------------------------
    src = torch.randn(2**28, device=dev)
    dst = torch.empty_like(src)
    ms = t(lambda: dst.copy_(src))
    res["copy_TBps"] = 2 * src.numel() * 4 / ms / 1e9
    del src, dst
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    bm = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    res["bf16_tflops"] = 2 * 8192**3 / t(lambda: a @ bm.t()) / 1e9
    a8, b8 = a.to(torch.int8), bm.to(torch.int8)
    res["int_mm_tops"] = 2 * 8192**3 / t(lambda: torch._int_mm(a8, b8.t())) / 1e9
    af, bf = a.to(torch.float8_e4m3fn), bm.to(torch.float8_e4m3fn)
    one = torch.ones((), device=dev)
    res["fp8_scaled_mm_tflops"] = 2 * 8192**3 / t(
        lambda: torch._scaled_mm(af, bf.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)) / 1e9
    del a, bm, a8, b8, af, bf
    say(f"ceilings: copy {res['copy_TBps']:.2f} TB/s (read+write), bf16 {res['bf16_tflops']:.0f} TFLOP/s, "
        f"_int_mm {res['int_mm_tops']:.0f} TOP/s, _scaled_mm fp8 {res['fp8_scaled_mm_tflops']:.0f} TFLOP/s")
    dump()

    # ---- correctness at real K/N, ragged M ------------------------------------------------------------------
    res["check"] = {}
    torch.manual_seed(0)
    for k, n in [(1536, 8960), (5120, 5120), (8960, 1536)]:
        m = 4173
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        x[:, :3] *= 30  # outlier channels
        w = torch.randn(n, k, device=dev) / k**0.5
        b = torch.randn(n, device=dev) * 0.1
        ref_bf16 = torch.nn.functional.linear(x, w.bfloat16(), b.bfloat16())
        for scheme, (quant, quant_ref) in qa.QUANTIZERS.items():
            q1, s1 = quant(x)
            q2, s2 = quant_ref(x)
            same = torch.equal(q1.view(torch.int8), q2.view(torch.int8)) and torch.equal(s1, s2)
            res["check"][f"quant_bitexact/{scheme}/{k}"] = same
        q2, s2 = qa.quant_int8_block_ref(x)
        for cfg in qa.INT8_BLOCK_QUANT_SWEEP:
            q1, s1 = qa.quant_int8_block(x, cfg)
            res["check"][f"quant_bitexact/int8-block/{cfg[0]}x{cfg[1]}w/{k}"] = (
                torch.equal(q1, q2) and torch.equal(s1, s2))
        for scheme, backend in BENCH_VARIANTS:
            d = quantize_weight(w, scheme)
            for mm in (m, m - m % 128):  # ragged M (cuBLAS blockwise falls back to Triton), then whole blocks
                xm = x[:mm]
                ref = reference_linear(xm, d["w_q"], d["w_scale"], b, scheme)
                out = cuda_linear(xm, d["w_q"], d["w_scale"], b, scheme, backend=backend)
                ref32 = reference_linear(xm.float(), d["w_q"], d["w_scale"], b, scheme)
                out32 = cuda_linear(xm.float(), d["w_q"], d["w_scale"], b, scheme, backend=backend)
                res["check"][f"{scheme}/{backend}/{mm}x{k}x{n}"] = {
                    "vs_ref_bf16out": rel(out, ref), "vs_ref_fp32out": rel(out32, ref32),
                    "vs_bf16_linear": rel(out, ref_bf16[:mm]), "finite": bool(torch.isfinite(out).all())}
    # plain Gaussian (no outliers): the accuracy bar of the issue
    x = torch.randn(8192, 5120, device=dev, dtype=torch.bfloat16)
    w = torch.randn(5120, 5120, device=dev) / 5120**0.5
    ref_bf16 = torch.nn.functional.linear(x, w.bfloat16())
    for scheme in OP_NAMES:
        d = quantize_weight(w, scheme)
        res["check"][f"gaussian_vs_bf16/{scheme}"] = rel(cuda_linear(x, d["w_q"], d["w_scale"], None, scheme), ref_bf16)
    # int64 addressing: more than 2**31 activation elements
    if not quick:
        m, k, n = 160_000, 13824, 256
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev) / k**0.5
        for scheme in ("int8-block", "int8-row", "fp8-row"):
            d = quantize_weight(w, scheme)
            out = cuda_linear(x, d["w_q"], d["w_scale"], None, scheme, backend="triton")
            tail = x[-1024:]  # 1024 rows: whole 128-row blocks, since 160000 = 1250 * 128
            ref = reference_linear(tail, d["w_q"], d["w_scale"], None, scheme)
            res["check"][f"bigM_tail/{scheme}"] = rel(out[-1024:], ref)
        del x, out
    bad = {kk: v for kk, v in res["check"].items() if (v is False) or (isinstance(v, dict) and (
        not v["finite"] or v["vs_ref_fp32out"] > (1e-5 if "int8" in kk else 5e-3)))}
    res["check_failures"] = list(bad)
    say(f"correctness: {len(res['check'])} checks, failures: {list(bad) or 'none'}")
    for kk, v in res["check"].items():
        if kk.startswith(("gaussian", "bigM")):
            say(f"  {kk}: rel L2 {v:.4f}")
    dump()

    # ---- compiled-kernel facts ------------------------------------------------------------------------------
    res["asm"] = {}
    x = torch.randn(4096, 5120, device=dev, dtype=torch.bfloat16)
    w = torch.randn(5120, 5120, device=dev) / 5120**0.5
    qx, sx = qa.quant_int8_block(x)
    d = quantize_weight(w, "int8-block")
    for name in gib.CONFIGS:
        try:
            gemm_block_scaled(qx, sx, d["w_q"], d["w_scale"], None, torch.bfloat16, config=name)
        except Exception as e:  # noqa: BLE001
            res["asm"][f"int8-block/{name}"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            continue
        ck = gib.LAST_COMPILED
        ptx = ck.asm.get("ptx", "")
        wg = sorted({ln.split()[0] for ln in ptx.splitlines() if "wgmma.mma_async" in ln})
        res["asm"][f"int8-block/{name}"] = {"wgmma": wg, "regs": getattr(ck, "n_regs", None),
                                            "spills": getattr(ck, "n_spills", None),
                                            "shared": ck.metadata.shared}
    qx, sx = qa.quant_int8_row(x)
    d = quantize_weight(w, "int8-row")
    for name in gs.ROW_CONFIGS:
        gemm_rowscale(qx, sx, d["w_q"], d["w_scale"], None, torch.bfloat16, config=name)
        ck = gs.LAST_COMPILED
        wg = sorted({ln.split()[0] for ln in ck.asm.get("ptx", "").splitlines() if "wgmma.mma_async" in ln})
        res["asm"][f"int8-row/{name}"] = {"wgmma": wg, "regs": getattr(ck, "n_regs", None),
                                          "spills": getattr(ck, "n_spills", None), "shared": ck.metadata.shared}
    for kk, v in res["asm"].items():
        say(f"asm {kk}: {v}")
    dump()

    # ---- timing ---------------------------------------------------------------------------------------------
    res["time"] = []
    ms_list = BENCH_M[:1] if quick else BENCH_M
    for m in ms_list:
        for k, n in WAN_SHAPES:
            torch.manual_seed(1)
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            w = (torch.randn(n, k, device=dev) / k**0.5)
            wb, b = w.bfloat16(), torch.randn(n, device=dev, dtype=torch.bfloat16) * 0.1
            row = {"M": m, "K": k, "N": n}
            row["bf16"] = t(lambda: torch.nn.functional.linear(x, wb, b))
            for scheme, (quant, _) in qa.QUANTIZERS.items():
                row[f"quant/{scheme}"] = t(lambda: quant(x))
            for cfg in qa.INT8_BLOCK_QUANT_SWEEP:  # blocks per program x warps of the int8-block quantizer
                row[f"quant/int8-block/{cfg[0]}x{cfg[1]}w"] = t(lambda: qa.quant_int8_block(x, cfg))
            bias32 = b.float()
            for scheme, backend in BENCH_VARIANTS:
                d = quantize_weight(w, scheme)
                try:
                    row[f"{scheme}/{backend}"] = t(lambda: cuda_linear(x, d["w_q"], d["w_scale"], b, scheme,
                                                                       backend=backend))
                except Exception as e:  # noqa: BLE001 - one failing variant must not lose the rest of the run
                    row[f"{scheme}/{backend}"] = float("nan")
                    say(f"{scheme}/{backend} failed at M={m} K={k} N={n}: {type(e).__name__}: {str(e)[:300]}")
            if m == BENCH_M[0]:  # GEMM-only sweep of the block kernel's configurations
                qx, sx = qa.quant_int8_block(x)
                d = quantize_weight(w, "int8-block")
                for name in gib.CONFIGS:
                    try:
                        row[f"gemm/int8-block/{name}"] = t(lambda: gemm_block_scaled(
                            qx, sx, d["w_q"], d["w_scale"], b, torch.bfloat16, config=name))
                    except Exception as e:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                        row[f"gemm/int8-block/{name}"] = float("nan")
                        say(f"config {name} failed: {type(e).__name__}: {str(e)[:200]}")
                qx, sx = qa.quant_fp8_row(x)
                d = quantize_weight(w, "fp8-row")
                row["gemm/fp8-row/cublas"] = t(lambda: fp8_row_scaled_mm(qx, sx, d["w_q"], d["w_scale"], b,
                                                                         torch.bfloat16))
                for rs, qf in (("int8-row", qa.quant_int8_row), ("fp8-row", qa.quant_fp8_row)):
                    qx, sx = qf(x)
                    d = quantize_weight(w, rs)
                    for name in gs.ROW_CONFIGS:
                        try:
                            row[f"gemm/{rs}/{name}"] = t(lambda: gemm_rowscale(qx, sx, d["w_q"], d["w_scale"], b,
                                                                               torch.bfloat16, config=name))
                        except Exception as e:  # noqa: BLE001
                            row[f"gemm/{rs}/{name}"] = float("nan")
                            say(f"row config {name} failed: {type(e).__name__}: {str(e)[:200]}")
            res["time"].append(row)
            flops = 2 * m * n * k
            say(f"M={m} K={k} N={n}: bf16 {row['bf16']:.3f} ms ({flops / row['bf16'] / 1e9:.0f} TFLOP/s) | " +
                " ".join(f"{s}/{be} {row['bf16'] / row[f'{s}/{be}']:.2f}x" for s, be in BENCH_VARIANTS))
            dump()
            del x, w, wb
    # ---- summary --------------------------------------------------------------------------------------------
    summary = {}
    for s, be in BENCH_VARIANTS:
        sp = [r["bf16"] / r[f"{s}/{be}"] for r in res["time"]]
        summary[f"{s}/{be}"] = math.exp(sum(math.log(v) for v in sp) / len(sp))
    res["geomean_speedup"] = summary
    say("")
    say("## per shape: speedup vs cuBLAS bf16 (activation quantization included); quant time share")
    say(f"{'M':>6} {'K':>6} {'N':>6} {'bf16 ms':>8} " + " ".join(f"{s + '/' + be:>17}" for s, be in BENCH_VARIANTS))
    for r in res["time"]:
        say(f"{r['M']:>6} {r['K']:>6} {r['N']:>6} {r['bf16']:>8.3f} " +
            " ".join(f"{r['bf16'] / r[f'{s}/{be}']:>16.2f}x" for s, be in BENCH_VARIANTS))
    say("geomean: " + "  ".join(f"{kk} {v:.3f}x" for kk, v in summary.items()))
    dump()
    return res


def _bench_epilogue_log(out_dir: str | None, name: str):  # pragma: no cover - needs a GPU
    import datetime

    import triton

    from turbocompile.kernels.benchlog import BenchLog

    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": []}
    log = BenchLog(out_dir, name, res)
    log.say(f"# {res['device']}  torch {res['torch']}  triton {res['triton']}  {res['date']}")
    return res, log


def _fp8_row_operands(m: int, k: int, n: int, batch: int = 1):  # pragma: no cover - needs a GPU
    torch.manual_seed(0)
    x = torch.randn(batch, m // batch, k, device="cuda", dtype=torch.bfloat16)
    d = quantize_weight(torch.randn(n, k, device="cuda") / k**0.5, "fp8-row")
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
    q, sc = torch.ops.turbocompile.quant_fp8_row(x)
    return q, sc, d["w_q"], d["w_scale"], b, torch.bfloat16


def _epilogue_row(m: int, k: int, n: int, plain, fused, unfused) -> dict:  # pragma: no cover - needs a GPU
    """One shape of an epilogue bench: ``fused`` (the step in the GEMM's epilogue) against ``unfused`` (the GEMM,
    then the step on its own) in bf16 eps (|y| >= 0.01 floor) and bit-equal share, and the three as CUDA-graph
    replays; (fused - plain) is what the epilogue costs, (unfused - fused) what it saves."""
    from turbocompile.kernels.sage_attention import bench_ms_graph

    a, b = fused(), unfused()
    eps = torch.finfo(torch.bfloat16).eps
    row = {"M": m, "K": k, "N": n,
           "max_err_in_eps": ((a.float() - b.float()).abs() / b.float().abs().clamp_min(1e-2)).max().item() / eps,
           "bit_equal_frac": (a == b).float().mean().item(),
           "plain_ms": bench_ms_graph(plain), "fused_ms": bench_ms_graph(fused), "unfused_ms": bench_ms_graph(unfused)}
    row["epilogue_us"] = 1e3 * (row["fused_ms"] - row["plain_ms"])
    row["saved_us"] = 1e3 * (row["unfused_ms"] - row["fused_ms"])
    return row


def _bench_gelu(out_dir: str | None) -> dict:  # pragma: no cover - needs a GPU
    """The FFN's first GEMM with GELU in its epilogue (pass ``fuse_gelu``) against the same GEMM without it and
    against that GEMM followed by ``aten.gelu``, at the FFN shapes of the 1.3B and 14B models."""
    res, log = _bench_epilogue_log(out_dir, "bench_gelu_epilogue")
    gemm = torch.ops.turbocompile.fp8_row_gemm
    for m, k, n in ((32760, 1536, 8960), (75600, 5120, 13824)):
        args = _fp8_row_operands(m, k, n)
        row = _epilogue_row(m, k, n, lambda: gemm(*args), lambda: gemm(*args, "gelu_tanh"),
                            lambda: torch.nn.functional.gelu(gemm(*args), approximate="tanh"))
        res["rows"].append(row)
        log.say(f"M={m} K={k} N={n}: plain {row['plain_ms']:.3f} ms, fused {row['fused_ms']:.3f} "
                f"(epilogue {row['epilogue_us']:.0f} us), gemm + aten.gelu {row['unfused_ms']:.3f}; "
                f"fused vs unfused: max {row['max_err_in_eps']:.2f} eps (|y| >= 0.01 floor), "
                f"{100 * row['bit_equal_frac']:.3f}% bit-equal")
        log.dump()
        del args
    return res


def _bench_residual(out_dir: str | None) -> dict:  # pragma: no cover - needs a GPU
    """The block's gated residual step in the output GEMM's epilogue (pass ``fuse_residual``) against the GEMM
    alone and against the GEMM followed by the step as one ``torch.compile``d kernel (what the compiled engine ran
    before), at the o-projection and second-FFN shapes of the 1.3B and 14B models."""
    res, log = _bench_epilogue_log(out_dir, "bench_residual_epilogue")
    gemm = torch.ops.turbocompile.fp8_row_gemm
    step = torch.compile(lambda out, h, g: (h.float() + out * g).type_as(h), fullgraph=True)
    for m, k, n in ((32760, 1536, 1536), (32760, 8960, 1536), (75600, 5120, 5120), (75600, 13824, 5120)):
        args = _fp8_row_operands(m, k, n)
        h = torch.randn(1, m, n, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(1, 1, n, device="cuda")
        row = _epilogue_row(m, k, n, lambda: gemm(*args), lambda: gemm(*args, "", h, g),
                            lambda: step(gemm(*args), h, g))
        res["rows"].append(row)
        log.say(f"M={m} K={k} N={n}: plain {row['plain_ms']:.3f} ms, fused {row['fused_ms']:.3f} "
                f"(epilogue {row['epilogue_us']:.0f} us), gemm + compiled step {row['unfused_ms']:.3f} "
                f"(saved {row['saved_us']:.0f} us); fused vs unfused: max {row['max_err_in_eps']:.2f} eps, "
                f"{100 * row['bit_equal_frac']:.3f}% bit-equal")
        log.dump()
        del args, h
    return res


if __name__ == "__main__":  # pragma: no cover
    import argparse

    p = argparse.ArgumentParser(description="check and time the W8A8 linear ops on a GPU")
    p.add_argument("--bench", action="store_true", required=True)
    p.add_argument("--out", default=None, help="folder for bench_linear.json / .log")
    p.add_argument("--quick", action="store_true", help="first M only, no 2**31-element check")
    p.add_argument("--gelu", action="store_true", help="only the GELU epilogue of fp8_row_gemm (pass fuse_gelu)")
    p.add_argument("--residual", action="store_true",
                   help="only the residual-step epilogue of fp8_row_gemm (pass fuse_residual)")
    args = p.parse_args()
    if args.gelu or args.residual:
        if args.gelu:
            _bench_gelu(args.out)
        if args.residual:
            _bench_residual(args.out)
    else:
        _bench(args.out, quick=args.quick)
