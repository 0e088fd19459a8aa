"""TensorRT plugins for the ``turbocompile::*`` ops, written by hand with ``tensorrt.plugin`` (TensorRT >= 10.9).

UNTESTED WITH TENSORRT: TensorRT cannot be installed on the project's machines (docs/tensorrt.md says exactly what
ran). What is tested on the CPU: the AOT kernels below compile to ``sm_90a`` PTX with Triton, and they compute the
reference result under ``TRITON_INTERPRET=1`` (tests/test_backends.py).

Why by hand: Torch-TensorRT 2.11's plugin auto-generation is switched off for TensorRT 10.14/10.15, and before 2.13
its generated descriptors share one global (every op got the last op's shapes).

For every op of :data:`turbocompile.plugins.onnx_schemas.OP_SPECS` :func:`register_plugins` defines

- ``@trtp.register("turbocompile::<op>")``: the output descriptor (like the first input; the linears replace the
  last dim by ``w_q``'s rows) and the attributes, annotated as 1-element NumPy arrays because TensorRT's ONNX parser
  hands ONNX float/int attributes over as FLOAT32/INT32 fields;
- ``@trtp.autotune``: the type combinations the op accepts (activations FP32/FP16/BF16, parameters in the same type
  or FP32, INT8 or FP8 weights, FP32 scales);
- ``@trtp.impl``: a Python implementation calling ``torch.ops.turbocompile.<op>`` (our Triton kernels) on TensorRT's
  stream, for debugging and for the ops without an AOT implementation;
- ``@trtp.aot_impl`` for :data:`AOT_OPS`: the op's Triton kernel compiled to PTX, which TensorRT embeds in the engine
  and launches itself, so the engine runs without Python.

Which ops are AOT: an AOT plugin launches exactly one kernel, takes no workspace and passes only int32 scalars
after the inputs and before the outputs. The fused norms are one Triton kernel each (wrapped below in adapters that
put the arguments in that order). The int8-block linear is two kernels (activation quantization, block-scaled GEMM):
the TensorRT build splits each ``int8_block_linear`` node into ``quant_int8_block`` + ``gemm_int8_block``
(``tensorrt_build.split_int8_block_linears``), one AOT plugin per kernel, the int8 activations and their scales
passing between them as plugin outputs/inputs. The other linears (their GEMM is cuBLAS, not Triton) and the
attention ops (quantization + block map + attention kernels) are :data:`JIT_OPS`: the engine calls back into Python
for them, and the loading process must import this module.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from .onnx_schemas import DOMAIN, OP_SPECS, SPLIT_OPS, OpSpec

log = logging.getLogger(__name__)

#: ops whose plugin has an ahead-of-time (PTX) implementation: the engine needs no Python for them. The two halves
#: of the int8-block linear are what ``tensorrt_build.prepare_for_tensorrt`` splits ``int8_block_linear`` into.
AOT_OPS: frozenset[str] = frozenset({"layernorm_modulate", "layer_norm_affine", "rms_norm", *SPLIT_OPS})
#: ops whose plugin runs the Python implementation (several kernels each; see the module docstring)
JIT_OPS: frozenset[str] = frozenset(OP_SPECS) - AOT_OPS

_FLOATS = ("FP32", "FP16", "BF16")
_QUANT = {"int8": "INT8", "fp8": "FP8"}
_TRITON_TYPES = {"FP32": "fp32", "FP16": "fp16", "BF16": "bf16"}

_LOCK = threading.Lock()
_REGISTERED = False


# ------------------------------------------------------------------------------------------------------------------
# Pure helpers (no TensorRT needed; unit-tested)
# ------------------------------------------------------------------------------------------------------------------
def type_combinations(spec: OpSpec) -> list[str]:
    """``AutoTuneCombination`` io-type strings (inputs, then the output) the op accepts, one per combination."""
    quant = _QUANT.get(spec.name.split("_")[0], "INT8")
    out = []
    for t in _FLOATS:
        for p in dict.fromkeys((t, "FP32")):
            kinds = {"T": t, "P": p, "Q": quant, "S": "FP32"}
            out.append(", ".join([kinds[k] for _, k in spec.inputs] + [t]))
    return out


def norm_launch(d: int) -> tuple[int, int, int]:
    """(rows per program, BLOCK_D, warps) of the fused-norm kernel for hidden size ``d`` (as ``kernels.norms``)."""
    from turbocompile.kernels import norms

    if d > norms.MAX_D:
        raise ValueError(f"fused norms hold a row in registers: D={d} > {norms.MAX_D}")
    block_d = 1 << (d - 1).bit_length()
    rows = norms.ROWS_PER_PROGRAM or max(1, min(16, 16384 // block_d))
    warps = norms.NUM_WARPS or (2 if block_d <= 2048 else 4)  # kernels/norms.py: 0 means "by D"
    return rows, block_d, warps


try:  # the AOT kernels: Triton kernels with the AOT argument order (inputs, int32 scalars, output) around
    # kernels.norms' kernel (Triton resolves the names a kernel uses from this module's globals)
    import triton
    import triton.language as tl

    from turbocompile.kernels.gemm_int8_block import _gemm_block_scaled_kernel
    from turbocompile.kernels.norms import _norm_kernel
    from turbocompile.kernels.quantize_activations import _quant_int8_block_kernel
except Exception:  # noqa: BLE001 - no Triton (or no Triton kernels): the AOT kernels are unavailable
    triton = None

if triton is not None:

    @triton.jit
    def norm_two_params(x_ptr, p0_ptr, p1_ptr, R, L, D, p0_sb, p0_sl, p1_sb, p1_sl, out_ptr,
                        EPS: tl.constexpr, CENTER: tl.constexpr, ONE_PLUS: tl.constexpr, P0_IS_MUL: tl.constexpr,
                        PARAM_ROWS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        """layernorm_modulate (p0 = shift adds, p1 = scale multiplies) and layer_norm_affine (p0 = weight)."""
        if P0_IS_MUL:
            _norm_kernel(x_ptr, p0_ptr, p1_ptr, out_ptr, R, L, D, D, D, p0_sb, p0_sl, p1_sb, p1_sl, EPS,
                         CENTER=CENTER, ONE_PLUS=ONE_PLUS, HAS_ADD=True, PARAM_ROWS=PARAM_ROWS, ROWS=ROWS,
                         BLOCK_D=BLOCK_D, OUT_ROUND=0)
        else:
            _norm_kernel(x_ptr, p1_ptr, p0_ptr, out_ptr, R, L, D, D, D, p1_sb, p1_sl, p0_sb, p0_sl, EPS,
                         CENTER=CENTER, ONE_PLUS=ONE_PLUS, HAS_ADD=True, PARAM_ROWS=PARAM_ROWS, ROWS=ROWS,
                         BLOCK_D=BLOCK_D, OUT_ROUND=0)

    @triton.jit
    def norm_one_param(x_ptr, p0_ptr, R, L, D, p0_sb, p0_sl, out_ptr,
                       EPS: tl.constexpr, PARAM_ROWS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        """rms_norm (p0 = weight)."""
        _norm_kernel(x_ptr, p0_ptr, p0_ptr, out_ptr, R, L, D, D, D, p0_sb, p0_sl, 0, 0, EPS,
                     CENTER=False, ONE_PLUS=False, HAS_ADD=False, PARAM_ROWS=PARAM_ROWS, ROWS=ROWS,
                     BLOCK_D=BLOCK_D, OUT_ROUND=0)


    @triton.jit
    def quant_int8_block_aot(x_ptr, M, K, KB, q_ptr, s_ptr, INTERP: tl.constexpr):
        """x [M, K] -> int8 q [M, K], fp32 scales [ceil(M/128), KB]; one program per 128x128 tile."""
        _quant_int8_block_kernel(x_ptr, q_ptr, s_ptr, M, K, K, K, KB, BLOCK_M=128, GROUPS=1, INTERP=INTERP)

    @triton.jit
    def gemm_int8_block_aot(a_ptr, sa_ptr, b_ptr, sb_ptr, bias_ptr, M, N, K, KB, c_ptr,
                            EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, RESCALE: tl.constexpr,
                            OUT_ROUND: tl.constexpr):
        """c [M, N] = block-scaled int8 a [M, K] x b [N, K]^T + bias, in c's type (all contiguous)."""
        _gemm_block_scaled_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K, K, K, N, KB, 1, KB, 1,
                                  HAS_BIAS=True, A_PER_ROW=False, EVEN_K=EVEN_K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                  BLOCK_K=BLOCK_K, GROUP_M=GROUP_M, RESCALE=RESCALE, OUT_ROUND=OUT_ROUND)


