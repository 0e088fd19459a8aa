"""Convert a checkpoint between layouts (to ``diffusers`` or ``official``), streaming tensor by tensor.

Dtypes are kept as stored. TurboDiffusion sources carry tensors neither target has a slot for: int8
Linears are dequantized (``q * scale``, in the dtype of the Linear's bias) and SLA ``proj_l`` goes into a
side file ``turbodiffusion_extras.safetensors`` in each expert folder, which :func:`load_checkpoint`
picks up again. The output is built in a temporary folder next to ``dst`` and renamed into place.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..modeling import build_dit
from ..quantization import dequantize_int8_block
from ..zoo import ModelSpec
from . import keymap
from .layouts import EXTRAS_FILE
from .loader import identify, open_experts, plan_keys, progress_bar
from .reader import ExpertSource

log = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model"
_EXPERT_DIRS = {
    "diffusers": {"main": "transformer", "high_noise": "transformer", "low_noise": "transformer_2"},
    "official": {"main": ".", "high_noise": "high_noise_model", "low_noise": "low_noise_model"},
}


def official_config(spec: ModelSpec) -> dict:
    """The ``config.json`` Wan's own ``WanModel.from_pretrained`` reads."""
    c = spec.dit
    model_type = "i2v" if c.image_dim or spec.task == "i2v" else spec.task
    return {
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": model_type,
        "patch_size": [1, 2, 2], "text_len": 512, "in_dim": c.in_channels, "dim": c.num_heads * c.head_dim,
        "ffn_dim": c.ffn_dim, "freq_dim": c.freq_dim, "text_dim": c.text_dim, "out_dim": c.out_channels,
        "num_heads": c.num_heads, "num_layers": c.num_layers, "window_size": [-1, -1], "qk_norm": True,
        "cross_attn_norm": True, "eps": c.eps,
    }


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """safetensors refuses views and shared storage: copy only when ``t`` is not a whole storage."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    return t


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Split names (in order) into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes:
        if shards[-1] and used + n > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def write_safetensors_shards(out: Path, names: dict[str, str], sizes: dict[str, int], fetch,
                             max_shard_bytes: int, advance=lambda n: None) -> list[Path]:
    """Write tensors ``fetch(src_name)`` under ``names[src_name]`` as one file or shards + index json.

    Only one shard's tensors are in memory at a time.
    """
    from safetensors.torch import save_file

    shards = plan_shards([(k, sizes[k]) for k in names], max_shard_bytes)
    files = []
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"{WEIGHTS_NAME}.safetensors" if len(shards) == 1 else \
            f"{WEIGHTS_NAME}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for k in shard:
            tensors[names[k]] = _own_storage(fetch(k))
            weight_map[names[k]] = fname
            advance(sizes[k])
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
        files.append(out / fname)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out / f"{WEIGHTS_NAME}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return files


def _write_expert(src: ExpertSource, spec: ModelSpec, expert: str, out: Path, to: str,
                  max_shard_bytes: int, advance) -> None:
    from safetensors.torch import save_file

    plan = plan_keys(src, spec, expert)
    out.mkdir(parents=True, exist_ok=True)

    def fetch(k: str) -> torch.Tensor:
        if k in plan.int8:
            base = plan.int8[k]
            bias = base + ".bias"
            wdt = src.dtype(bias) if bias in src else torch.bfloat16
            return dequantize_int8_block(src.get(base + ".int8_weight"), src.get(base + ".scale"), wdt)
        return src.get(k)

    def size(k: str) -> int:
        if k in plan.int8:
            bias = plan.int8[k] + ".bias"
            n = 1
            for d in plan.shapes[k]:
                n *= d
            return n * (src.dtype(bias) if bias in src else torch.bfloat16).itemsize
        return src.nbytes(k)

    rename = (lambda k: k) if to == "diffusers" else (lambda k: keymap.diffusers_to_official(k) or k)
    names = {k: rename(k) for k in plan.model_keys}
    write_safetensors_shards(out, names, {k: size(k) for k in plan.model_keys}, fetch, max_shard_bytes, advance)
    if plan.int8:
        log.warning("%s: %d int8 Linears dequantized (q * scale): the %s layout has no int8 slot", expert,
                    len(plan.int8), to)
    if plan.proj_l:
        save_file({k: _own_storage(src.get(k)) for k in plan.proj_l}, str(out / EXTRAS_FILE),
                  metadata={"format": "pt"})
        log.info("%s: %d SLA proj_l tensors written to %s/%s", expert, len(plan.proj_l), out.name, EXTRAS_FILE)
    if to == "diffusers":
        build_dit(spec.dit, device="meta").save_config(str(out))
    else:
        (out / "config.json").write_text(json.dumps(official_config(spec), indent=2))


def convert_checkpoint(src, dst, to: str, model_id: str | None = None, *,
                       max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write the checkpoint at ``src`` to a new folder ``dst`` in layout ``to`` (``diffusers``/``official``).

    ``diffusers``: ``dst/transformer/`` (+ ``transformer_2/`` for the low-noise expert), each readable by
    ``WanTransformer3DModel.from_pretrained``. ``official``: ``diffusion_pytorch_model.safetensors`` (or
    shards + index) with Wan's ``config.json``; two-expert models get ``high_noise_model/`` +
    ``low_noise_model/``. Shards past ``max_shard_bytes``. Refuses an existing non-empty ``dst``.
    """
    if to not in _EXPERT_DIRS:
        raise CheckpointError(f"cannot convert to '{to}': choose diffusers or official")
    dst = Path(dst).expanduser()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"destination {dst} already exists and is not empty; choose a new folder")
    sources, layout, paths, configs = open_experts(src)
    try:
        spec = identify(sources, model_id, configs)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
        try:
            total = sum(s.nbytes(k) for s in sources.values() for k in s.keys())
            with progress_bar(total, f"converting {spec.id} to {to}", True) as advance:
                for name, s in sources.items():
                    _write_expert(s, spec, name, tmp / _EXPERT_DIRS[to][name], to, max_shard_bytes, advance)
            if dst.exists():
                dst.rmdir()
            tmp.rename(dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        for s in sources.values():
            s.close()
    log.info("converted %s (%s, %s) to %s layout in %s", ", ".join(map(str, paths)), spec.id, layout, to, dst)
    return dst
