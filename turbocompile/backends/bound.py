"""An expert of an artifact with its weights bound as module buffers, ready to export again.

The artifact's ``program.pt2`` takes the weights as leading inputs (so the torch runtime can stream them from
safetensors). Lowering backends want them as constants instead: ONNX initializers (a runtime then feeds only
``x, timestep, context``) and AOTInductor package constants. :func:`export_bound` re-exports the program with the
weights registered as buffers, keeping every ``torch.ops.turbocompile`` node as one opaque node.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from turbocompile.artifact import DTYPES  # noqa: F401  (the manifest's dtype names; re-exported for the backends)
from turbocompile.errors import ArtifactError

log = logging.getLogger(__name__)


class BoundProgram(torch.nn.Module):
    """``(x, timestep, context) -> velocity`` over an exported program whose leading inputs are the weights."""

    def __init__(self, program: torch.nn.Module, names: list[str], weights: dict[str, torch.Tensor],
                 dynamic_frames: bool = False):
        super().__init__()
        self.program = program
        self.dynamic_frames = dynamic_frames  # the program's latent frame count is symbolic
        self._names = list(names)
        for n in self._names:
            self.register_buffer(n, weights[n])

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        out = self.program(*[getattr(self, n) for n in self._names], x, timestep, context)
        return out[0] if isinstance(out, (tuple, list)) else out


def load_bound(folder: Path, info: dict[str, Any]) -> BoundProgram:
    """The expert in ``folder`` (``program.pt2`` + ``weights.safetensors``) as a :class:`BoundProgram` on the CPU."""
    from safetensors.torch import load_file

    try:
        ep = torch.export.load(str(folder / "program.pt2"))
    except Exception as exc:  # noqa: BLE001 - report what a user can act on
        raise ArtifactError(f"cannot load {folder / 'program.pt2'} ({type(exc).__name__}); rebuild the artifact") from exc
    weights = load_file(str(folder / "weights.safetensors"))
    missing = [n for n in info["weight_order"] if n not in weights]
    if missing:
        raise ArtifactError(f"{folder / 'weights.safetensors'} lacks {len(missing)} weights (e.g. {missing[0]}); "
                            "rebuild the artifact")
    x_val = [n for n in ep.graph.nodes if n.op == "placeholder"][-3].meta.get("val")
    dynamic = x_val is not None and x_val.ndim == 5 and not isinstance(x_val.shape[2], int)
    return BoundProgram(ep.module(), info["weight_order"], weights, dynamic)


def random_inputs(info: dict[str, Any], dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random ``(x, timestep, context)`` of the shapes the expert was built for (timestep is always fp32)."""
    gen = torch.Generator().manual_seed(seed)
    x_shape, t_shape, c_shape = info["input_shapes"]
    return (torch.randn(x_shape, generator=gen).to(dtype), torch.full(t_shape, 933.0),
            torch.randn(c_shape, generator=gen).to(dtype))


def export_bound(folder: Path, info: dict[str, Any], dtype: torch.dtype, dynamic_frames: bool = False,
                 device: torch.device | str = "cpu") -> torch.export.ExportedProgram:
    """Re-export the expert with its weights as buffers; shapes are the build's, with the latent frame count
    symbolic when the artifact was built with ``dynamic_frames`` and its program kept that dimension symbolic."""
    import turbocompile.kernels as kernels

    kernels.load_ops()
    module = load_bound(folder, info).to(device)
    inputs = tuple(t.to(device) for t in random_inputs(info, dtype))
    dynamic_shapes = None
    if dynamic_frames and not module.dynamic_frames:
        log.warning("%s: built with dynamic frames, but its program has a static frame count; lowering it with "
                    "static shapes", folder)
    elif dynamic_frames:
        dynamic_shapes = {"x": {2: torch.export.Dim("latent_frames", min=1, max=64)}, "timestep": None,
                          "context": None}
    with torch.no_grad():
        return torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes,
                                   strict=False)