def gemm_config() -> Any:
    """The block-scaled GEMM's default tile configuration (``kernels/gemm_int8_block.py``), without TMA: a TMA
    kernel needs tensor descriptors built on the host, which an AOT plugin cannot pass."""
    from turbocompile.kernels import gemm_int8_block as g

    cfg = g.CONFIGS[g.DEFAULT_CONFIG]
    if cfg.tma or cfg.rescale == 3:
        cfg = g.GemmConfig()
    return cfg


def compile_linear_split(part: str, x_type: str, k: int, capability: tuple[int, int] = (9, 0)) -> Any:
    """Compile the AOT kernel of one half of the split int8-block linear: ``"quant"`` (x -> int8 + scales) or
    ``"gemm"`` (int8 operands -> output of ``x_type``, bias of ``x_type``), for a static K."""
    from triton.backends.compiler import GPUTarget

    if triton is None:
        raise ImportError("the AOT linear kernels need Triton and turbocompile.kernels")
    ty = "*" + _TRITON_TYPES[x_type]
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    if part == "quant":
        signature = {"x_ptr": ty, "M": "i32", "K": "i32", "KB": "i32", "q_ptr": "*i8", "s_ptr": "*fp32",
                     "INTERP": "constexpr"}
        src = triton.compiler.ASTSource(fn=quant_int8_block_aot, signature=signature, constexprs={"INTERP": False})
        return triton.compile(src, target=target, options={"num_warps": 8})
    cfg = gemm_config()
    constexprs = {"EVEN_K": k % cfg.block_k == 0, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                  "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m, "RESCALE": cfg.rescale, "OUT_ROUND": 0}
    signature = {"a_ptr": "*i8", "sa_ptr": "*fp32", "b_ptr": "*i8", "sb_ptr": "*fp32", "bias_ptr": ty,
                 **{n: "i32" for n in ("M", "N", "K", "KB")}, "c_ptr": ty, **{n: "constexpr" for n in constexprs}}
    src = triton.compiler.ASTSource(fn=gemm_int8_block_aot, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=target, options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def norm_adapter(op: str) -> tuple[Any, dict[str, Any]]:
    """The AOT kernel of a norm op and its op-specific constexprs."""
    if triton is None:
        raise ImportError("the AOT norm kernels need Triton and turbocompile.kernels.norms")
    if op == "layernorm_modulate":  # inputs x, shift, scale: the scale multiplies, the shift adds
        return norm_two_params, {"CENTER": True, "ONE_PLUS": True, "P0_IS_MUL": False}
    if op == "layer_norm_affine":  # inputs x, weight, bias
        return norm_two_params, {"CENTER": True, "ONE_PLUS": False, "P0_IS_MUL": True}
    if op == "rms_norm":
        return norm_one_param, {}
    raise KeyError(op)


def compile_norm(op: str, x_type: str, param_types: tuple[str, ...], d: int, eps: float,
                 capability: tuple[int, int] = (9, 0), param_rows: bool = True) -> Any:
    """Compile the AOT kernel of norm ``op`` to PTX for one type combination (``"BF16"``, ...) and hidden size; runs
    without a GPU (Triton targets ``capability``; sm_90 and newer get arch-specific ``sm_XXa`` PTX).
    ``param_rows``: the parameters vary per sample or token (False: one vector for all rows)."""
    from triton.backends.compiler import GPUTarget

    kernel, flags = norm_adapter(op)
    rows, block_d, warps = norm_launch(d)
    x_ty = "*" + _TRITON_TYPES[x_type]
    p_ty = ["*" + _TRITON_TYPES[p] for p in param_types]
    n_params = len(param_types)
    ptrs = {"x_ptr": x_ty, **{f"p{i}_ptr": p_ty[i] for i in range(n_params)}}
    ints = ["R", "L", "D"] + [f"p{i}_{s}" for i in range(n_params) for s in ("sb", "sl")]
    constexprs = {"EPS": float(eps), "PARAM_ROWS": bool(param_rows), "ROWS": rows, "BLOCK_D": block_d, **flags}
    signature = {**ptrs, **{n: "i32" for n in ints}, "out_ptr": x_ty, **{k: "constexpr" for k in constexprs}}
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    return triton.compile(src, target=target, options={"num_warps": warps})


def _scalar(a: Any, kind: type) -> Any:
    """An attribute as a Python scalar (ONNX-parsed attributes arrive as 1-element NumPy arrays)."""
    import numpy as np

    return kind(np.asarray(a).reshape(-1)[0])


# ------------------------------------------------------------------------------------------------------------------
# TensorRT registrations
# ------------------------------------------------------------------------------------------------------------------
def register_plugins() -> list[str]:
    """Define every ``turbocompile::*`` plugin (once per process); returns the plugin ids.

    Import TensorRT first (``turbocompile.backends.tensorrt_build.check_tensorrt``): this raises ImportError
    without it.
    """
    global _REGISTERED
    with _LOCK:
        if not _REGISTERED:
            _define_all()
            _REGISTERED = True
    return [f"{DOMAIN}::{n}" for n in (*OP_SPECS, *SPLIT_OPS)]


def _define_all() -> None:  # noqa: C901 - one short block per op, by design
    from typing import List, Tuple, Union

    import numpy as np
    import numpy.typing as npt
    import tensorrt as trt
    import tensorrt.plugin as trtp

    F32 = npt.NDArray[np.float32]
    I32 = npt.NDArray[np.int32]
    Desc = trtp.TensorDesc
    Outs = Tuple[trtp.TensorDesc]
    AotResult = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]
    names = {trt.float32: "FP32", trt.float16: "FP16", trt.bfloat16: "BF16"}

    def combos(op: str) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(c) for c in type_combinations(OP_SPECS[op])]

    def run_torch(op: str, inputs: tuple, scalars: tuple, outputs: tuple, stream: int) -> None:
        """JIT path: wrap TensorRT's buffers (zero copy), run the torch op on TensorRT's stream, copy the result."""
        import torch

        import turbocompile.kernels as kernels

        kernels.load_ops()
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            args = [torch.as_tensor(t, device="cuda") for t in inputs]
            out = torch.as_tensor(outputs[0], device="cuda")
            out.copy_(getattr(torch.ops.turbocompile, op)(*args, *scalars))

    def linear_desc(x: Desc, w_q: Desc) -> Desc:
        out = x.like()
        out.shape_expr[x.ndim - 1] = w_q.shape_expr[0]
        return out

    # -- attention (JIT) -------------------------------------------------------------------------------------------
    @trtp.register(f"{DOMAIN}::sage_attention")
    def _sage_attention_desc(q: Desc, k: Desc, v: Desc, blk_q: I32, blk_k: I32) -> Desc:
        return q.like()

    @trtp.autotune(f"{DOMAIN}::sage_attention")
    def _sage_attention_tune(q, k, v, outputs) -> List[trtp.AutoTuneCombination]:
        return combos("sage_attention")

    @trtp.impl(f"{DOMAIN}::sage_attention")
    def _sage_attention_impl(q, k, v, blk_q: I32, blk_k: I32, outputs, stream: int) -> None:
        run_torch("sage_attention", (q, k, v), (_scalar(blk_q, int), _scalar(blk_k, int)), outputs, stream)

    for op in ("sage_sla", "sla"):
        _define_sla(trtp, op, combos, run_torch, F32, I32)

    # -- W8A8 linears (JIT) ----------------------------------------------------------------------------------------
    for op in ("int8_block_linear", "int8_row_linear", "fp8_row_linear", "fp8_block_linear"):
        _define_linear(trtp, op, combos, run_torch, linear_desc)

    # -- the int8-block linear split in two (AOT + JIT) ------------------------------------------------------------
    def leading(x: Desc) -> Any:
        rows = x.shape_expr[0]
        for i in range(1, x.ndim - 1):
            rows = rows * x.shape_expr[i]
        return rows

    def static_dim(e: Any, what: str) -> int:
        if not e.is_constant:
            raise ValueError(f"{what} must be static for the AOT int8-block linear")
        return int(e.constant_value)

    @trtp.register(f"{DOMAIN}::quant_int8_block")
    def _quant_desc(x: Desc) -> Tuple[Desc, Desc]:
        dims = tuple(x.shape_expr[i] for i in range(x.ndim))
        scale = (trtp.cdiv(leading(x), 128), trtp.cdiv(x.shape_expr[x.ndim - 1], 128))
        return trtp.from_shape_expr(dims, dtype=trt.int8), trtp.from_shape_expr(scale, dtype=trt.float32)

    @trtp.autotune(f"{DOMAIN}::quant_int8_block")
    def _quant_tune(x, outputs) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(f"{t}, INT8, FP32") for t in _FLOATS]

    @trtp.impl(f"{DOMAIN}::quant_int8_block")
    def _quant_impl(x, outputs, stream: int) -> None:
        import torch

        from turbocompile.kernels.quantize_activations import quant_int8_block

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            q, scale = quant_int8_block(torch.as_tensor(x, device="cuda"))
            torch.as_tensor(outputs[0], device="cuda").view(q.shape).copy_(q)
            torch.as_tensor(outputs[1], device="cuda").copy_(scale)

    @trtp.aot_impl(f"{DOMAIN}::quant_int8_block")
    def _quant_aot(x: Desc, outputs: Tuple[Desc, Desc], tactic: int) -> AotResult:
        k = static_dim(x.shape_expr[x.ndim - 1], "K")
        kernel = compile_linear_split("quant", names[x.dtype], k, _capability())
        rows = leading(x)
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y = trtp.cdiv(rows, 128), -(-k // 128)
        launch.block_x = kernel.metadata.num_warps * 32
        launch.shared_mem = kernel.metadata.shared
        args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (rows, k, -(-k // 128))])
        return kernel.metadata.name.encode(), kernel.asm["ptx"].encode(), launch, args

    @trtp.register(f"{DOMAIN}::gemm_int8_block")
    def _gemm_desc(x_q: Desc, x_scale: Desc, w_q: Desc, w_scale: Desc, bias: Desc) -> Desc:
        dims = [x_q.shape_expr[i] for i in range(x_q.ndim)]
        dims[-1] = w_q.shape_expr[0]
        return trtp.from_shape_expr(tuple(dims), dtype=bias.dtype)

    @trtp.autotune(f"{DOMAIN}::gemm_int8_block")
    def _gemm_tune(x_q, x_scale, w_q, w_scale, bias, outputs) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(f"INT8, FP32, INT8, FP32, {t}, {t}") for t in _FLOATS]

    @trtp.impl(f"{DOMAIN}::gemm_int8_block")
    def _gemm_impl(x_q, x_scale, w_q, w_scale, bias, outputs, stream: int) -> None:
        import torch

        from turbocompile.kernels.gemm_int8_block import gemm_block_scaled

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            a = torch.as_tensor(x_q, device="cuda")
            out = torch.as_tensor(outputs[0], device="cuda")
            b = torch.as_tensor(bias, device="cuda")
            y = gemm_block_scaled(a.reshape(-1, a.shape[-1]), torch.as_tensor(x_scale, device="cuda"),
                                  torch.as_tensor(w_q, device="cuda"), torch.as_tensor(w_scale, device="cuda"), b,
                                  b.dtype)
            out.view(y.shape).copy_(y)

    @trtp.aot_impl(f"{DOMAIN}::gemm_int8_block")
    def _gemm_aot(x_q: Desc, x_scale: Desc, w_q: Desc, w_scale: Desc, bias: Desc, outputs: Outs,
                  tactic: int) -> AotResult:
        k = static_dim(x_q.shape_expr[x_q.ndim - 1], "K")
        n = static_dim(w_q.shape_expr[0], "N")
        kernel = compile_linear_split("gemm", names[bias.dtype], k, _capability())
        cfg = gemm_config()
        rows = leading(x_q)
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(rows, cfg.block_m) * (-(-n // cfg.block_n))
        launch.block_x = kernel.metadata.num_warps * 32
        launch.shared_mem = kernel.metadata.shared
        args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (rows, n, k, -(-k // 128))])
        return kernel.metadata.name.encode(), kernel.asm["ptx"].encode(), launch, args

    # -- fused norms (AOT + JIT) -----------------------------------------------------------------------------------
    def norm_aot(op: str, x: Desc, params: tuple, eps: float, outputs: Outs) -> AotResult:
        d_expr = x.shape_expr[x.ndim - 1]
        if not d_expr.is_constant:
            raise ValueError(f"{op}: the hidden size must be static for the AOT kernel")
        d = int(d_expr.constant_value)
        kernel = compile_norm(op, names[x.dtype], tuple(names[p.dtype] for p in params), d, eps,
                              _capability(), param_rows=any(p.ndim > 1 for p in params))
        rows_expr = leading(x)
        seq = x.shape_expr[1] if x.ndim == 3 else rows_expr
        extra = [rows_expr, seq, d]
        for p in params:
            extra += list(_param_strides(p, d))
        rows, _, _ = norm_launch(d)
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(rows_expr, rows)
        launch.block_x = kernel.metadata.num_warps * 32
        launch.shared_mem = kernel.metadata.shared
        args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in extra])
        return kernel.metadata.name.encode(), kernel.asm["ptx"].encode(), launch, args

    @trtp.register(f"{DOMAIN}::layernorm_modulate")
    def _lnm_desc(x: Desc, shift: Desc, scale: Desc, eps: F32) -> Desc:
        return x.like()

    @trtp.autotune(f"{DOMAIN}::layernorm_modulate")
    def _lnm_tune(x, shift, scale, outputs) -> List[trtp.AutoTuneCombination]:
        return combos("layernorm_modulate")

    @trtp.impl(f"{DOMAIN}::layernorm_modulate")
    def _lnm_impl(x, shift, scale, eps: F32, outputs, stream: int) -> None:
        run_torch("layernorm_modulate", (x, shift, scale), (_scalar(eps, float),), outputs, stream)

    @trtp.aot_impl(f"{DOMAIN}::layernorm_modulate")
    def _lnm_aot(x: Desc, shift: Desc, scale: Desc, eps: F32, outputs: Outs, tactic: int) -> AotResult:
        return norm_aot("layernorm_modulate", x, (shift, scale), _scalar(eps, float), outputs)

    @trtp.register(f"{DOMAIN}::layer_norm_affine")
    def _lna_desc(x: Desc, weight: Desc, bias: Desc, eps: F32) -> Desc:
        return x.like()

    @trtp.autotune(f"{DOMAIN}::layer_norm_affine")
    def _lna_tune(x, weight, bias, outputs) -> List[trtp.AutoTuneCombination]:
        return combos("layer_norm_affine")

    @trtp.impl(f"{DOMAIN}::layer_norm_affine")
    def _lna_impl(x, weight, bias, eps: F32, outputs, stream: int) -> None:
        run_torch("layer_norm_affine", (x, weight, bias), (_scalar(eps, float),), outputs, stream)

    @trtp.aot_impl(f"{DOMAIN}::layer_norm_affine")
    def _lna_aot(x: Desc, weight: Desc, bias: Desc, eps: F32, outputs: Outs, tactic: int) -> AotResult:
        return norm_aot("layer_norm_affine", x, (weight, bias), _scalar(eps, float), outputs)

    @trtp.register(f"{DOMAIN}::rms_norm")
    def _rms_desc(x: Desc, weight: Desc, eps: F32) -> Desc:
        return x.like()

    @trtp.autotune(f"{DOMAIN}::rms_norm")
    def _rms_tune(x, weight, outputs) -> List[trtp.AutoTuneCombination]:
        return combos("rms_norm")

    @trtp.impl(f"{DOMAIN}::rms_norm")
    def _rms_impl(x, weight, eps: F32, outputs, stream: int) -> None:
        run_torch("rms_norm", (x, weight), (_scalar(eps, float),), outputs, stream)

    @trtp.aot_impl(f"{DOMAIN}::rms_norm")
    def _rms_aot(x: Desc, weight: Desc, eps: F32, outputs: Outs, tactic: int) -> AotResult:
        return norm_aot("rms_norm", x, (weight,), _scalar(eps, float), outputs)


def _define_sla(trtp: Any, op: str, combos: Any, run_torch: Any, F32: Any, I32: Any) -> None:
    """sage_sla and sla share a signature: (q, k, v, proj_weight, proj_bias; topk, blk_q, blk_k)."""
    from typing import List

    Desc = trtp.TensorDesc

    @trtp.register(f"{DOMAIN}::{op}")
    def _desc(q: Desc, k: Desc, v: Desc, proj_weight: Desc, proj_bias: Desc, topk: F32, blk_q: I32,
              blk_k: I32) -> Desc:
        return q.like()

    @trtp.autotune(f"{DOMAIN}::{op}")
    def _tune(q, k, v, proj_weight, proj_bias, outputs) -> List[trtp.AutoTuneCombination]:
        return combos(op)

    @trtp.impl(f"{DOMAIN}::{op}")
    def _impl(q, k, v, proj_weight, proj_bias, topk: F32, blk_q: I32, blk_k: I32, outputs, stream: int) -> None:
        run_torch(op, (q, k, v, proj_weight, proj_bias),
                  (_scalar(topk, float), _scalar(blk_q, int), _scalar(blk_k, int)), outputs, stream)


def _define_linear(trtp: Any, op: str, combos: Any, run_torch: Any, linear_desc: Any) -> None:
    """The four W8A8 linears share a signature: (x, w_q, w_scale, bias) -> [..., N]."""
    from typing import List

    Desc = trtp.TensorDesc

    @trtp.register(f"{DOMAIN}::{op}")
    def _desc(x: Desc, w_q: Desc, w_scale: Desc, bias: Desc) -> Desc:
        return linear_desc(x, w_q)

    @trtp.autotune(f"{DOMAIN}::{op}")
    def _tune(x, w_q, w_scale, bias, outputs) -> List[trtp.AutoTuneCombination]:
        return combos(op)

    @trtp.impl(f"{DOMAIN}::{op}")
    def _impl(x, w_q, w_scale, bias, outputs, stream: int) -> None:
        run_torch(op, (x, w_q, w_scale, bias), (), outputs, stream)


def _param_strides(p: Any, d: int) -> tuple[Any, Any]:
    """(batch stride, token stride) of a norm parameter broadcast to x's [B, L, D] (0 along broadcast dims)."""
    if p.ndim == 1:
        return 0, 0
    dims = p.shape_expr

    def is_one(e: Any) -> bool:
        return bool(e.is_constant and int(e.constant_value) == 1)

    if p.ndim == 2:  # [L, D]
        return 0, (0 if is_one(dims[0]) else d)
    sb = 0 if is_one(dims[0]) else dims[1] * d
    sl = 0 if is_one(dims[1]) else d
    return sb, sl


def _capability() -> tuple[int, int]:
    """Compute capability of the GPU the engine is being built on."""
    import torch

    return torch.cuda.get_device_capability(0)
