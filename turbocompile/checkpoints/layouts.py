"""Find the weight files of a checkpoint on disk and tell its layout.

Layouts (what :func:`detect_layout` returns):

- ``official``: Wan's own ``diffusion_pytorch_model.safetensors``, shards ``-0000X-of-0000N`` with an
  ``.index.json``, ``high_noise_model/`` + ``low_noise_model/`` (Wan2.2 A14B), or a ``.pth`` state dict;
- ``diffusers``: a folder with ``transformer/`` (+ ``transformer_2/`` for the low-noise expert), or a
  folder holding a diffusers ``config.json`` (``_class_name: WanTransformer3DModel``) itself;
- ``turbodiffusion`` / ``turbodiffusion-quant``: TurboDiffusion's ``.pth`` files (official key names,
  Linear patch embedding, SLA ``proj_l``; ``-quant`` adds int8 Linears), alone or as a high/low pair.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError
from .reader import ExpertSource

log = logging.getLogger(__name__)

EXTRAS_FILE = "turbodiffusion_extras.safetensors"
PTH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_SHARD_RE = re.compile(r"^(?P<stem>.+)-\d{5}-of-\d{5}(?P<tail>.*)\.safetensors$")


@dataclass
class ExpertFiles:
    """The files of one expert: weights, an optional config.json and an optional extras side file."""

    files: list[Path]
    config: dict | None = None
    extras: Path | None = None

    def open(self) -> ExpertSource:
        return ExpertSource(self.files, self.extras)


@dataclass
class Resolved:
    """What a checkpoint path points at: its experts ("main", or "high_noise" + "low_noise")."""

    experts: dict[str, ExpertFiles]
    container: str  # "diffusers" when the folder structure says so, else "" (decided from keys)
    sources: list[Path] = field(default_factory=list)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e}); fix or delete it") from None


def _expert_from_dir(d: Path) -> ExpertFiles:
    """The weight files of an expert folder (index json, single safetensors, or one .pth)."""
    config = _read_json(d / "config.json") if (d / "config.json").is_file() else None
    extras = d / EXTRAS_FILE if (d / EXTRAS_FILE).is_file() else None
    indexes = sorted(d.glob("*.safetensors.index.json"))
    if indexes:
        return ExpertFiles(_shards_from_index(indexes[0]), config, extras)
    st = sorted(p for p in d.glob("*.safetensors") if p.name != EXTRAS_FILE)
    if st:
        if len(st) > 1 and not all(_SHARD_RE.match(p.name) for p in st):
            raise CheckpointError(f"{d} holds several unrelated .safetensors files "
                                  f"({', '.join(p.name for p in st[:4])}); point at one of them")
        return ExpertFiles(st, config, extras)
    pth = sorted(p for p in d.iterdir() if p.suffix in PTH_SUFFIXES)
    if len(pth) == 1:
        return ExpertFiles(pth, config, extras)
    if pth:
        raise CheckpointError(f"{d} holds several .pth files ({', '.join(p.name for p in pth[:4])}); "
                              "point at one of them, or pass a high/low pair as a list of two paths")
    raise CheckpointError(f"no checkpoint files in {d} (expected diffusion_pytorch_model*.safetensors, "
                          "an .index.json, a .pth, or transformer/ / high_noise_model/ folders)")


def _shards_from_index(index: Path) -> list[Path]:
    data = _read_json(index)
    wm = data.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index} has no weight_map; re-download it")
    shards = [index.parent / n for n in dict.fromkeys(sorted(wm.values()))]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise CheckpointError(f"{index.name} lists {len(missing)} shard(s) that are not in {index.parent}: "
                              f"{', '.join(missing[:3])}; re-download them")
    return shards


def _expert_from_file(p: Path) -> ExpertFiles:
    d = p.parent
    config = _read_json(d / "config.json") if (d / "config.json").is_file() else None
    extras = d / EXTRAS_FILE if (d / EXTRAS_FILE).is_file() and p.name != EXTRAS_FILE else None
    if p.name.endswith(".index.json"):
        return ExpertFiles(_shards_from_index(p), config, extras)
    if p.suffix == ".safetensors":
        m = _SHARD_RE.match(p.name)
        index = d / f"{m.group('stem')}{m.group('tail')}.safetensors.index.json" if m else None
        if index is not None and index.is_file():
            return ExpertFiles(_shards_from_index(index), config, extras)
        return ExpertFiles([p], config, extras)
    if p.suffix in PTH_SUFFIXES:
        return ExpertFiles([p], config, extras)
    raise CheckpointError(f"{p} is not a checkpoint file (expected .safetensors, .index.json or .pth)")


def _pair(paths: list[Path]) -> dict[str, Path]:
    """Assign two files/folders to the high- and low-noise experts by name."""
    high = [p for p in paths if "high" in p.name.lower()]
    low = [p for p in paths if "low" in p.name.lower()]
    if len(high) == 1 and len(low) == 1 and high[0] != low[0]:
        return {"high_noise": high[0], "low_noise": low[0]}
    raise CheckpointError(
        f"cannot tell the high- and low-noise experts apart among {', '.join(p.name for p in paths)}: "
        "their names must contain 'high' and 'low'"
    )


def resolve(path) -> Resolved:
    """Find the experts and files a checkpoint path (file, folder, or a pair of paths) points at."""
    if isinstance(path, (list, tuple)):
        paths = [Path(p) for p in path]
        if len(paths) == 1:
            return resolve(paths[0])
        if len(paths) != 2:
            raise CheckpointError(f"give one checkpoint path or a high/low pair, not {len(paths)} paths")
        parts = {name: resolve(p) for name, p in _pair(paths).items()}
        for name, r in parts.items():
            if len(r.experts) != 1:
                raise CheckpointError(f"{r.sources[0]} holds two experts itself; pass it alone")
        containers = {r.container for r in parts.values()}
        return Resolved({n: next(iter(r.experts.values())) for n, r in parts.items()},
                        containers.pop() if len(containers) == 1 else "",
                        [s for r in parts.values() for s in r.sources])
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_file():
        return Resolved({"main": _expert_from_file(p)}, "", [p])
    if (p / "transformer").is_dir():
        experts = {"main": _expert_from_dir(p / "transformer")}
        if (p / "transformer_2").is_dir():
            experts = {"high_noise": experts["main"], "low_noise": _expert_from_dir(p / "transformer_2")}
        return Resolved(experts, "diffusers", [p])
    if (p / "high_noise_model").is_dir() and (p / "low_noise_model").is_dir():
        return Resolved({"high_noise": _expert_from_dir(p / "high_noise_model"),
                         "low_noise": _expert_from_dir(p / "low_noise_model")}, "", [p])
    cfg = _read_json(p / "config.json") if (p / "config.json").is_file() else {}
    container = "diffusers" if cfg.get("_class_name") == "WanTransformer3DModel" else ""
    has_weights = any(p.glob("*.safetensors")) or any(p.glob("*.index.json"))
    pth = sorted(q for q in p.iterdir() if q.suffix in PTH_SUFFIXES)
    if not has_weights and len(pth) == 2:
        pair = _pair(pth)
        return Resolved({n: _expert_from_file(q) for n, q in pair.items()}, "", [p])
    return Resolved({"main": _expert_from_dir(p)}, container, [p])


def layout_of(resolved: Resolved, sources: dict[str, ExpertSource]) -> str:
    """The layout name, from the folder structure and the key names of the opened experts."""
    flavors = {s.flavor for s in sources.values()}
    if len(flavors) != 1:
        raise CheckpointError(f"the two experts are stored in different layouts ({', '.join(sorted(flavors))}); "
                              "convert one so both match")
    flavor = flavors.pop()
    if resolved.container == "diffusers" and flavor != "diffusers":
        log.warning("diffusers folder structure but official key names inside; loading by key names")
    return flavor


def detect_layout(path) -> str:
    """``official`` | ``diffusers`` | ``turbodiffusion`` | ``turbodiffusion-quant`` (reads headers only)."""
    resolved = resolve(path)
    sources: dict[str, ExpertSource] = {}
    try:
        for name, ef in resolved.experts.items():
            sources[name] = ef.open()
        return layout_of(resolved, sources)
    finally:
        for s in sources.values():
            s.close()
