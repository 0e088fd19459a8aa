"""``--backend tensorrt``: ONNX export, then one serialized TensorRT engine per expert (``experts/<name>/model.engine``).

UNTESTED HERE: TensorRT cannot be installed on the project's machines (see docs/tensorrt.md). This module is
written against the public TensorRT >= 10.9 Python API; where ``import tensorrt`` fails, :func:`check_tensorrt`
refuses the backend with one line and the tests skip.

Build steps per expert:

1. ``onnx_export.export_expert`` writes ``model.onnx`` (custom ops as ``turbocompile::*`` nodes, weights as
   initializers).
2. :func:`prepare_for_tensorrt` splits each ``int8_block_linear`` into ``quant_int8_block`` + ``gemm_int8_block``
   (one kernel each, so both can be AOT plugins) and adds the attributes TensorRT's parser reads on every
   ``turbocompile`` node:
   ``plugin_namespace="turbocompile"`` (TensorRT 10.9 needs it; >= 10.10 also takes the namespace from the domain)
   and ``aot`` = 1 for plugins with an ahead-of-time PTX implementation, 0 for those that run their Python
   implementation (see ``turbocompile.plugins.tensorrt_plugins.AOT_OPS``).
3. The plugins are registered (``tensorrt_plugins.register_plugins()``), the model is parsed into a strongly typed
   network (the ONNX types are the engine's types: bf16 activations, int8/fp8 weights, fp32 scales), and
   ``build_serialized_network`` writes the plan. Static shapes get no optimization profile; artifacts built with
   ``--dynamic-frames`` get one for the latent frame count.
4. ``model.engine.json`` records the TensorRT version, the GPU and its compute capability and which plugins are AOT;
   the runtime refuses an engine from another TensorRT version or GPU architecture, naming both.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from turbocompile.errors import BackendUnavailableError, GPUError
from turbocompile.targets import check_runnable, local_target

log = logging.getLogger(__name__)

MIN_VERSION = (10, 9)
ENGINE_FILE = "model.engine"
ENGINE_META = "model.engine.json"
#: latent-frame range of the optimization profile for --dynamic-frames artifacts (the capture's Dim range)
DYNAMIC_FRAMES = (1, 64)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split(".")[:3]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_tensorrt() -> Any:
    """Import TensorRT (>= 10.9 with ``tensorrt.plugin``) or raise BackendUnavailableError in one line."""
    need = ".".join(map(str, MIN_VERSION))
    try:
        import tensorrt as trt
    except Exception as exc:  # noqa: BLE001 - ImportError, or a library that fails to load
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendUnavailableError(f"the tensorrt backend needs TensorRT >= {need} (`import tensorrt` failed: {msg}); "
                                      "build with --backend torch or onnx") from exc
    version = getattr(trt, "__version__", "0")
    if _version_tuple(version) < MIN_VERSION:
        raise BackendUnavailableError(f"the tensorrt backend needs TensorRT >= {need} (ahead-of-time Python plugins); "
                                      f"found {version}; upgrade TensorRT or build with --backend torch or onnx")
    try:
        import tensorrt.plugin  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        raise BackendUnavailableError(f"TensorRT {version} has no usable tensorrt.plugin module ({exc}); "
                                      "install the full TensorRT Python package") from exc
    return trt


def trt_logger(trt: Any) -> Any:
    """A ``trt.ILogger`` that forwards to :mod:`logging` (warnings and errors reach the user, info stays debug)."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            sev = trt.ILogger.Severity
            if severity in (sev.INTERNAL_ERROR, sev.ERROR):
                log.error("TensorRT: %s", msg)
            elif severity == sev.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Logger()


def split_int8_block_linears(model: Any) -> int:
    """Rewrite each ``int8_block_linear`` node into ``quant_int8_block`` + ``gemm_int8_block`` (in place), the two
    single-kernel ops TensorRT can run as AOT plugins; returns how many were split. A node whose bias type differs
    from its activation type stays whole (the GEMM writes its output in the bias' type)."""
    import onnx

    from turbocompile.plugins.onnx_schemas import DOMAIN, register_schemas

    register_schemas()
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    nodes, count = [], 0
    for i, node in enumerate(model.graph.node):
        x_type = types.get(node.input[0]) if node.input else None
        if node.domain != DOMAIN or node.op_type != "int8_block_linear" or not x_type or \
                x_type != types.get(node.input[3]):
            nodes.append(node)
            continue
        base = node.name or f"int8_block_linear_{i}"
        x_q, x_scale = f"{base}/x_q", f"{base}/x_scale"
        nodes.append(onnx.helper.make_node("quant_int8_block", [node.input[0]], [x_q, x_scale], name=f"{base}/quant",
                                           domain=DOMAIN))
        nodes.append(onnx.helper.make_node("gemm_int8_block", [x_q, x_scale, *node.input[1:4]], list(node.output),
                                           name=f"{base}/gemm", domain=DOMAIN))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


