"""``turbocompile.load(DIR)``: the artifact's programs as an :class:`~turbocompile.engine.Engine`.

Loading checks the manifest (schema, sha256 of program and weight files, target GPU) before anything
else, then binds each expert's weights (safetensors, straight to the device) to its exported program.
No model code is imported: only the graph, the weights and the ``torch.ops.turbocompile`` kernels.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from . import artifact
from .engine import Denoiser, Engine, ResidencyManager
from .errors import ArtifactError
from .targets import check_runnable
from .zoo import get_model

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ExpertProgram:
    """One expert: an exported program plus its weights, callable as ``f(x, t, context)``."""

    def __init__(self, folder: Path, info: dict[str, Any], device: torch.device, compile_mode: str | None):
        from safetensors import safe_open

        self.folder, self.info, self.device = folder, info, device
        try:
            ep = torch.export.load(str(folder / "program.pt2"))
        except Exception as exc:  # noqa: BLE001 - report what a user can act on
            raise ArtifactError(f"cannot load {folder / 'program.pt2'} ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}); rebuild the artifact") from exc
        self.module = ep.module()
        with safe_open(str(folder / "weights.safetensors"), framework="pt", device="cpu") as f:
            self.weights = [f.get_tensor(n) for n in info["weight_order"]]
        self.on_device = False
        self._compiled = None
        self.compile_mode = compile_mode

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights)

    def to(self, device: torch.device, non_blocking: bool = False) -> None:
        self.weights = [t.to(device, non_blocking=non_blocking) for t in self.weights]
        self.on_device = device == self.device

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        fn = self.module
        if self.compile_mode is not None:
            if self._compiled is None:
                self._compiled = torch.compile(self.module, fullgraph=True,
                                               mode=None if self.compile_mode == "default" else self.compile_mode)
            fn = self._compiled
        out = fn(*self.weights, x, t, context)
        return out[0] if isinstance(out, (tuple, list)) else out


class ProgramEngine:
    """The built artifact as an engine (see :class:`turbocompile.engine.Engine`)."""

    def __init__(self, root: Path, manifest: dict[str, Any], device: torch.device,
                 gpu_memory_budget: int | None = None, compile_mode: str | None = None):
        self.root, self.manifest, self.device = root, manifest, device
        self.spec = get_model(manifest["model"])
        shapes = manifest["shapes"]
        self.width, self.height, self.frames = shapes["width"], shapes["height"], shapes["frames"]
        self.dtype = _DTYPES[manifest["dtype"]]
        self._experts = {name: ExpertProgram(root / "experts" / name, manifest["expert_info"][name], device,
                                             compile_mode)
                         for name in manifest["experts"]}
        self._residency = ResidencyManager(device, gpu_memory_budget)
        self._all_resident = self._residency.fits([e.nbytes() for e in self._experts.values()])
        if self._all_resident:
            for e in self._experts.values():
                e.to(device)

    @property
    def expert_names(self) -> tuple[str, ...]:
        return tuple(self._experts)

    def expert(self, name: str) -> Denoiser:
        e = self._experts[name]
        if not e.on_device:
            e.to(self.device)
        return e

    def _resident_bytes(self) -> int:
        return sum(e.nbytes() for e in self._experts.values() if e.on_device)

    def prefetch(self, name: str) -> None:
        """Start the copy of ``name`` on a side stream, if it fits the budget beside what is resident."""
        e = self._experts[name]
        budget = self._residency.budget_bytes
        if budget is not None and self._resident_bytes() + e.nbytes() > budget:
            log.info("not prefetching %s: %.1f GiB resident + %.1f GiB would pass the %.1f GiB budget", name,
                     self._resident_bytes() / 2**30, e.nbytes() / 2**30, budget / 2**30)
            return
        if not e.on_device and self.device.type == "cuda":
            e.weights = [t.pin_memory() for t in e.weights]
            stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(stream):
                e.to(self.device, non_blocking=True)
            torch.cuda.current_stream(self.device).wait_stream(stream)

    def release(self, name: str) -> None:
        if not self._all_resident:
            self._experts[name].to(torch.device("cpu"))
            self._experts[name].on_device = False
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def load(path: str | Path, *, device: str | torch.device | None = None, verify_hashes: bool = True,
         gpu_memory_budget: int | None = None, compile: bool | None = None) -> "Engine":
    """Open an artifact directory for sampling. Refuses a tampered file, another schema, or another GPU arch.

    ``compile``: run the programs through ``torch.compile`` (the ``torch`` backend; default on CUDA for
    artifacts built with it); ``eager`` artifacts and CPU runs execute the exported graph directly.
    """
    root = Path(path)
    manifest = artifact.read_manifest(root, verify_hashes=verify_hashes)
    import turbocompile.kernels as kernels

    kernels.load_ops()
    dev = torch.device(device) if device is not None else check_runnable(manifest["target"])
    if device is not None and dev.type == "cuda":
        check_runnable(manifest["target"])
    backend = manifest.get("backend", "torch")
    if backend in ("onnx", "aoti", "tensorrt"):
        from .backends import open_engine

        return open_engine(root, manifest, dev)
    if compile is None:
        compile = backend == "torch" and dev.type == "cuda"
    return ProgramEngine(root, manifest, dev, gpu_memory_budget, "default" if compile else None)
