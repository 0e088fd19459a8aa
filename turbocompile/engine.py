"""What the sampler drives: an engine holds one denoiser per expert for fixed latent shapes.

A denoiser is ``f(x, t, context) -> v`` with ``x`` the latent ``[B, C_in, F, H, W]`` (noise latent, plus the
20 I2V conditioning channels already concatenated for I2V models), ``t`` the timestep ``[B]`` on the 0..1000
scale, ``context`` the text embeddings ``[B, text_len, text_dim]``; it returns the velocity ``[B, C_out, F, H, W]``.

:class:`EagerEngine` wraps plain ``nn.Module``s (the diffusers model, for baselines and tests); the artifact
loader (:func:`turbocompile.load`) returns a :class:`ProgramEngine` over the compiled programs. Both share the
residency logic: experts live on the device while they fit ``gpu_memory_budget``; otherwise the one not in use
waits on the host and the next one is prefetched on a side stream while the current one still samples.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from .zoo import ModelSpec

log = logging.getLogger(__name__)

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Engine(Protocol):
    spec: ModelSpec
    width: int
    height: int
    frames: int
    device: torch.device
    dtype: torch.dtype

    @property
    def expert_names(self) -> tuple[str, ...]: ...

    def expert(self, name: str) -> Denoiser:
        """The denoiser of ``name``, resident on the device (waits for a prefetch in flight)."""

    def prefetch(self, name: str) -> None:
        """Start moving ``name`` to the device without blocking (no-op when already resident)."""

    def release(self, name: str) -> None:
        """Move ``name`` off the device if the memory budget needs the room (no-op otherwise)."""


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@dataclass
class ResidencyManager:
    """Keeps experts on the device within a byte budget; moves them with a side stream when possible."""

    device: torch.device
    budget_bytes: int | None = None
    _pending: dict[str, threading.Thread] = field(default_factory=dict)

    def fits(self, sizes: list[int]) -> bool:
        return self.budget_bytes is None or sum(sizes) <= self.budget_bytes

    def move(self, module: torch.nn.Module, device: torch.device, non_blocking: bool = False) -> None:
        if device.type == "cuda" and non_blocking:
            stream = torch.cuda.Stream(device)
            with torch.cuda.stream(stream):
                module.to(device, non_blocking=True)
            torch.cuda.current_stream(device).wait_stream(stream)
        else:
            module.to(device)


class EagerEngine:
    """An engine over eager ``nn.Module`` denoisers (diffusers ``WanTransformer3DModel`` or any module with
    the same call signature). Used for the baseline rung of benchmarks, the original sampler, and tests."""

    def __init__(self, spec: ModelSpec, models: dict[str, torch.nn.Module], width: int, height: int,
                 frames: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 gpu_memory_budget: int | None = None):
        self.spec, self.width, self.height, self.frames = spec, width, height, frames
        self.device, self.dtype = torch.device(device), dtype
        self._models = dict(models)
        self._residency = ResidencyManager(self.device, gpu_memory_budget)
        sizes = [module_bytes(m) for m in self._models.values()]
        self._all_resident = self._residency.fits(sizes)
        if self._all_resident:
            for m in self._models.values():
                m.to(self.device)
        else:
            log.info("experts do not all fit the GPU budget: keeping them on the host and swapping")

    @property
    def expert_names(self) -> tuple[str, ...]:
        return tuple(self._models)

    def expert(self, name: str) -> Denoiser:
        model = self._models[name]
        if not self._all_resident:
            self._residency.move(model, self.device)

        def call(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            out = model(x.to(self.dtype), t, context.to(self.dtype), return_dict=False)
            return out[0] if isinstance(out, (tuple, list)) else out

        return call

    def prefetch(self, name: str) -> None:
        if not self._all_resident:
            self._residency.move(self._models[name], self.device, non_blocking=True)

    def release(self, name: str) -> None:
        if not self._all_resident:
            self._models[name].to("cpu")
