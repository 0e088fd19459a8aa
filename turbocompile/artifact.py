"""The artifact directory: write it atomically, read it back with every check first.

```
ARTIFACT/
  manifest.json                      schema, model id + config, experts, shapes, target, passes + options,
                                     versions, sha256 of every file
  experts/<name>/program.pt2         torch.export.save of the rewritten graph; weights are its leading inputs
  experts/<name>/weights.safetensors the weights, keyed by the program's placeholder names
  dumps/<name>/NN_<pass>/...         per-pass dumps, dumps/index.html to walk them
```
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import ArtifactError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
#: ``manifest["dtype"]`` (written as ``str(dtype)`` without ``torch.``) -> torch dtype
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def sha256_file(path: Path, chunk: int = 16 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for name in ("triton", "diffusers", "transformers", "safetensors"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - an optional package
            out[name] = "not installed"
    from . import __version__

    out["turbocompile"] = __version__
    return out


@contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside ``out``; on success rename it to ``out``; on any error remove it."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise ArtifactError(f"{out} already exists and is not empty; choose another --out or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[str(p.relative_to(root))] = sha256_file(p)
    manifest = {**manifest, "schema_version": SCHEMA_VERSION, "files": files}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))


def read_manifest(root: Path, verify_hashes: bool = True) -> dict[str, Any]:
    """The manifest, after checking the schema and (by default) every file's sha256."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an artifact directory (run `turbocompile build ... --out {root}` first)")
    path = root / MANIFEST
    if not path.exists():
        raise ArtifactError(f"{root} has no {MANIFEST}: not a turbocompile artifact, or an interrupted build")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc.msg}); rebuild the artifact") from exc
    schema = manifest.get("schema_version")
    if schema != SCHEMA_VERSION:
        raise ArtifactError(f"{root} has artifact schema {schema}, this turbocompile reads schema {SCHEMA_VERSION}; "
                            "rebuild it with this version")
    if verify_hashes:
        for rel, digest in manifest.get("files", {}).items():
            f = root / rel
            if not f.exists():
                raise ArtifactError(f"{root}: file {rel} listed in the manifest is missing; rebuild the artifact")
            if not rel.startswith("dumps/") and sha256_file(f) != digest:
                raise ArtifactError(f"{root}: {rel} does not match its sha256 in the manifest (modified or "
                                    "corrupt); rebuild the artifact")
    return manifest
