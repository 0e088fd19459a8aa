"""ONNX operator schemas for the ``torch.ops.turbocompile`` custom ops (domain ``turbocompile``, opset 1).

Why register schemas at all: the dynamo ONNX exporter only emits a node of a foreign domain with the right number
of outputs when an ``onnx.defs.OpSchema`` exists for it (without one it produced zero outputs and failed), and
``onnx.checker`` / shape inference can then check every ``turbocompile::*`` node like a standard one.

One :class:`OpSpec` per op is the single description shared by the ONNX exporter (``backends/onnx_export.py``), the
onnxruntime Python ops (``backends/onnx_runtime.py``) and the TensorRT plugins (``plugins/tensorrt_plugins.py``):
tensor inputs first, then scalar attributes, in the order of the torch schema (``tests/test_backends.py`` checks the
two agree). Two optional attributes are declared for TensorRT's ONNX parser, which the TensorRT build adds:
``plugin_namespace`` (the plugin namespace; TensorRT >= 10.10 also reads it from the node domain) and ``aot``
(1: use the plugin's ahead-of-time implementation). Other runtimes ignore them.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import defs

DOMAIN = "turbocompile"
OPSET_VERSION = 1

_FLOATS = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)")
#: type variable -> allowed ONNX tensor types
TYPE_CONSTRAINTS: dict[str, tuple[str, ...]] = {
    "T": _FLOATS,  # activations; the output has this type
    "P": _FLOATS,  # parameters (norm weights, modulation, SLA projection, linear bias); fp32 tables stay fp32
    "Q": ("tensor(int8)", "tensor(float8e4m3fn)"),  # quantized weights
    "S": ("tensor(float)",),  # quantization scales
}


@dataclass(frozen=True)
class OpSpec:
    """A custom op as ONNX sees it: tensor inputs (name, type variable), attributes (name, "int" | "float")."""

    name: str
    inputs: tuple[tuple[str, str], ...]
    attrs: tuple[tuple[str, str], ...]
    doc: str
    #: index of the input whose leading dims the output keeps; None: the output has input 0's shape
    out_features_from: int | None = None

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.inputs)

    @property
    def attr_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.attrs)


_ATTN = (("q", "T"), ("k", "T"), ("v", "T"))
_SLA = _ATTN + (("proj_weight", "P"), ("proj_bias", "P"))
_SLA_ATTRS = (("topk", "float"), ("blk_q", "int"), ("blk_k", "int"))
_LINEAR = (("x", "T"), ("w_q", "Q"), ("w_scale", "S"), ("bias", "P"))
_LINEAR_DOC = ("y[..., N] = dequant(quant(x) @ w_q^T) + bias with {what}; the exporter feeds zeros when the Linear "
               "has no bias. Output in x's type.")

OP_SPECS: dict[str, OpSpec] = {
    s.name: s
    for s in [
        OpSpec("sage_attention", _ATTN, (("blk_q", "int"), ("blk_k", "int")),
               "Dense SageAttention of [B, H, L, D] q/k/v: INT8 QK^T per blk_q/blk_k block with K smoothing, "
               "FP8 PV, FP32 accumulation. Output like q."),
        OpSpec("sage_sla", _SLA, _SLA_ATTRS,
               "SageSLA: SageAttention restricted to the top-k fraction of key blocks per query block, plus the "
               "linear-attention branch through proj_weight [D, D] / proj_bias [D]. Output like q."),
        OpSpec("sla", _SLA, _SLA_ATTRS,
               "SLA in the activation dtype (no INT8/FP8): block-sparse softmax attention plus the linear branch. "
               "Output like q."),
        OpSpec("int8_block_linear", _LINEAR, (), _LINEAR_DOC.format(what="INT8 128x128 blocks for x and w_q"), 1),
        OpSpec("int8_row_linear", _LINEAR, (), _LINEAR_DOC.format(what="INT8 per-token x, per-channel w_q"), 1),
        OpSpec("fp8_row_linear", _LINEAR, (), _LINEAR_DOC.format(what="e4m3 per-token x, per-channel w_q"), 1),
        OpSpec("fp8_block_linear", _LINEAR, (),
               _LINEAR_DOC.format(what="e4m3 1x128 groups for x, 128x128 blocks for w_q"), 1),
        OpSpec("layernorm_modulate", (("x", "T"), ("shift", "P"), ("scale", "P")), (("eps", "float"),),
               "LayerNorm without affine of x [B, L, D] in fp32, times (1 + scale) plus shift. Output like x."),
        OpSpec("layer_norm_affine", (("x", "T"), ("weight", "P"), ("bias", "P")), (("eps", "float"),),
               "LayerNorm over the last dim in fp32 with weight and bias. Output like x."),
        OpSpec("rms_norm", (("x", "T"), ("weight", "P")), (("eps", "float"),),
               "RMSNorm over the last dim in fp32 times weight. Output like x."),
    ]
}

_ATTR_TYPES = {"int": defs.OpSchema.AttrType.INT, "float": defs.OpSchema.AttrType.FLOAT}


def _infer(spec: OpSpec):
    """Type and shape inference: the output has input 0's type; its shape is input 0's, with the last dim
    replaced by ``w_q``'s first for the linears."""

    def infer(ctx: onnx.shape_inference.InferenceContext) -> None:
        x_type = ctx.get_input_type(0)
        if x_type is None or not x_type.HasField("tensor_type"):
            return
        out = onnx.TypeProto()
        out.CopyFrom(x_type)
        if spec.out_features_from is not None and out.tensor_type.HasField("shape"):
            w_type = ctx.get_input_type(spec.out_features_from)
            last = out.tensor_type.shape.dim[len(out.tensor_type.shape.dim) - 1]
            last.Clear()
            if w_type is not None and w_type.tensor_type.HasField("shape") and w_type.tensor_type.shape.dim:
                last.CopyFrom(w_type.tensor_type.shape.dim[0])
        ctx.set_output_type(0, out)

    return infer


