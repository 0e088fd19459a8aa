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

import copy
import logging
from typing import Callable, Protocol

import torch

from .errors import UnsupportedShapeError
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


class ExpertSlot(Protocol):
    """One expert as the residency logic sees it: a denoiser that knows its size and can move. A slot may also
    have ``keep_host_copy()``, which the engine calls when it will swap the slot in and out (not all resident)."""

    on_device: bool

    def nbytes(self) -> int: ...

    def to(self, device: torch.device, non_blocking: bool = False) -> None: ...

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor: ...


def forward_activation_bytes(spec: ModelSpec, width: int, height: int, frames: int) -> int:
    """A bound on one DiT forward's live activations beyond its weights: the FFN hidden state (bf16, plus
    its 8-bit copy) and six [L, dim] bf16 tensors (residual, normed input, q, k, v, attention output). At
    14B@720p this gives 7.2 GiB where the measured peak minus the weights is ~6 (docs/performance.md)."""
    tokens = spec.num_tokens(width, height, frames)
    return tokens * (3 * spec.dit.ffn_dim + 12 * spec.dit.dim)


class ResidentEngine:
    """The residency policy every engine shares: all experts on the device when they fit the byte budget;
    otherwise each waits on the host until used, the next one is prefetched on a side stream when it fits
    beside the resident ones, and a finished one is released."""

    #: latent frame counts a dynamic-frames program accepts (``program._frames_dim``)
    DYNAMIC_LATENT_FRAMES = (2, 64)

    def __init__(self, spec: ModelSpec, width: int, height: int, frames: int, device: torch.device,
                 dtype: torch.dtype, experts: dict[str, ExpertSlot], gpu_memory_budget: int | None = None,
                 dynamic_frames: bool = False):
        self.spec, self.width, self.height, self.frames = spec, width, height, frames
        self.dynamic_frames = dynamic_frames
        self.device, self.dtype = torch.device(device), dtype
        self._experts = experts
        self._budget = gpu_memory_budget
        total = sum(e.nbytes() for e in experts.values())
        # the experts share the budget with one forward's activations (at least): keeping all of them
        # resident must leave that much room, or the first forward would run out of memory
        self.activation_bytes = forward_activation_bytes(spec, width, height, frames)
        self._all_resident = gpu_memory_budget is None or total + self.activation_bytes <= gpu_memory_budget
        if self._all_resident:
            for e in experts.values():
                e.to(self.device)
        else:
            log.info("experts (%.1f GiB) + one forward's activations (%.1f GiB) do not fit the %.1f GiB budget: "
                     "keeping them on the host and swapping", total / 2**30, self.activation_bytes / 2**30,
                     gpu_memory_budget / 2**30)
            for e in experts.values():
                keep = getattr(e, "keep_host_copy", None)  # optional (ExpertSlot): swap without copying back
                if keep is not None:
                    keep()

    @property
    def expert_names(self) -> tuple[str, ...]:
        return tuple(self._experts)

    def expert_programs(self) -> list:
        """The experts themselves (what each forward calls), in build order."""
        return list(self._experts.values())

    @property
    def all_resident(self) -> bool:
        """True when every expert stays on the device for the engine's lifetime (nothing is swapped)."""
        return self._all_resident

    def with_frames(self, frames: int) -> "ResidentEngine":
        """This engine at another pixel frame count (same experts), if it was built with dynamic frames."""
        if frames == self.frames:
            return self
        latent = self.spec.latent_shape(self.width, self.height, frames)[1]
        lo, hi = self.DYNAMIC_LATENT_FRAMES
        if not self.dynamic_frames or not lo <= latent <= hi:
            raise UnsupportedShapeError(
                f"this engine was built for {self.frames} frames, not {frames}; build one with --frames {frames}"
                + ("" if self.dynamic_frames else " (or with --dynamic-frames)"))
        view = copy.copy(self)
        view.frames = frames
        # prefetch decisions use this clip's activations (residency was settled when the engine was made)
        view.activation_bytes = forward_activation_bytes(self.spec, self.width, self.height, frames)
        return view

    def expert(self, name: str) -> Denoiser:
        e = self._experts[name]
        if not e.on_device:
            e.to(self.device)
        return e

    def dense_expert(self, name: str) -> Denoiser:
        """``name`` with every sparse self-attention computed densely, for the steps kept dense
        (``--dense-steps``); an expert that is already dense is returned as is."""
        e = self.expert(name)
        dense = getattr(e, "dense", None)
        return dense() if dense is not None else e

    def _resident_bytes(self) -> int:
        return sum(e.nbytes() for e in self._experts.values() if e.on_device)

    def prefetch(self, name: str) -> None:
        """Start copying ``name`` to the device on a side stream, if it fits beside what is resident."""
        e = self._experts[name]
        if e.on_device or self.device.type != "cuda":
            return
        if self._budget is not None and self._resident_bytes() + e.nbytes() + self.activation_bytes > self._budget:
            log.info("not prefetching %s: %.1f GiB resident + %.1f GiB + %.1f GiB of activations would pass the "
                     "%.1f GiB budget", name, self._resident_bytes() / 2**30, e.nbytes() / 2**30,
                     self.activation_bytes / 2**30, self._budget / 2**30)
            return
        stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            e.to(self.device, non_blocking=True)
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def release(self, name: str) -> None:
        if self._all_resident:
            return
        self._experts[name].to(torch.device("cpu"))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class _ModuleExpert:
    """An ``nn.Module`` denoiser (diffusers ``WanTransformer3DModel`` call signature) as an ExpertSlot."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        self.module, self.dtype = module, dtype

    @property
    def on_device(self) -> bool:
        p = next(iter(self.module.parameters()), None)
        return p is not None and p.device.type != "cpu"

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.module.parameters()) + list(self.module.buffers()))

    def to(self, device: torch.device, non_blocking: bool = False) -> None:
        self.module.to(device, non_blocking=non_blocking)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        out = self.module(x.to(self.dtype), t, context.to(self.dtype), return_dict=False)
        return out[0] if isinstance(out, (tuple, list)) else out


class EagerEngine(ResidentEngine):
    """An engine over eager ``nn.Module`` denoisers (diffusers ``WanTransformer3DModel`` or any module with
    the same call signature). Used for the baseline rung of benchmarks, the original sampler, and tests."""

    def __init__(self, spec: ModelSpec, models: dict[str, torch.nn.Module], width: int, height: int,
                 frames: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 gpu_memory_budget: int | None = None):
        experts = {name: _ModuleExpert(m, dtype) for name, m in models.items()}
        super().__init__(spec, width, height, frames, torch.device(device), dtype, experts, gpu_memory_budget)
