"""User-facing errors.

Every error a user can cause (bad path, wrong checkpoint, unsupported shape, missing GPU, artifact built
for another GPU) is raised as a subclass of :class:`TurboCompileError`. The CLI turns these into one red
line and a non-zero exit code; library users catch them by class.
"""
from __future__ import annotations


class TurboCompileError(Exception):
    """Base class: the message says what was wrong and what to do."""

    exit_code = 2


class UnknownModelError(TurboCompileError):
    """A model id that is not in the zoo."""


class CheckpointError(TurboCompileError):
    """A checkpoint that is missing, truncated, of another model, or has wrong keys."""


class UnsupportedShapeError(TurboCompileError):
    """A resolution, frame count, head dim or sequence length the build cannot handle."""


class GPUError(TurboCompileError):
    """No GPU where one is needed, or a GPU of another architecture than the artifact's."""


class ArtifactError(TurboCompileError):
    """An artifact directory that is missing, tampered with, or of another schema."""


class PassError(TurboCompileError):
    """A graph pass failed, broke the graph, or drifted numerically past the threshold."""


class BackendUnavailableError(TurboCompileError):
    """A lowering backend whose runtime (TensorRT, onnxruntime, ...) is not installed or not usable."""


class InputError(TurboCompileError):
    """Bad sampling input: prompt too long, wrong image, frames not 4k+1, steps out of range."""
