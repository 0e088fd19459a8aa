"""Checkpoint loading and conversion for Wan DiTs: official Wan, diffusers and TurboDiffusion layouts.

See ``docs/checkpoints.md``. The lead entry points:

- :func:`load_checkpoint` — any layout into ``WanTransformer3DModel`` experts (streamed, meta-built);
- :func:`detect_layout` — ``official`` | ``diffusers`` | ``turbodiffusion`` | ``turbodiffusion-quant``;
- :func:`convert_checkpoint` — to ``diffusers`` or ``official`` folders, streamed, written atomically.
"""
from .convert import convert_checkpoint
from .layouts import detect_layout
from .loader import LoadedCheckpoint, load_checkpoint

__all__ = ["LoadedCheckpoint", "convert_checkpoint", "detect_layout", "load_checkpoint"]
