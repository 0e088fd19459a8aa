"""Stream a checkpoint into diffusers' ``WanTransformer3DModel`` (one per expert).

The model is built on the meta device and every tensor is assigned as it is read, already on the target
device and dtype, so a 14B expert never exists twice in host RAM. ``.pth`` tensors whose dtype already
matches stay memory-mapped (zero copy). Tensors the model has no slot for (SLA ``proj_l``, the int8 storage
of TurboDiffusion ``-quant`` Linears) come back in :attr:`LoadedCheckpoint.extras`.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..modeling import build_dit, keep_fp32
from ..quantization import dequantize_int8_block
from ..zoo import ModelSpec
from . import keymap
from .infer import arch_from_shapes, pick_spec
from .layouts import layout_of, resolve
from .reader import ExpertSource

log = logging.getLogger(__name__)

#: Show a progress bar past this many bytes of weights.
PROGRESS_BYTES = 1 << 30


@dataclass
class LoadedCheckpoint:
    """A loaded checkpoint: one eval-mode, no-grad model per expert plus what the models cannot hold."""

    spec: ModelSpec
    models: dict[str, torch.nn.Module]
    extras: dict[str, dict[str, torch.Tensor]]
    layout: str
    source: list[Path] = field(default_factory=list)


@dataclass
class KeyPlan:
    """How the canonical keys of one expert map onto a model's state dict."""

    model_keys: list[str]           # state-dict keys, in model order
    int8: dict[str, str]            # model weight key -> int8 base ("blocks.0.attn1.to_q")
    proj_l: list[str]               # SLA projection keys (extras)
    shapes: dict[str, tuple[int, ...]]


def plan_keys(src: ExpertSource, spec: ModelSpec, expert: str) -> KeyPlan:
    """Match the checkpoint's keys and shapes against the model's; raise on any mismatch."""
    model = build_dit(spec.dit, device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    keys = src.keys()
    int8 = {k[: -len(".int8_weight")] + ".weight": k[: -len(".int8_weight")]
            for k in keys if k.endswith(".int8_weight")}
    proj_l = [k for k in keys if keymap.is_proj_l(k)]
    provided = {k for k in keys if not keymap.is_extra(k)} | set(int8)
    orphan_scales = [k for k in keys if k.endswith(".scale") and k[:-6] + ".int8_weight" not in src]
    where = f"{expert} expert" if expert != "main" else "checkpoint"
    missing = [k for k in expected if k not in provided]
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} tensor(s) {spec.id} needs: "
                              f"{', '.join(_official(missing[:3], src))}{' ...' if len(missing) > 3 else ''}; "
                              "incomplete download or another model")
    unexpected = sorted(k for k in provided if k not in expected) + orphan_scales
    if unexpected:
        raise CheckpointError(f"{where} has {len(unexpected)} unexpected tensor(s) for {spec.id}: "
                              f"{', '.join(_official(unexpected[:3], src))}{' ...' if len(unexpected) > 3 else ''}; "
                              "is it a checkpoint of another model or format?")
    shapes = {}
    for k, want in expected.items():
        have = src.shape(int8[k] + ".int8_weight") if k in int8 else src.shape(k)
        if tuple(have) != want:
            name = _official([k], src)[0]
            raise CheckpointError(f"tensor {name} has shape {list(have)}, {spec.id} needs {list(want)}; "
                                  "the checkpoint is of another model")
        if k in int8:
            n, kk = want
            want_s = (-(-n // 128), -(-kk // 128))
            if tuple(src.shape(int8[k] + ".scale")) != want_s:
                raise CheckpointError(f"{int8[k]}.scale has shape {list(src.shape(int8[k] + '.scale'))}, "
                                      f"expected {list(want_s)} (one per 128x128 block)")
        shapes[k] = want
    return KeyPlan(list(expected), int8, proj_l, shapes)


def _official(keys: list[str], src: ExpertSource) -> list[str]:
    """Name keys as the checkpoint's user knows them (official names for official files)."""
    if src.naming != "official":
        return keys
    return [keymap.diffusers_to_official(k) or k for k in keys]


def _assign(model: torch.nn.Module, key: str, t: torch.Tensor) -> None:
    mod_name, _, attr = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        mod._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[attr] = t


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """safetensors hands out tensors 16 bytes off a 64-byte boundary; CPU kernels then take other code
    paths (slower, and not bit-identical to an aligned copy), so copy those once."""
    return t.clone() if t.device.type == "cpu" and t.data_ptr() % 64 else t


def _fix_rope(model: torch.nn.Module, device) -> None:
    """Non-persistent buffers (RoPE tables) are not in any checkpoint: rebuild them on ``device`` in fp32."""
    rope = getattr(model, "rope", None)
    if rope is not None and any(b.is_meta for b in rope.buffers()):
        with torch.device(device):
            fresh = type(rope)(rope.attention_head_dim, rope.patch_size, rope.max_seq_len)
        model.rope = fresh.to(torch.float32)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"internal: {len(left)} tensor(s) were not loaded ({', '.join(left[:3])})")


@contextlib.contextmanager
def progress_bar(total_bytes: int, description: str, enabled: bool):
    """A rich progress bar over bytes (only past :data:`PROGRESS_BYTES`); yields ``advance(n)``."""
    if not enabled or total_bytes < PROGRESS_BYTES:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  transient=True) as prog:
        task = prog.add_task(description, total=total_bytes)
        yield lambda n: prog.advance(task, n)


