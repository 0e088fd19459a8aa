"""Lowering backends: turn the built experts (``program.pt2`` + ``weights.safetensors``) into deployable files.

========== ===================================== ========================================= ===========================
backend    files per expert                      runs in                                   needs
========== ===================================== ========================================= ===========================
onnx       ``model.onnx`` (+ ``.data`` > 2 GB)   onnxruntime (CPU, Python ops for ours)    onnx, onnxscript
aoti       ``aoti.pt2`` (AOTInductor package)    ``aoti_load_package`` / C++ loader        a C++ compiler; not torch
                                                                                           2.11 + CUDA (load crashes)
tensorrt   ``model.onnx`` + ``model.engine``     TensorRT (``execute_async_v3``)           TensorRT >= 10.9, its GPU
========== ===================================== ========================================= ===========================

``turbocompile.build`` calls :func:`check_backend` before building (so a missing runtime fails in a second, not
after the passes) and :func:`lower` after the experts are written; ``turbocompile.load`` calls
:func:`open_engine` for artifacts whose ``manifest["backend"]`` is one of these.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from turbocompile.errors import BackendUnavailableError

log = logging.getLogger(__name__)

LOWERED = ("onnx", "aoti", "tensorrt")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_onnx_export() -> None:
    for mod in ("onnx", "onnxscript"):
        try:
            __import__(mod)
        except ImportError as exc:
            raise BackendUnavailableError(f"the onnx backend needs {mod} (`import {mod}` failed: {_first_line(exc)}); "
                                          "pip install 'turbocompile[onnx]' or build with --backend torch") from exc


def check_backend(name: str, target: str | None = None) -> None:
    """Raise :class:`BackendUnavailableError` (one line: what is missing, what to do) if ``name`` cannot build here.

    ``target``: the ``--gpu`` of the build (default: this machine's device), for checks that depend on it.
    """
    if name not in LOWERED:
        raise BackendUnavailableError(f"unknown backend '{name}'; choose torch, eager, {', '.join(LOWERED)}")
    if name == "onnx":
        _check_onnx_export()
    elif name == "aoti":
        from .aoti import check_aoti

        device = "cpu" if target == "cpu" else ("cuda" if target or torch.cuda.is_available() else "cpu")
        check_aoti(device)
    elif name == "tensorrt":
        from .tensorrt_build import check_tensorrt

        check_tensorrt()
        _check_onnx_export()


def lower(name: str, root: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """Lower every expert of the artifact being built in ``root``; returns ``{key: path relative to root}`` of the
    files written (``{"main": "experts/main/model.onnx"}``, ...), which the manifest records and hashes."""
    root = Path(root)
    if name == "onnx":
        from .onnx_export import lower_onnx

        return lower_onnx(root, manifest)
    if name == "aoti":
        from .aoti import lower_aoti

        return lower_aoti(root, manifest)
    if name == "tensorrt":
        from .tensorrt_build import lower_tensorrt

        return lower_tensorrt(root, manifest)
    raise BackendUnavailableError(f"unknown backend '{name}'; choose one of {', '.join(LOWERED)}")


def open_engine(root: Path, manifest: dict[str, Any], device: torch.device | str | None = None) -> Any:
    """The artifact's lowered experts as an :class:`~turbocompile.engine.Engine` (``spec``, ``width``, ``height``,
    ``frames``, ``device``, ``dtype``, ``expert_names``, ``expert(name)``, ``prefetch``, ``release``).

    ``device``: onnx runs on the CPU; aoti and tensorrt on the device they were built for (None: that device;
    another GPU architecture is refused, naming both).
    """
    root = Path(root)
    backend = manifest.get("backend")
    if backend == "onnx":
        from .onnx_runtime import open_onnx

        return open_onnx(root, manifest, torch.device(device or "cpu"))
    if backend == "aoti":
        from .aoti import open_aoti

        return open_aoti(root, manifest, None if device is None else torch.device(device))
    if backend == "tensorrt":
        from .tensorrt_runtime import open_tensorrt

        return open_tensorrt(root, manifest, None if device is None else torch.device(device))
    raise BackendUnavailableError(f"artifact backend '{backend}' is not a lowered backend ({', '.join(LOWERED)}); "
                                  "open it with turbocompile.load")
