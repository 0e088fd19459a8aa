"""Write Wan checkpoints in every layout ``turbocompile.checkpoints`` reads, from in-memory models.

Other tests reuse this; the API is four writers and two state-dict builders::

    from ckpt_factory import write_official, write_diffusers, write_turbodiffusion, turbodiffusion_state_dict
    model = random_dit(get_model("wan-tiny"), seed=0)                 # one expert
    pair = {"high_noise": random_dit(spec_i2v, 1), "low_noise": random_dit(spec_i2v, 2)}   # two experts
    path = write_official(model, tmp_path / "ckpt", fmt="sharded")    # -> path to give load_checkpoint
    path = write_diffusers(pair, tmp_path / "diffusers")
    path = write_turbodiffusion(model, tmp_path / "turbo", quant=True, wrap="state_dict")

Every writer takes a ``torch.nn.Module`` (one expert) or a dict ``{"high_noise": m, "low_noise": m}`` and
returns the path to hand to ``load_checkpoint`` (a file or a folder). Tensors are written in the model's
dtypes. TurboDiffusion files get seeded random (non-zero) SLA ``proj_l`` weights; call
:func:`turbodiffusion_state_dict` with the same arguments to get exactly what was written.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from turbocompile.checkpoints.keymap import diffusers_to_official
from turbocompile.quantization import quantize_int8_block



def _experts(models) -> dict[str, torch.nn.Module]:
    return dict(models) if isinstance(models, dict) else {"main": models}


def official_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under official ``WanModel`` key names (cloned, contiguous)."""
    out = {}
    for k, v in model.state_dict().items():
        name = diffusers_to_official(k)
        assert name is not None, f"no official name for {k}"
        out[name] = v.detach().clone().contiguous()
    return out


def official_config(model: torch.nn.Module) -> dict:
    """Wan's own ``config.json`` fields for a diffusers model."""
    c = model.config
    return {"_class_name": "WanModel", "_diffusers_version": "0.30.0",
            "model_type": "i2v" if c.in_channels == 36 else "t2v", "patch_size": [1, 2, 2],
            "in_dim": c.in_channels, "dim": c.num_attention_heads * c.attention_head_dim, "ffn_dim": c.ffn_dim,
            "freq_dim": c.freq_dim, "text_dim": c.text_dim, "out_dim": c.out_channels,
            "num_heads": c.num_attention_heads, "num_layers": c.num_layers, "eps": c.eps}


def _write_sharded(sd: dict[str, torch.Tensor], d: Path, shards: int) -> None:
    keys = list(sd)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(d / name))
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def write_official(models, dst: Path, *, fmt: str = "safetensors", shards: int = 3,
                   config: bool = True) -> Path:
    """Official Wan layout in folder ``dst``: ``fmt`` is ``safetensors`` (one file), ``sharded``
    (``shards`` files + index json) or ``pth`` (``dst/wan.pth``, returned as the path).

    Two experts go to ``dst/high_noise_model/`` and ``dst/low_noise_model/`` (``dst`` is returned).
    """
    dst = Path(dst)
    experts = _experts(models)
    result = dst
    for name, model in experts.items():
        d = dst if name == "main" else dst / f"{name}_model"
        d.mkdir(parents=True, exist_ok=True)
        sd = official_state_dict(model)
        if fmt == "safetensors":
            save_file(sd, str(d / "diffusion_pytorch_model.safetensors"))
        elif fmt == "sharded":
            _write_sharded(sd, d, shards)
        elif fmt == "pth":
            torch.save(sd, d / "wan.pth")
            result = d / "wan.pth" if name == "main" else dst
        else:
            raise ValueError(f"unknown fmt {fmt}")
        if config:
            (d / "config.json").write_text(json.dumps(official_config(model)))
    return result


def write_diffusers(models, dst: Path, *, nested: bool = True) -> Path:
    """Diffusers layout via ``save_pretrained``: ``dst/transformer/`` (+ ``transformer_2/`` for the
    low-noise expert). ``nested=False`` (one expert) writes the model straight into ``dst``."""
    dst = Path(dst)
    experts = _experts(models)
    if not nested:
        (model,) = experts.values()
        model.save_pretrained(str(dst))
        return dst
    for name, model in experts.items():
        model.save_pretrained(str(dst / ("transformer_2" if name == "low_noise" else "transformer")))
    return dst


def turbodiffusion_state_dict(model: torch.nn.Module, *, quant: bool = False, seed: int = 0,
                              prefix: str = "") -> dict[str, torch.Tensor]:
    """TurboDiffusion's keys: official names, Linear patch embedding, fp32 ``proj_l`` per block (seeded),
    and with ``quant`` every block Linear but proj_l as ``int8_weight`` + fp32 ``scale`` (+ ``bias``)."""
    sd = official_state_dict(model)
    pe = sd["patch_embedding.weight"]
    sd["patch_embedding.weight"] = pe.reshape(pe.shape[0], -1).contiguous()
    gen = torch.Generator().manual_seed(seed)
    for i in range(model.config.num_layers):
        base = f"blocks.{i}.self_attn.attn_op.local_attn.proj_l"
        sd[f"{base}.weight"] = torch.randn(128, 128, generator=gen) / 12
        sd[f"{base}.bias"] = 0.1 * torch.randn(128, generator=gen)
    if quant:
        for k in [k for k in sd if k.startswith("blocks.") and k.endswith(".weight")]:
            if sd[k].ndim == 2 and "proj_l" not in k:
                q, s = quantize_int8_block(sd.pop(k))
                sd[k[:-7] + ".int8_weight"], sd[k[:-7] + ".scale"] = q, s
    return {prefix + k: v for k, v in sd.items()}


def write_turbodiffusion(models, dst: Path, *, quant: bool = False, seed: int = 0,
                         wrap: str | None = None, prefix: str = "") -> Path:
    """TurboDiffusion ``.pth`` in folder ``dst``: ``TurboWan-tiny[-quant].pth``, or for two experts
    ``TurboWan-tiny-high[-quant].pth`` + ``...-low...`` (``dst`` is returned). ``wrap``: put the state dict
    under that key (``state_dict``/``model``); ``prefix``: prepend to every key (``net.``). Expert ``i``
    (in dict order) gets proj_l seed ``seed + i``."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    experts = _experts(models)
    tail = "-quant" if quant else ""
    out = dst
    for i, (name, model) in enumerate(experts.items()):
        sd = turbodiffusion_state_dict(model, quant=quant, seed=seed + i, prefix=prefix)
        obj = {wrap: sd} if wrap else sd
        fname = f"TurboWan-tiny{tail}.pth" if name == "main" else f"TurboWan-tiny-{name.split('_')[0]}{tail}.pth"
        torch.save(obj, dst / fname)
        if name == "main":
            out = dst / fname
    return out