def make_schema(spec: OpSpec) -> defs.OpSchema:
    """The ``onnx.defs.OpSchema`` of one op (not registered)."""
    used = sorted({t for _, t in spec.inputs} | {"T"})
    schema = defs.OpSchema(
        spec.name, DOMAIN, OPSET_VERSION,
        doc=spec.doc,
        inputs=[defs.OpSchema.FormalParameter(n, t) for n, t in spec.inputs],
        outputs=[defs.OpSchema.FormalParameter("y", "T")],
        type_constraints=[(t, list(TYPE_CONSTRAINTS[t]), "") for t in used],
        attributes=[defs.OpSchema.Attribute(n, _ATTR_TYPES[k], "", required=True) for n, k in spec.attrs]
        + _trt_attributes(),
    )
    schema.set_type_and_shape_inference_function(_infer(spec))
    return schema


#: The int8-block linear split in two single-kernel ops, for TensorRT's ahead-of-time plugins (an AOT plugin launches
#: one kernel): ``tensorrt_build.prepare_for_tensorrt`` rewrites ``int8_block_linear`` into these. Not torch ops.
SPLIT_OPS = ("quant_int8_block", "gemm_int8_block")


def _trt_attributes() -> list[defs.OpSchema.Attribute]:
    return [defs.OpSchema.Attribute("aot", defs.OpSchema.AttrType.INT,
                                    "1: TensorRT uses the plugin's ahead-of-time (PTX) implementation", required=False),
            defs.OpSchema.Attribute("plugin_namespace", defs.OpSchema.AttrType.STRING,
                                    "TensorRT plugin namespace (turbocompile)", required=False)]


def _split_schemas() -> list[defs.OpSchema]:
    """``quant_int8_block(x) -> (x_q int8 like x, x_scale fp32 [ceil(M/128), ceil(K/128)])`` with M the product of
    x's leading dims; ``gemm_int8_block(x_q, x_scale, w_q, w_scale, bias) -> y [..., N]`` in the bias' type."""

    def infer_quant(ctx: onnx.shape_inference.InferenceContext) -> None:
        x_type = ctx.get_input_type(0)
        if x_type is None or not x_type.HasField("tensor_type"):
            return
        q = onnx.TypeProto()
        q.CopyFrom(x_type)
        q.tensor_type.elem_type = onnx.TensorProto.INT8
        ctx.set_output_type(0, q)
        scale = onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, [None, None])
        ctx.set_output_type(1, scale)

    def infer_gemm(ctx: onnx.shape_inference.InferenceContext) -> None:
        q_type, w_type, b_type = ctx.get_input_type(0), ctx.get_input_type(2), ctx.get_input_type(4)
        if q_type is None or b_type is None or not q_type.HasField("tensor_type"):
            return
        out = onnx.TypeProto()
        out.CopyFrom(q_type)
        out.tensor_type.elem_type = b_type.tensor_type.elem_type
        if out.tensor_type.HasField("shape") and out.tensor_type.shape.dim:
            last = out.tensor_type.shape.dim[len(out.tensor_type.shape.dim) - 1]
            last.Clear()
            if w_type is not None and w_type.tensor_type.HasField("shape") and w_type.tensor_type.shape.dim:
                last.CopyFrom(w_type.tensor_type.shape.dim[0])
        ctx.set_output_type(0, out)

    quant = defs.OpSchema(
        "quant_int8_block", DOMAIN, OPSET_VERSION,
        doc="INT8 quantization of x [..., K] in 128 (tokens) x 128 (channels) blocks, scale = absmax / 128.",
        inputs=[defs.OpSchema.FormalParameter("x", "T")],
        outputs=[defs.OpSchema.FormalParameter("x_q", "tensor(int8)"),
                 defs.OpSchema.FormalParameter("x_scale", "tensor(float)")],
        type_constraints=[("T", list(_FLOATS), "")], attributes=_trt_attributes())
    quant.set_type_and_shape_inference_function(infer_quant)
    gemm = defs.OpSchema(
        "gemm_int8_block", DOMAIN, OPSET_VERSION,
        doc="Block-scaled INT8 GEMM of quant_int8_block's output with 128x128-block INT8 weights, plus bias.",
        inputs=[defs.OpSchema.FormalParameter("x_q", "tensor(int8)"),
                defs.OpSchema.FormalParameter("x_scale", "tensor(float)"),
                defs.OpSchema.FormalParameter("w_q", "tensor(int8)"),
                defs.OpSchema.FormalParameter("w_scale", "tensor(float)"),
                defs.OpSchema.FormalParameter("bias", "T")],
        outputs=[defs.OpSchema.FormalParameter("y", "T")],
        type_constraints=[("T", list(_FLOATS), "")], attributes=_trt_attributes())
    gemm.set_type_and_shape_inference_function(infer_gemm)
    return [quant, gemm]


def register_schemas() -> list[str]:
    """Register every schema with ``onnx.defs`` (idempotent); returns the op names."""
    for spec in OP_SPECS.values():
        if not defs.has(spec.name, OPSET_VERSION, DOMAIN):
            defs.register_schema(make_schema(spec))
    for schema in _split_schemas():
        if not defs.has(schema.name, OPSET_VERSION, DOMAIN):
            defs.register_schema(schema)
    return list(OP_SPECS) + list(SPLIT_OPS)
