"""The :class:`~turbocompile.engine.Engine` over lowered experts (onnxruntime sessions, AOTInductor packages,
TensorRT engines): each backend supplies one denoiser ``f(x, t, context)`` per expert.

Lowered experts carry their weights inside the runtime object (initializers, package constants, engine weights),
so there is nothing to move between host and device per step: ``prefetch`` and ``release`` are no-ops.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from turbocompile.engine import Denoiser
from turbocompile.zoo import get_model

from .bound import DTYPES


class LoweredEngine:
    """Experts of one artifact, each already opened by its backend."""

    def __init__(self, manifest: dict[str, Any], device: torch.device, experts: dict[str, Denoiser]):
        self.manifest = manifest
        self.spec = get_model(manifest["model"])
        shapes = manifest["shapes"]
        self.width, self.height, self.frames = shapes["width"], shapes["height"], shapes["frames"]
        self.device = device
        self.dtype = DTYPES[manifest["dtype"]]
        self.backend = manifest["backend"]
        self._experts = dict(experts)

    @property
    def expert_names(self) -> tuple[str, ...]:
        return tuple(self._experts)

    def expert(self, name: str) -> Denoiser:
        return self._experts[name]

    def prefetch(self, name: str) -> None:
        """Nothing to do: the backend's runtime owns the weights."""

    def release(self, name: str) -> None:
        """Nothing to do: the backend's runtime owns the weights."""


def open_experts(manifest: dict[str, Any], opener: Callable[[str], Denoiser]) -> dict[str, Denoiser]:
    """``{expert: opener(expert)}`` in manifest order."""
    return {name: opener(name) for name in manifest["experts"]}
