"""Key names: official Wan (``WanModel``) <-> diffusers (``WanTransformer3DModel``), plus TurboDiffusion extras.

The mapping is 1:1 and shape-preserving (``wan_architecture.md`` §3.2), except TurboDiffusion's patch
embedding, which it stores as a Linear ``[dim, in_dim*1*2*2]`` instead of a Conv3d ``[dim, in_dim, 1, 2, 2]``
(a plain reshape: the Linear's input is the patch flattened in (channel, t, h, w) order).

Everything this package handles internally uses the *canonical* names: diffusers' names, and for tensors a
diffusers model has no slot for (SLA ``proj_l``, the int8 blocks of ``-quant`` files) diffusers-style
names such as ``blocks.3.attn1.proj_l.weight`` or ``blocks.3.attn1.to_q.int8_weight``.
"""
from __future__ import annotations

import re

# Top-level (outside ``blocks.N.``) module prefixes, official -> diffusers.
_GLOBAL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("patch_embedding.", "patch_embedding."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.head.", "proj_out."),
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
)
# Whole top-level keys (parameters that are not inside a sub-module).
_GLOBAL_EXACT: tuple[tuple[str, str], ...] = (
    ("head.modulation", "scale_shift_table"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
)
# Inside ``blocks.N.``: module prefixes, official -> diffusers. Official norm3 (the only block norm with
# parameters, the cross-attention pre-norm) is diffusers' norm2.
_BLOCK_PREFIXES: tuple[tuple[str, str], ...] = (
    ("self_attn.q.", "attn1.to_q."),
    ("self_attn.k.", "attn1.to_k."),
    ("self_attn.v.", "attn1.to_v."),
    ("self_attn.o.", "attn1.to_out.0."),
    ("self_attn.norm_q.", "attn1.norm_q."),
    ("self_attn.norm_k.", "attn1.norm_k."),
    ("self_attn.attn_op.local_attn.proj_l.", "attn1.proj_l."),  # TurboDiffusion SLA linear branch
    ("norm3.", "norm2."),
    ("cross_attn.q.", "attn2.to_q."),
    ("cross_attn.k.", "attn2.to_k."),
    ("cross_attn.v.", "attn2.to_v."),
    ("cross_attn.o.", "attn2.to_out.0."),
    ("cross_attn.norm_q.", "attn2.norm_q."),
    ("cross_attn.norm_k.", "attn2.norm_k."),
    ("cross_attn.k_img.", "attn2.add_k_proj."),
    ("cross_attn.v_img.", "attn2.add_v_proj."),
    ("cross_attn.norm_k_img.", "attn2.norm_added_k."),
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
)
_BLOCK_EXACT: tuple[tuple[str, str], ...] = (("modulation", "scale_shift_table"),)

#: Wrapper prefixes that training / repacking tools put in front of the model's own keys.
STRIP_PREFIXES: tuple[str, ...] = ("model.diffusion_model.", "net.", "module.", "model.")

#: Suffixes of the bit-exact int8 storage of TurboDiffusion ``-quant`` Linears.
INT8_SUFFIXES: tuple[str, ...] = (".int8_weight", ".scale")

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _rename(key: str, exact: tuple[tuple[str, str], ...], prefixes: tuple[tuple[str, str], ...],
            reverse: bool) -> str | None:
    for a, b in exact:
        src, dst = (b, a) if reverse else (a, b)
        if key == src:
            return dst
    for a, b in prefixes:
        src, dst = (b, a) if reverse else (a, b)
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def _convert(key: str, reverse: bool) -> str | None:
    m = _BLOCK_RE.match(key)
    if m:
        inner = _rename(m.group(2), _BLOCK_EXACT, _BLOCK_PREFIXES, reverse)
        return None if inner is None else f"blocks.{m.group(1)}.{inner}"
    return _rename(key, _GLOBAL_EXACT, _GLOBAL_PREFIXES, reverse)


def official_to_diffusers(key: str) -> str | None:
    """Diffusers name of an official (or TurboDiffusion) key; ``None`` if the key is not a Wan DiT key."""
    return _convert(key, reverse=False)


def diffusers_to_official(key: str) -> str | None:
    """Official name of a diffusers (canonical) key; ``None`` if the key is not a Wan DiT key."""
    return _convert(key, reverse=True)


def strip_prefix(keys: list[str]) -> str:
    """The wrapper prefix shared by every key (``net.``, ``model.diffusion_model.``, ...), or ``""``."""
    for p in STRIP_PREFIXES:
        if keys and all(k.startswith(p) for k in keys):
            return p
    return ""


def is_proj_l(key: str) -> bool:
    """A TurboDiffusion SLA projection (canonical ``blocks.N.attn1.proj_l.*`` or official name)."""
    return ".proj_l." in key


def is_int8(key: str) -> bool:
    """Part of the int8 storage of a quantized Linear (``*.int8_weight`` / ``*.scale``)."""
    return key.endswith(INT8_SUFFIXES)


def is_extra(key: str) -> bool:
    """Canonical keys that a ``WanTransformer3DModel`` has no parameter for."""
    return is_proj_l(key) or is_int8(key)


def looks_official(keys: list[str]) -> bool:
    """True if the key set uses official ``WanModel`` names (after prefix stripping)."""
    return any(k.startswith(("text_embedding.", "time_projection.", "head.")) or ".self_attn." in k
               for k in keys)


def looks_diffusers(keys: list[str]) -> bool:
    """True if the key set uses diffusers ``WanTransformer3DModel`` names."""
    return any(k.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in k for k in keys)
