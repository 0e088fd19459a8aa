"""Which zoo model a checkpoint is: from its tensor shapes, cross-checked against ``config.json``.

Shapes are what gets loaded, so they decide; a ``config.json`` (official ``WanModel`` fields or diffusers
fields) that disagrees is reported in the log, and its ``model_type`` breaks ties between zoo entries of
the same architecture.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import CheckpointError
from ..zoo import MODELS, DiTConfig, ModelSpec, get_model
from .reader import ExpertSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arch:
    """The architecture a checkpoint's shapes imply (one expert)."""

    dim: int
    ffn_dim: int
    num_layers: int
    in_channels: int
    out_channels: int
    text_dim: int
    freq_dim: int
    image_dim: int | None

    @classmethod
    def of(cls, cfg: DiTConfig) -> Arch:
        return cls(cfg.num_heads * cfg.head_dim, cfg.ffn_dim, cfg.num_layers, cfg.in_channels,
                   cfg.out_channels, cfg.text_dim, cfg.freq_dim, cfg.image_dim)

    def describe(self) -> str:
        s = f"dim {self.dim}, {self.num_layers} layers, in_dim {self.in_channels}"
        if self.image_dim:
            s += f", image_dim {self.image_dim}"
        return s


def _shape(src: ExpertSource, key: str) -> tuple[int, ...]:
    if key in src:
        return src.shape(key)
    if key.endswith(".weight") and key[:-7] + ".int8_weight" in src:
        return src.shape(key[:-7] + ".int8_weight")
    first = ", ".join(src.keys()[:3])
    raise CheckpointError(f"not a Wan DiT checkpoint: no {key} (first keys: {first}); "
                          "point at the transformer weights")


def arch_from_shapes(src: ExpertSource) -> Arch:
    """Read dim, layers, ffn, in/out channels, text/freq/image dims off the tensor shapes."""
    pe = _shape(src, "patch_embedding.weight")
    img = "condition_embedder.image_embedder.ff.net.0.proj.weight"
    return Arch(
        dim=pe[0],
        ffn_dim=_shape(src, "blocks.0.ffn.net.0.proj.weight")[0],
        num_layers=src.num_layers(),
        in_channels=pe[1],
        out_channels=_shape(src, "proj_out.weight")[0] // 4,
        text_dim=_shape(src, "condition_embedder.text_embedder.linear_1.weight")[1],
        freq_dim=_shape(src, "condition_embedder.time_embedder.linear_1.weight")[1],
        image_dim=_shape(src, img)[1] if img in src else None,
    )


def arch_from_config(cfg: dict) -> dict[str, int | None]:
    """The architecture fields a ``config.json`` states (official or diffusers field names)."""
    if "num_attention_heads" in cfg:  # diffusers
        out = {"dim": cfg.get("num_attention_heads", 0) * cfg.get("attention_head_dim", 128),
               "ffn_dim": cfg.get("ffn_dim"), "num_layers": cfg.get("num_layers"),
               "in_channels": cfg.get("in_channels"), "out_channels": cfg.get("out_channels"),
               "image_dim": cfg.get("image_dim")}
    else:
        out = {"dim": cfg.get("dim"), "ffn_dim": cfg.get("ffn_dim"), "num_layers": cfg.get("num_layers"),
               "in_channels": cfg.get("in_dim"), "out_channels": cfg.get("out_dim")}
    return {k: v for k, v in out.items() if v is not None}


def looks_like(arch: Arch) -> list[ModelSpec]:
    """Zoo entries whose architecture equals ``arch``."""
    return [s for s in MODELS.values() if Arch.of(s.dit) == arch]


def _looks_like_text(arch: Arch) -> str:
    cands = looks_like(arch)
    if not cands:
        return "matches no zoo model"
    return "looks like " + " or ".join(s.id for s in cands)


def pick_spec(archs: dict[str, Arch], model_id: str | None = None,
              configs: dict[str, dict | None] | None = None) -> ModelSpec:
    """The zoo entry for a checkpoint whose experts have architectures ``archs``."""
    distinct = set(archs.values())
    if len(distinct) > 1:
        raise CheckpointError("the two experts have different architectures ("
                              + "; ".join(f"{n}: {a.describe()}" for n, a in archs.items())
                              + "); they are not a pair")
    arch = distinct.pop()
    n = len(archs)
    for name, cfg in (configs or {}).items():
        stated = arch_from_config(cfg or {})
        wrong = {k: v for k, v in stated.items() if getattr(arch, k) != v}
        if wrong:
            log.warning("config.json of %s says %s but the tensors say %s; going by the tensors", name,
                        ", ".join(f"{k}={v}" for k, v in wrong.items()), arch.describe())
    if model_id is not None:
        spec = get_model(model_id)
        if Arch.of(spec.dit) != arch:
            raise CheckpointError(f"checkpoint has {arch.describe()} ({_looks_like_text(arch)}), not {spec.id}")
        if len(spec.experts) != n:
            raise CheckpointError(_expert_count_message(spec, n))
        return spec
    cands = looks_like(arch)
    if not cands:
        raise CheckpointError(f"checkpoint has {arch.describe()}, ffn {arch.ffn_dim}: it matches no zoo model "
                              "(run `turbocompile models` for the list)")
    same_n = [s for s in cands if len(s.experts) == n]
    if not same_n:
        raise CheckpointError(_expert_count_message(cands[0], n))
    types = {(c or {}).get("model_type") for c in (configs or {}).values()} - {None}
    if len(same_n) > 1 and len(types) == 1:
        by_type = [s for s in same_n if s.task == next(iter(types))]
        same_n = by_type or same_n
    if len(same_n) > 1:
        log.info("checkpoint (%s) fits %s; using %s (pass a model id to choose)", arch.describe(),
                 ", ".join(s.id for s in same_n), same_n[0].id)
    if len(cands) > len(same_n):
        log.info("%s share this architecture; picked %s because it has %d expert(s)",
                 ", ".join(s.id for s in cands), same_n[0].id, n)
    return same_n[0]


def _expert_count_message(spec: ModelSpec, n: int) -> str:
    if len(spec.experts) > n:
        return (f"the checkpoint holds one expert but {spec.id} has two (high_noise and low_noise): "
                "pass the folder holding both, or both files")
    return f"the checkpoint holds {n} experts but {spec.id} has {len(spec.experts)}: pass one expert's files"
