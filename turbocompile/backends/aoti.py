"""``--backend aoti``: each expert as an AOTInductor package ``experts/<name>/aoti.pt2``.

``torch._inductor.aoti_compile_and_package`` compiles the rewritten graph, weights included as package constants,
into a shared library inside a ``.pt2`` zip. Loading it needs no Python model code: Python
``torch._inductor.aoti_load_package(path)`` or C++ ``torch::inductor::AOTIModelPackageLoader`` (see
``examples/cpp_aoti_loader``). The ``torch.ops.turbocompile`` custom ops are not compiled into the library: the
package calls them through the PyTorch dispatcher, so the loading process must have them registered (Python:
``turbocompile.kernels.load_ops()``, which :func:`open_aoti` does). A C++-only deployment therefore needs an
artifact built without the acceleration passes, or C++ registrations of the ops.

A package is compiled for the device it was built on (CPU code, or CUDA code for that GPU) and the torch version
that built it; it refuses to open elsewhere.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from turbocompile.errors import ArtifactError, BackendUnavailableError, GPUError
from turbocompile.targets import check_runnable, local_target

from .bound import DTYPES, export_bound
from .engine import LoweredEngine, open_experts

log = logging.getLogger(__name__)

PACKAGE_FILE = "aoti.pt2"

#: (torch version prefix, device type) -> why AOTI packages cannot be loaded there
KNOWN_BROKEN: dict[tuple[str, str], str] = {
    ("2.11.", "cuda"): "aoti_load_package segfaults on torch 2.11 + CUDA (seen on the project's H100/H200 "
                       "image for a two-layer MLP, in a fresh process, after a successful compile)",
}


def _torch_version() -> str:
    return torch.__version__


def check_aoti(device_type: str) -> None:
    """Raise BackendUnavailableError, in one line, where AOTInductor cannot build or load packages."""
    if not hasattr(torch._inductor, "aoti_compile_and_package") or not hasattr(torch._inductor, "aoti_load_package"):
        raise BackendUnavailableError(f"the aoti backend needs torch >= 2.6 (aoti_compile_and_package); this is "
                                      f"torch {_torch_version()}; build with --backend torch or onnx")
    version = _torch_version()
    for (prefix, dev), why in KNOWN_BROKEN.items():
        if version.startswith(prefix) and device_type == dev:
            raise BackendUnavailableError(f"the aoti backend cannot be used with torch {version} on {dev}: {why}; "
                                          "build with --backend torch, or use another torch version")
    if device_type == "cpu":
        import shutil

        if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            raise BackendUnavailableError("the aoti backend needs a C++ compiler (g++ or clang++) on PATH to compile "
                                          "for the CPU; install one or build with --backend torch or onnx")


def _build_device(manifest: dict[str, Any]) -> torch.device:
    target = manifest["target"]
    if target == "cpu":
        return torch.device("cpu")
    here = local_target()
    if here.name != target:
        raise GPUError(f"an aoti package for {target} must be compiled on a {target} GPU, but this machine is "
                       f"{here.name}; build on that GPU or use --backend torch")
    return torch.device("cuda")


def compile_expert(folder: Path, info: dict[str, Any], dtype: torch.dtype, device: torch.device,
                   dynamic_frames: bool = False) -> Path:
    """Compile one expert into ``folder/aoti.pt2``; returns its path."""
    ep = export_bound(folder, info, dtype, dynamic_frames, device=device)
    out = folder / PACKAGE_FILE
    with torch.no_grad():
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(out))
    log.info("compiled %s", path)
    return Path(path)


def lower_aoti(root: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """Compile every expert of the artifact being built in ``root``; returns ``{expert: relative path}``."""
    device = _build_device(manifest)
    check_aoti(device.type)
    dtype = DTYPES[manifest["dtype"]]
    dynamic = bool(manifest.get("shapes", {}).get("dynamic_frames"))
    return {name: str(compile_expert(root / "experts" / name, manifest["expert_info"][name], dtype, device,
                                     dynamic).relative_to(root))
            for name in manifest["experts"]}


class AotiExpert:
    """One compiled expert: ``f(x, t, context) -> velocity``."""

    def __init__(self, path: Path, device: torch.device):
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; rebuild the artifact with --backend aoti")
        try:
            self.model = torch._inductor.aoti_load_package(str(path))
        except Exception as exc:  # noqa: BLE001 - a package of another torch / device is a user-fixable mismatch
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            first = re.sub(r"\s+", " ", first)[:200]
            raise ArtifactError(f"cannot load the AOTInductor package {path} with torch {_torch_version()} "
                                f"({first}); rebuild the artifact here") from exc
        self.device = device

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        out = self.model(x.to(self.device), t.to(self.device), context.to(self.device))
        return out[0] if isinstance(out, (tuple, list)) else out


def open_aoti(root: Path, manifest: dict[str, Any], device: torch.device | None = None) -> LoweredEngine:
    """The artifact's AOTInductor packages, on the device they were compiled for."""
    import turbocompile.kernels as kernels

    built_for = check_runnable(manifest["target"])  # GPUError naming both archs on another GPU
    if device is not None and torch.device(device).type != built_for.type:
        raise BackendUnavailableError(f"this aoti artifact was compiled for {manifest['target']} and runs only there, "
                                      f"not on {device}; rebuild it with --gpu for that device")
    check_aoti(built_for.type)
    built_with = manifest.get("versions", {}).get("torch")
    if built_with and built_with != _torch_version():
        raise ArtifactError(f"this aoti artifact was compiled with torch {built_with}, this is torch "
                            f"{_torch_version()}; rebuild it here (AOTInductor packages are tied to the torch build)")
    kernels.load_ops()
    files = manifest.get("backend_files", {})
    experts = open_experts(manifest, lambda n: AotiExpert(root / files.get(n, f"experts/{n}/{PACKAGE_FILE}"),
                                                          built_for))
    return LoweredEngine(manifest, built_for, experts)
