"""Lazy tensor readers: safetensors (``safe_open``) and ``.pth`` (``torch.load(mmap=True, weights_only=True)``).

A reader answers names, shapes and dtypes from the file header without reading tensor data, and hands out
one tensor at a time, so a loader can stream a 14B checkpoint to its device holding little more than one
copy of the weights in host RAM. :class:`ExpertSource` puts the files of one expert (shards, a side file of
TurboDiffusion extras) behind a single view with canonical (diffusers-style) names.
"""
from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch

from ..errors import CheckpointError
from . import keymap

log = logging.getLogger(__name__)

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
#: Wrapper keys that training code puts around a state dict (``{"state_dict": {...}}``).
_WRAPPERS = ("state_dict", "model", "module", "net", "ema")
_CORRUPT_HINT = "truncated or corrupt: re-download it"


class SafetensorsFile:
    """One ``.safetensors`` file, read tensor by tensor through ``safe_open``.

    ``safe_open`` maps the whole file; pages it has touched count in the process RSS until the handle is
    dropped, so the handle is reopened after every ``reopen_bytes`` (256 MiB) read. That keeps the host peak near
    one copy of the weights instead of file + copy.
    """

    reopen_bytes = 256 << 20

    def __init__(self, path: Path):
        self.path = Path(path)
        self._handle = None
        self._read = 0
        handle = self._open()
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for k in handle.keys():
            sl = handle.get_slice(k)
            dt = _ST_DTYPES.get(sl.get_dtype())
            if dt is None:
                raise CheckpointError(f"{self.path}: tensor {k} has dtype {sl.get_dtype()}, which is not supported")
            self._meta[k] = (tuple(sl.get_shape()), dt)

    def _open(self):
        from safetensors import SafetensorError, safe_open

        try:
            ctx = safe_open(str(self.path), framework="pt", device="cpu")
            self._handle = ctx.__enter__()
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{self.path} is {_CORRUPT_HINT} ({_first_line(e)})") from None
        self._ctx = ctx
        self._read = 0
        return self._handle

    def keys(self) -> list[str]:
        return list(self._meta)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][1]

    def get(self, key: str) -> torch.Tensor:
        if self._handle is None:
            self._open()
        try:
            t = self._handle.get_tensor(key)
        except Exception as e:  # safetensors raises its own error type for short reads
            raise CheckpointError(f"{self.path} is {_CORRUPT_HINT} (reading {key}: {_first_line(e)})") from None
        self._read += t.numel() * t.element_size()
        if self._read >= self.reopen_bytes:
            self.close()
        return t

    def close(self) -> None:
        if self._handle is not None:
            self._ctx.__exit__(None, None, None)
            self._handle = None


class PthFile:
    """A ``.pth`` state dict, memory-mapped (tensors are read when touched)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        obj = _torch_load(self.path)
        self._sd = _unwrap_state_dict(obj, self.path)

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._sd[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return self._sd[key]

    def close(self) -> None:
        self._sd = {}


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__


def _torch_load(path: Path):
    def load(mmap: bool):
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)

    try:
        try:
            return load(True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            log.warning("%s uses torch's legacy format (no mmap): it is read into RAM whole", path)
            return load(False)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"{path}: refused: the file contains pickled code; only plain state dicts are loaded"
            ) from None
        raise CheckpointError(f"{path} is {_CORRUPT_HINT} ({_first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is {_CORRUPT_HINT} ({_first_line(e)})") from None


def _unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if not isinstance(obj, dict):
            break
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[w] for w in _WRAPPERS if isinstance(obj.get(w), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict (expected a dict of tensors, "
                              f"or one under 'state_dict' / 'model')")
    skipped = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if skipped:
        log.debug("%s: ignoring %d non-tensor entries (%s)", path, len(skipped), ", ".join(skipped[:3]))
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def open_file(path: Path) -> SafetensorsFile | PthFile:
    """A reader for one weight file, chosen by suffix."""
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    return PthFile(path)


_BLOCK_IDX = re.compile(r"^blocks\.(\d+)\.")


class ExpertSource:
    """All tensors of one expert under canonical names, read lazily from one or more files.

    ``naming`` is ``"official"`` or ``"diffusers"`` (as the main files store them); ``linear_patch``
    tells that the patch embedding is stored as a Linear (TurboDiffusion) and is reshaped on read.
    ``extras_file`` is a ``turbodiffusion_extras.safetensors`` side file with canonical names.
    """

    def __init__(self, files: list[Path], extras_file: Path | None = None):
        self.files = list(files)
        self.extras_file = extras_file
        self._readers: list[SafetensorsFile | PthFile] = []
        self._where: dict[str, tuple[SafetensorsFile | PthFile, str]] = {}
        self.unknown: list[str] = []
        try:
            raw: list[tuple[SafetensorsFile | PthFile, str]] = []
            for f in self.files:
                r = open_file(f)
                self._readers.append(r)
                raw += [(r, k) for k in r.keys()]
            prefix = keymap.strip_prefix([k for _, k in raw])
            names = [k[len(prefix):] for _, k in raw]
            self.naming = "diffusers" if keymap.looks_diffusers(names) and not keymap.looks_official(names) \
                else "official"
            for (r, k), name in zip(raw, names):
                canon = name
                if self.naming == "official":
                    canon = keymap.official_to_diffusers(name)
                    if canon is None:
                        canon = name
                        self.unknown.append(name)
                self._add(canon, r, k)
            self.has_main_extras = any(keymap.is_extra(k) for k in self._where)
            if extras_file is not None:
                r = open_file(extras_file)
                self._readers.append(r)
                for k in r.keys():
                    self._add(k, r, k)
        except BaseException:
            self.close()
            raise
        pe = self._where.get("patch_embedding.weight")
        self.linear_patch = pe is not None and len(pe[0].shape(pe[1])) == 2

    def _add(self, canon: str, reader, raw_key: str) -> None:
        if canon in self._where:
            other = self._where[canon][0].path
            raise CheckpointError(f"tensor {canon} appears twice ({other.name} and {reader.path.name}): "
                                  "mixed-up shards? keep one copy of each checkpoint")
        self._where[canon] = (reader, raw_key)

    @property
    def flavor(self) -> str:
        """``official`` | ``diffusers`` | ``turbodiffusion`` | ``turbodiffusion-quant`` (main files only)."""
        if self.naming == "diffusers":
            return "diffusers"
        if self.linear_patch or self.has_main_extras:
            quant = any(keymap.is_int8(k) for k, (r, _) in self._where.items()
                        if r.path != self.extras_file)
            return "turbodiffusion-quant" if quant else "turbodiffusion"
        return "official"

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def dtype(self, key: str) -> torch.dtype:
        r, k = self._where[key]
        return r.dtype(k)

    def shape(self, key: str) -> tuple[int, ...]:
        r, k = self._where[key]
        s = r.shape(k)
        if key == "patch_embedding.weight" and len(s) == 2:
            return (s[0], s[1] // 4, 1, 2, 2)
        return s

    def nbytes(self, key: str) -> int:
        n = 1
        for d in self.shape(key):
            n *= d
        return n * self.dtype(key).itemsize

    def get(self, key: str) -> torch.Tensor:
        r, k = self._where[key]
        t = r.get(k)
        if key == "patch_embedding.weight" and t.ndim == 2:
            t = t.reshape(self.shape(key))
        return t

    def num_layers(self) -> int:
        idx = [int(m.group(1)) for k in self._where if (m := _BLOCK_IDX.match(k))]
        return max(idx) + 1 if idx else 0

    def close(self) -> None:
        for r in self._readers:
            r.close()
        self._readers = []