def prepare_for_tensorrt(model: Any, aot_ops: frozenset[str], split_linears: bool = True) -> Any:
    """Split the int8-block linears (``split_linears``), then set ``plugin_namespace`` and ``aot`` on every
    ``turbocompile`` node of an ``onnx.ModelProto`` (in place)."""
    import onnx

    from turbocompile.plugins.onnx_schemas import DOMAIN

    if split_linears:
        n = split_int8_block_linears(model)
        if n:
            log.info("split %d int8_block_linear nodes into quant + GEMM AOT plugins", n)
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        keep = [a for a in node.attribute if a.name not in ("plugin_namespace", "aot")]
        del node.attribute[:]
        node.attribute.extend(keep)
        node.attribute.append(onnx.helper.make_attribute("plugin_namespace", DOMAIN))
        node.attribute.append(onnx.helper.make_attribute("aot", 1 if node.op_type in aot_ops else 0))
    return model


def _profile(trt: Any, builder: Any, network: Any, x_shape: list[int]) -> Any:
    """An optimization profile over the latent frame count (input ``x`` dim 2)."""
    profile = builder.create_optimization_profile()
    lo, hi = DYNAMIC_FRAMES
    shape = list(x_shape)
    mins, opts, maxs = list(shape), list(shape), list(shape)
    mins[2], maxs[2] = lo, hi
    profile.set_shape("x", tuple(mins), tuple(opts), tuple(maxs))
    return profile


def build_engine(onnx_path: Path, engine_path: Path, x_shape: list[int], dynamic_frames: bool = False,
                 optimization_level: int = 3) -> dict[str, Any]:
    """Parse ``onnx_path`` into a strongly typed network with our plugins and write the serialized engine; returns
    the metadata written beside it."""
    import onnx

    from turbocompile.plugins import tensorrt_plugins

    trt = check_tensorrt()
    tensorrt_plugins.register_plugins()
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    model = prepare_for_tensorrt(onnx.load(str(onnx_path), load_external_data=False), tensorrt_plugins.AOT_OPS)
    # parse() with the file's path resolves external data (model.onnx.data) next to it
    if not parser.parse(model.SerializeToString(), str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BackendUnavailableError(f"TensorRT could not parse {onnx_path}: {errors[0] if errors else 'unknown'}"
                                      + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""))
    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    if dynamic_frames:
        config.add_optimization_profile(_profile(trt, builder, network, x_shape))
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendUnavailableError(f"TensorRT failed to build an engine from {onnx_path}; see the TensorRT errors "
                                      "logged above")
    engine_path.write_bytes(memoryview(plan))
    major, minor = torch.cuda.get_device_capability(0)
    meta = {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(0), "arch": f"sm_{major}{minor}",
            "aot_plugins": sorted(tensorrt_plugins.AOT_OPS), "python_plugins": sorted(tensorrt_plugins.JIT_OPS),
            "dynamic_frames": dynamic_frames, "optimization_level": optimization_level}
    engine_path.with_name(ENGINE_META).write_text(json.dumps(meta, indent=2))
    log.info("built %s (%.1f MB)", engine_path, engine_path.stat().st_size / 1e6)
    return meta


def lower_tensorrt(root: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """ONNX-export and build every expert of the artifact being built in ``root``; returns the files written."""
    from .onnx_export import lower_onnx

    check_tensorrt()
    target = manifest["target"]
    if target == "cpu":
        raise GPUError("the tensorrt backend builds for a GPU: pass --gpu (e.g. sm_90) and build on that GPU")
    here = local_target()
    if here.name != target:
        raise GPUError(f"a TensorRT engine for {target} must be built on a {target} GPU, but this machine is "
                       f"{here.name}; build on that GPU (the ONNX export alone, --backend onnx, works anywhere)")
    check_runnable(target)
    files = lower_onnx(root, manifest)
    dynamic = bool(manifest.get("shapes", {}).get("dynamic_frames"))
    for name in manifest["experts"]:
        folder = root / "experts" / name
        x_shape = manifest["expert_info"][name]["input_shapes"][0]
        build_engine(root / files[name], folder / ENGINE_FILE, x_shape, dynamic)
        files[f"{name}.onnx"] = files.pop(name)
        files[name] = str((folder / ENGINE_FILE).relative_to(root))
        files[f"{name}.engine_meta"] = str((folder / ENGINE_META).relative_to(root))
    return files
