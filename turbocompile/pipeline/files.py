"""Reading component checkpoints (text encoder, VAE) with one-line errors that name the flag to fix."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError


def component_folder(path: Path, sub: str) -> Path | None:
    """``path`` or ``path/sub`` when it holds a ``config.json`` (a diffusers component folder), else None."""
    for folder in (path / sub, path):
        if (folder / "config.json").exists():
            return folder
    return None


def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` or ``torch.save`` file as a state dict (``weights_only=True``; memory-mapped when
    the file format allows, which matters for the 11 GB umT5-XXL)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise CheckpointError(f"cannot read the {what} {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None


def load_into(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: Path, what: str,
              assign: bool = False) -> None:
    """``load_state_dict`` that turns missing/unexpected keys and shape mismatches into a :class:`CheckpointError`."""
    try:
        missing, unexpected = module.load_state_dict(state_dict, strict=False, assign=assign)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        first = next((ln.strip() for ln in lines if "size mismatch" in ln), lines[0] if lines else "")
        raise CheckpointError(f"{path} does not match the {what} ({first})") from None
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the {what}: missing {missing[:3]}, unexpected {unexpected[:3]}")
