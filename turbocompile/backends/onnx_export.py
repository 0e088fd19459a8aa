"""``--backend onnx``: each expert as ``experts/<name>/model.onnx`` with the custom ops as ``turbocompile::*`` nodes.

The exporter is ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``: every
``torch.ops.turbocompile.<op>`` becomes one node of domain ``turbocompile`` (opset 1) whose inputs are the op's
tensors and whose attributes are its scalars, as declared in :mod:`turbocompile.plugins.onnx_schemas`. The weights
are initializers (not graph inputs), so a runtime feeds only ``x``, ``timestep`` and ``context``; past 2 GB they go
to one external data file beside the model (``model.onnx.data``), the protobuf limit.

The same file is the input of the TensorRT backend: ``tensorrt_build.prepare_for_tensorrt`` adds the
``plugin_namespace`` and ``aot`` attributes TensorRT's parser reads, which map each ``turbocompile::<op>`` node to
the plugin ``<op>`` of :mod:`turbocompile.plugins.tensorrt_plugins`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch

from turbocompile.plugins.onnx_schemas import DOMAIN, OP_SPECS, OPSET_VERSION, register_schemas

from .bound import DTYPES, export_bound

log = logging.getLogger(__name__)

#: ONNX standard opset of float32 models (onnxruntime >= 1.20 and every TensorRT 10 parser take it)
ONNX_OPSET = 18
#: bfloat16 / float16 models: opset 22 is the first where Conv and the other ops used here accept bfloat16
ONNX_OPSET_LOW_PRECISION = 22
#: above this many weight bytes the initializers go to an external data file (protobuf's 2 GiB limit, with margin)
EXTERNAL_DATA_BYTES = 1_900_000_000
MODEL_FILE = "model.onnx"


def _translations() -> dict[Any, Callable[..., Any]]:
    """``torch.ops.turbocompile.<op>.default`` -> a function emitting the ``turbocompile::<op>`` node."""
    import onnxscript
    from onnxscript import opset18 as op

    tc = onnxscript.values.Opset(DOMAIN, OPSET_VERSION)

    def sage_attention(q, k, v, blk_q: int = 128, blk_k: int = 64):
        return tc.sage_attention(q, k, v, blk_q=int(blk_q), blk_k=int(blk_k))

    def sage_sla(q, k, v, proj_weight, proj_bias, topk: float = 0.1, blk_q: int = 64, blk_k: int = 128):
        return tc.sage_sla(q, k, v, proj_weight, proj_bias, topk=float(topk), blk_q=int(blk_q), blk_k=int(blk_k))

    def sla(q, k, v, proj_weight, proj_bias, topk: float = 0.1, blk_q: int = 64, blk_k: int = 128):
        return tc.sla(q, k, v, proj_weight, proj_bias, topk=float(topk), blk_q=int(blk_q), blk_k=int(blk_k))

    def _bias(x, w_q, bias):
        # The ONNX op (and the TensorRT plugin) always take a bias; a Linear without one gets zeros [N].
        if bias is not None:
            return bias
        return op.CastLike(op.ConstantOfShape(op.Shape(w_q, start=0, end=1)), x)

    def linear(name: str):
        node = getattr(tc, name)

        def translate(x, w_q, w_scale, bias=None):
            return node(x, w_q, w_scale, _bias(x, w_q, bias))

        translate.__name__ = name
        return translate

    def layernorm_modulate(x, shift, scale, eps: float):
        return tc.layernorm_modulate(x, shift, scale, eps=float(eps))

    def layer_norm_affine(x, weight, bias, eps: float):
        return tc.layer_norm_affine(x, weight, bias, eps=float(eps))

    def rms_norm(x, weight, eps: float):
        return tc.rms_norm(x, weight, eps=float(eps))

    fns: dict[str, Callable[..., Any]] = {
        "sage_attention": sage_attention, "sage_sla": sage_sla, "sla": sla,
        "layernorm_modulate": layernorm_modulate, "layer_norm_affine": layer_norm_affine, "rms_norm": rms_norm,
        **{n: linear(n) for n in ("int8_block_linear", "int8_row_linear", "fp8_row_linear", "fp8_block_linear")},
    }
    assert set(fns) == set(OP_SPECS), "every OpSpec needs a translation"
    ops = torch.ops.turbocompile
    return {getattr(ops, n).default: f for n, f in fns.items() if hasattr(ops, n)}


def custom_nodes(model: "Any") -> dict[str, int]:
    """Count of ``turbocompile::*`` nodes per op type in an ``onnx.ModelProto``."""
    out: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain == DOMAIN:
            out[node.op_type] = out.get(node.op_type, 0) + 1
    return out


def export_expert(folder: Path, info: dict[str, Any], dtype: torch.dtype, dynamic_frames: bool = False,
                  out: Path | None = None) -> list[Path]:
    """Export one expert (``folder`` holds ``program.pt2`` + ``weights.safetensors``) to ONNX; returns the files
    written (the model, plus its external data file for models over 2 GB)."""
    import onnx

    register_schemas()
    out = out or folder / MODEL_FILE
    ep = export_bound(folder, info, dtype, dynamic_frames)
    weight_bytes = sum(t.numel() * t.element_size() for t in ep.state_dict.values()) + sum(
        t.numel() * t.element_size() for t in ep.constants.values() if isinstance(t, torch.Tensor))
    external = weight_bytes > EXTERNAL_DATA_BYTES
    with torch.no_grad():
        opset = ONNX_OPSET if dtype == torch.float32 else ONNX_OPSET_LOW_PRECISION
        prog = torch.onnx.export(ep, (), dynamo=True, opset_version=opset,
                                 custom_translation_table=_translations(), input_names=["x", "timestep", "context"],
                                 output_names=["velocity"], external_data=external, optimize=True, verbose=False)
    data = out.with_name(out.name + ".data")
    if data.exists():
        data.unlink()
    prog.save(str(out), external_data=external)
    files = [out] + ([data] if data.exists() else [])
    model = onnx.load(str(out), load_external_data=False)
    log.info("exported %s: %d nodes, custom %s, %.1f MB of weights%s", out, len(model.graph.node),
             custom_nodes(model) or "none", weight_bytes / 1e6, " (external data)" if external else "")
    return files


def lower_onnx(root: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """Export every expert of the artifact being built in ``root``; returns ``{expert: relative path}`` of the
    models (external data files are listed as ``<expert>.data``)."""
    dtype = DTYPES[manifest["dtype"]]
    dynamic = bool(manifest.get("shapes", {}).get("dynamic_frames"))
    files: dict[str, str] = {}
    for name in manifest["experts"]:
        written = export_expert(root / "experts" / name, manifest["expert_info"][name], dtype, dynamic)
        files[name] = str(written[0].relative_to(root))
        if len(written) > 1:
            files[f"{name}.data"] = str(written[1].relative_to(root))
    return files