def _load_expert(src: ExpertSource, spec: ModelSpec, expert: str, device, dtype, dequantize: bool,
                 progress: bool) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    plan = plan_keys(src, spec, expert)
    model = build_dit(spec.dit, device="meta")
    extras: dict[str, torch.Tensor] = {}
    total = sum(src.nbytes(k) for k in src.keys())
    with progress_bar(total, f"loading {spec.id} ({expert})", progress) as advance:
        for k in plan.model_keys:
            if k in plan.int8:
                base = plan.int8[k]
                # dequantize on the target device (a GPU does it in microseconds, a CPU in ~0.1 s per 14B Linear)
                q = _aligned(src.get(base + ".int8_weight").to(device))
                scale = _aligned(src.get(base + ".scale").to(device))
                bias = base + ".bias"
                wdt = dtype or (src.dtype(bias) if bias in src else torch.bfloat16)
                t = dequantize_int8_block(q, scale, wdt)
                if not dequantize:
                    extras[base + ".int8_weight"] = q
                    extras[base + ".scale"] = scale
                advance(src.nbytes(base + ".int8_weight") + src.nbytes(base + ".scale"))
            else:
                t = src.get(k)
                advance(src.nbytes(k))
            if dtype is None:
                target = t.dtype
            else:
                target = torch.float32 if keep_fp32(model, k) and t.is_floating_point() else dtype
            _assign(model, k, _aligned(t.to(device=device, dtype=target)))
        for k in plan.proj_l:
            extras[k] = _aligned(src.get(k).to(device))
            advance(src.nbytes(k))
    _fix_rope(model, device)
    if plan.int8:
        log.info("%s: %d int8 Linears dequantized into the model%s", expert, len(plan.int8),
                 "" if dequantize else "; int8 weights and scales kept bit-exact in extras")
    return model.eval().requires_grad_(False), extras


def open_experts(path) -> tuple[dict[str, ExpertSource], str, list[Path], dict[str, dict | None]]:
    """Open every expert of a checkpoint: (sources, layout, source paths, config.json per expert)."""
    resolved = resolve(path)
    sources: dict[str, ExpertSource] = {}
    try:
        for name, ef in resolved.experts.items():
            sources[name] = ef.open()
        layout = layout_of(resolved, sources)
    except BaseException:
        for s in sources.values():
            s.close()
        raise
    return sources, layout, resolved.sources, {n: ef.config for n, ef in resolved.experts.items()}


def identify(sources: dict[str, ExpertSource], model_id: str | None, configs: dict[str, dict | None]) -> ModelSpec:
    """The zoo entry of opened experts (``model_id`` verified against the shapes when given)."""
    return pick_spec({n: arch_from_shapes(s) for n, s in sources.items()}, model_id, configs)


def load_checkpoint(path, model_id: str | None = None, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = torch.bfloat16, dequantize: bool = False,
                    progress: bool = True) -> LoadedCheckpoint:
    """Load a Wan checkpoint of any supported layout into ``WanTransformer3DModel`` experts.

    ``path``: a file, a folder, or (TurboDiffusion A14B) a pair of high/low files. ``dtype``: parameters
    are cast to it, except diffusers' fp32 modules; ``None`` keeps the stored dtypes. ``dequantize``:
    drop the int8 storage of ``-quant`` files instead of returning it in ``extras``.
    """
    sources, layout, paths, configs = open_experts(path)
    try:
        spec = identify(sources, model_id, configs)
        names = list(sources)
        if spec.is_moe and set(names) != set(spec.experts):
            raise CheckpointError(f"{spec.id} needs experts {', '.join(spec.experts)}, found {', '.join(names)}")
        models, extras = {}, {}
        for name in names:
            models[name], extras[name] = _load_expert(sources[name], spec, name, device, dtype, dequantize,
                                                      progress)
    finally:
        for s in sources.values():
            s.close()
    log.info("loaded %s (%s layout) from %s", spec.id, layout, ", ".join(map(str, paths)))
    return LoadedCheckpoint(spec, models, extras, layout, paths)
