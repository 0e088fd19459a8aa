"""Run a ``tensorrt`` artifact: deserialize each expert's engine and call it inside the sampler loop.

UNTESTED HERE: no TensorRT on the project's machines (docs/tensorrt.md). Written against the TensorRT >= 10.9 Python
API (name-based I/O: ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``).

Per expert, once: ``trt.Runtime.deserialize_cuda_engine``, one execution context, and torch CUDA tensors for every
I/O tensor (allocated once per input shape; static-shape artifacts have exactly one), their addresses bound with
``set_tensor_address``. Per call: copy ``x, timestep, context`` into the input buffers, ``execute_async_v3`` on the
caller's current stream, return a copy of the output (the next call overwrites the buffer). The plugin definitions
are registered before deserializing: AOT plugins need nothing at run time, the Python (JIT) ones need their
``@trtp.impl`` in this process.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from turbocompile.errors import ArtifactError, GPUError
from turbocompile.targets import check_runnable

from .engine import LoweredEngine, open_experts
from .tensorrt_build import ENGINE_FILE, ENGINE_META, check_tensorrt, trt_logger

log = logging.getLogger(__name__)


def torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    """torch dtype of a ``trt.DataType``."""
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int8: torch.int8, trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}
    if hasattr(trt, "fp8"):
        table[trt.fp8] = torch.float8_e4m3fn
    return table[dtype]


class TensorRTExpert:
    """One engine with its context and I/O buffers: ``f(x, t, context) -> velocity``."""

    def __init__(self, engine_path: Path, device: torch.device):
        trt = check_tensorrt()
        from turbocompile.plugins import tensorrt_plugins

        tensorrt_plugins.register_plugins()  # the Python-implemented plugins must exist before deserializing
        if not engine_path.is_file():
            raise ArtifactError(f"{engine_path} is missing; rebuild the artifact with --backend tensorrt")
        self.trt, self.device = trt, device
        self._logger = trt_logger(trt)
        self.runtime = trt.Runtime(self._logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT {trt.__version__} could not deserialize {engine_path}; rebuild the artifact "
                                "with this TensorRT version on this GPU")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self.inputs) != 3 or len(self.outputs) != 1:
            raise ArtifactError(f"{engine_path} has inputs {self.inputs} and outputs {self.outputs}; expected x, "
                                "timestep, context -> velocity; rebuild the artifact")
        self._buffers: dict[tuple[tuple[int, ...], ...], dict[str, torch.Tensor]] = {}

    def _bind(self, shapes: tuple[tuple[int, ...], ...]) -> dict[str, torch.Tensor]:
        """Buffers for these input shapes (allocated on first use), bound to the context."""
        bufs = self._buffers.get(shapes)
        if bufs is None:
            bufs = {}
            for name, shape in zip(self.inputs, shapes):
                self.context.set_input_shape(name, shape)
                dtype = torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
                bufs[name] = torch.empty(shape, dtype=dtype, device=self.device)
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                dtype = torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
                bufs[name] = torch.empty(shape, dtype=dtype, device=self.device)
            self._buffers[shapes] = bufs
        for name, shape in zip(self.inputs, shapes):
            self.context.set_input_shape(name, shape)
        for name, buf in bufs.items():
            self.context.set_tensor_address(name, buf.data_ptr())
        return bufs

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feeds = (x, t, context)
        bufs = self._bind(tuple(tuple(v.shape) for v in feeds))
        for name, v in zip(self.inputs, feeds):
            bufs[name].copy_(v, non_blocking=True)
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT errors logged above")
        return bufs[self.outputs[0]].clone()


def _check_engine_meta(path: Path, trt_version: str) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU architecture, naming both."""
    if not path.is_file():
        return
    meta = json.loads(path.read_text())
    if meta.get("tensorrt") and meta["tensorrt"] != trt_version:
        raise ArtifactError(f"this engine was built with TensorRT {meta['tensorrt']}, this is TensorRT {trt_version}; "
                            "rebuild the artifact here")
    if torch.cuda.is_available() and meta.get("arch"):
        major, minor = torch.cuda.get_device_capability(0)
        here = f"sm_{major}{minor}"
        if here != meta["arch"]:
            raise GPUError(f"this engine was built for {meta['arch']} ({meta.get('gpu')}) but this GPU is {here} "
                           f"({torch.cuda.get_device_name(0)}); rebuild with --gpu {here}")


def open_tensorrt(root: Path, manifest: dict[str, Any], device: torch.device | None = None) -> LoweredEngine:
    """The artifact's engines on the GPU they were built for."""
    trt = check_tensorrt()
    dev = check_runnable(manifest["target"])  # GPUError naming both archs on another GPU
    if dev.type != "cuda" or (device is not None and torch.device(device).type != "cuda"):
        raise GPUError("TensorRT engines run on their CUDA GPU only; load with device='cuda'")
    files = manifest.get("backend_files", {})

    def opener(name: str) -> TensorRTExpert:
        path = root / files.get(name, f"experts/{name}/{ENGINE_FILE}")
        _check_engine_meta(path.with_name(ENGINE_META), trt.__version__)
        return TensorRTExpert(path, dev)

    return LoweredEngine(manifest, dev, open_experts(manifest, opener))
