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
#: "triton" = this package's kernels; "cublas" = torch._scaled_mm / F.scaled_mm / torch._int_mm.
GEMM_BACKENDS: dict[str, str] = {
    "int8-block": "triton",
    "int8-row": "triton",
    "fp8-row": "cublas",
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
        out = gemm_block_scaled(q, s, w_q, w_scale, bias, x.dtype)
    elif scheme == "fp8-block":
        if backend == "cublas" and fp8_block_cublas_ok(m, n, k):
            out = fp8_block_scaled_mm(q, s, w_q, w_scale, bias, x.dtype)
        else:
            out = gemm_block_scaled(q, s, w_q, w_scale, bias, x.dtype, a_per_row=True)
    elif backend == "cublas" and cublas_ok(m, n, k):
        fn = fp8_row_scaled_mm if scheme == "fp8-row" else int8_row_int_mm
        out = fn(q, s, w_q, w_scale, bias, x.dtype)
    else:
        out = gemm_rowscale(q, s, w_q, w_scale, bias, x.dtype)
    return out.reshape(*x.shape[:-1], n)


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


