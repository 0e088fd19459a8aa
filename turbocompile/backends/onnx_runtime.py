"""Run an ``onnx`` artifact in onnxruntime (CPU), the ``turbocompile::*`` nodes as onnxruntime-extensions Python ops.

Why Python ops: onnxruntime has no kernels for our domain, and writing C++ ones would duplicate the kernels.
``onnxruntime_extensions.onnx_op(op_type="turbocompile::<op>")`` registers a Python callable for a node type; its
shared library, added to the session options, dispatches those nodes back into Python, where we call the op's
CPU reference implementation (``torch.ops.turbocompile.<op>`` on CPU tensors). Everything else runs in
onnxruntime's own kernels. This makes the exported graph checkable end to end against PyTorch; it is a reference
runtime, not a fast one (GPU deployment goes through TensorRT).

Limits: Python ops exchange NumPy arrays, which have no bfloat16 / float8 types, so only float32 artifacts with
INT8 (or no) quantized weights run here (``--gpu cpu`` builds: ``int8-block`` linears by default).
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from turbocompile.errors import ArtifactError, BackendUnavailableError, UnsupportedShapeError
from turbocompile.plugins.onnx_schemas import DOMAIN, OP_SPECS, OpSpec

from .engine import LoweredEngine, open_experts

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_REGISTERED: set[str] = set()


def _import_extensions() -> Any:
    try:
        import onnxruntime_extensions
    except ImportError as exc:
        raise BackendUnavailableError(
            f"running an onnx artifact needs onnxruntime-extensions (`import onnxruntime_extensions` failed: {exc}); "
            "pip install 'turbocompile[onnx]'") from exc
    return onnxruntime_extensions


def _python_op(spec: OpSpec):
    """The NumPy -> torch reference -> NumPy body of one Python op."""
    name = spec.name

    def run(*arrays: np.ndarray, **attrs: Any) -> np.ndarray:
        tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        scalars = [int(attrs[n]) if kind == "int" else float(attrs[n]) for n, kind in spec.attrs]
        with torch.no_grad():
            out = getattr(torch.ops.turbocompile, name)(*tensors, *scalars)
        return out.contiguous().numpy()

    run.__name__ = f"turbocompile_{name}"
    return run


def register_python_ops() -> str:
    """Register every ``turbocompile::*`` Python op with onnxruntime-extensions (once per process); returns the
    custom-op library path to add to ``SessionOptions``."""
    ext = _import_extensions()
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    import turbocompile.kernels as kernels

    kernels.load_ops()
    types = {"T": PyCustomOpDef.dt_float, "P": PyCustomOpDef.dt_float, "Q": PyCustomOpDef.dt_int8,
             "S": PyCustomOpDef.dt_float}
    attr_types = {"int": PyCustomOpDef.dt_int64, "float": PyCustomOpDef.dt_float}
    with _LOCK:
        for spec in OP_SPECS.values():
            if spec.name in _REGISTERED:
                continue
            onnx_op(op_type=f"{DOMAIN}::{spec.name}", inputs=[types[t] for _, t in spec.inputs],
                    outputs=[PyCustomOpDef.dt_float],
                    attrs={n: attr_types[k] for n, k in spec.attrs})(_python_op(spec))
            _REGISTERED.add(spec.name)
    return ext.get_library_path()


def _check_runnable(model_path: Path) -> None:
    """Refuse, in one line, a model whose tensor types the Python ops cannot take (bf16/fp16 activations, fp8)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    bad = {onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.FLOAT16: "float16",
           onnx.TensorProto.FLOAT8E4M3FN: "float8_e4m3fn"}
    seen = {bad[t.data_type] for t in model.graph.initializer if t.data_type in bad}
    seen |= {bad[i.type.tensor_type.elem_type] for i in model.graph.input if i.type.tensor_type.elem_type in bad}
    if seen:
        raise BackendUnavailableError(
            f"{model_path} holds {', '.join(sorted(seen))} tensors, which onnxruntime's Python ops cannot exchange; "
            "run it through TensorRT, or build with --gpu cpu (float32, int8 linears) for onnxruntime")


class OnnxExpert:
    """One expert as an onnxruntime session: ``f(x, t, context) -> velocity`` on torch CPU tensors."""

    def __init__(self, model_path: Path, threads: int | None = None):
        import onnxruntime as ort

        if not model_path.is_file():
            raise ArtifactError(f"{model_path} is missing; rebuild the artifact with --backend onnx")
        _check_runnable(model_path)
        opts = ort.SessionOptions()
        opts.register_custom_ops_library(register_python_ops())
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.path = model_path
        self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_shapes = [list(i.shape) for i in self.session.get_inputs()]  # ints, or names for dynamic dims

    def _check_shapes(self, feeds: tuple[torch.Tensor, ...]) -> None:
        for name, want, v in zip(self.input_names, self.input_shapes, feeds):
            got = list(v.shape)
            if len(got) != len(want) or any(isinstance(w, int) and w != g for w, g in zip(want, got)):
                raise UnsupportedShapeError(f"{self.path} was exported for {name} of shape {want}, got {got}; "
                                            "rebuild the artifact for this resolution / frame count")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self._check_shapes((x, t, context))
        feeds = {name: v.detach().to("cpu", torch.float32).contiguous().numpy()
                 for name, v in zip(self.input_names, (x, t, context))}
        (out,) = self.session.run(None, feeds)
        return torch.from_numpy(out).to(x.device)


def open_onnx(root: Path, manifest: dict[str, Any], device: torch.device) -> LoweredEngine:
    """The artifact's ONNX experts in onnxruntime on the CPU."""
    if torch.device(device).type != "cpu":
        raise BackendUnavailableError(
            f"the onnx backend runs in onnxruntime on the CPU, not on {device}; load with device='cpu', or build "
            "with --backend tensorrt (or torch) for the GPU")
    files = manifest.get("backend_files", {})
    experts = open_experts(manifest, lambda name: OnnxExpert(root / files.get(name, f"experts/{name}/model.onnx")))
    return LoweredEngine(manifest, torch.device("cpu"), experts)
