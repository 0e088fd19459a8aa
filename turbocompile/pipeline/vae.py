"""The Wan video VAE through diffusers' ``AutoencoderKLWan``: loading (official ``Wan2.1_VAE.pth`` or a
diffusers ``vae/`` folder), normalized encode, de-normalized decode.

The official checkpoint stores the encoder/decoder as flat ``nn.Sequential``s (``downsamples.N``,
``upsamples.N``, residual blocks as ``residual.0/2/3/6``, ``middle.0/1/2``, ``head.0/2``, ``conv1``/
``conv2`` around the latent). diffusers keeps the encoder flat but groups the decoder into up blocks of
``num_res_blocks + 1`` resnets plus one upsampler. :func:`convert_wan_vae_keys` does that renaming; the
tensors keep their shapes.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ..errors import CheckpointError
from .files import component_folder, load_into, read_state_dict

log = logging.getLogger(__name__)

# residual block layers: official index in ``residual`` -> diffusers name
_RESIDUAL = {"0": "norm1", "2": "conv1", "3": "norm2", "6": "conv2"}
_TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
_MIDDLE_ATTN = {"norm", "to_qkv", "proj"}


def _resblock_part(rest: str) -> str | None:
    """``residual.2.weight`` -> ``conv1.weight``; ``shortcut.bias`` -> ``conv_shortcut.bias``; else None."""
    m = re.fullmatch(r"residual\.(\d+)\.(\w+)", rest)
    if m and m.group(1) in _RESIDUAL:
        return f"{_RESIDUAL[m.group(1)]}.{m.group(2)}"
    m = re.fullmatch(r"shortcut\.(\w+)", rest)
    return f"conv_shortcut.{m.group(1)}" if m else None


def _decoder_slot(index: int, num_res_blocks: int) -> tuple[int, int | None]:
    """Flat ``upsamples`` index -> (up block, resnet index or None for the block's upsampler)."""
    per_level = num_res_blocks + 2  # resnets + one upsampler (the last level has no upsampler)
    return index // per_level, (index % per_level if index % per_level <= num_res_blocks else None)


def convert_wan_vae_keys(state_dict: dict[str, torch.Tensor], num_res_blocks: int | None = None
                         ) -> dict[str, torch.Tensor]:
    """Rename an official Wan2.1 VAE state dict to ``AutoencoderKLWan`` names (already-diffusers dicts pass)."""
    if any(k.startswith(("encoder.conv_in", "decoder.conv_in")) for k in state_dict):
        return dict(state_dict)
    if num_res_blocks is None:
        resamples = [int(k.split(".")[2]) for k in state_dict
                     if k.startswith("decoder.upsamples.") and ".resample." in k]
        num_res_blocks = (min(resamples) - 1) if resamples else 2
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = _convert_key(key, num_res_blocks)
        if new is None:
            raise CheckpointError(f"unexpected key '{key}' in the VAE checkpoint: is it Wan2.1_VAE.pth?")
        out[new] = value
    return out


def _convert_key(key: str, nrb: int) -> str | None:
    head, _, rest = key.partition(".")
    if head in _TOP and "." not in rest:
        return f"{_TOP[head]}.{rest}"
    if head not in ("encoder", "decoder"):
        return None
    part, _, rest = rest.partition(".")
    if part == "conv1":
        return f"{head}.conv_in.{rest}"
    if part == "head":
        idx, _, leaf = rest.partition(".")
        return {"0": f"{head}.norm_out.{leaf}", "2": f"{head}.conv_out.{leaf}"}.get(idx)
    if part == "middle":
        idx, _, leaf = rest.partition(".")
        if idx == "1":
            return f"{head}.mid_block.attentions.0.{leaf}" if leaf.split(".")[0] in _MIDDLE_ATTN else None
        sub = _resblock_part(leaf)
        return f"{head}.mid_block.resnets.{int(idx) // 2}.{sub}" if idx in ("0", "2") and sub else None
    idx, _, leaf = rest.partition(".")
    if part == "downsamples" and head == "encoder":
        sub = _resblock_part(leaf)
        return f"encoder.down_blocks.{idx}.{sub or leaf}"
    if part == "upsamples" and head == "decoder":
        block, slot = _decoder_slot(int(idx), nrb)
        if slot is None:
            return f"decoder.up_blocks.{block}.upsamplers.0.{leaf}"
        sub = _resblock_part(leaf)
        return f"decoder.up_blocks.{block}.resnets.{slot}.{sub}" if sub else None
    return None


def load_vae(path: str | Path, kind: str = "wan2.1", dtype: torch.dtype = torch.float32):
    """``AutoencoderKLWan`` from ``Wan2.1_VAE.pth`` (or a ``.safetensors`` of either layout) or a diffusers folder."""
    from diffusers import AutoencoderKLWan

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"VAE not found: {path}; pass Wan2.1_VAE.pth or a diffusers vae/ folder to --vae")
    if path.is_dir():
        folder = component_folder(path, "vae")
        if folder is None:
            raise CheckpointError(f"{path} has no config.json; pass a diffusers vae/ folder or Wan2.1_VAE.pth to --vae")
        return AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=dtype).eval().requires_grad_(False)
    if kind != "wan2.1":
        raise CheckpointError(f"loading the official {kind} VAE file is not supported; pass a diffusers vae/ folder "
                              "(from the model's -Diffusers repo) to --vae")
    sd = convert_wan_vae_keys(read_state_dict(path, "VAE"))
    vae = AutoencoderKLWan()  # the Wan2.1 VAE config is diffusers' default
    load_into(vae, sd, path, "Wan2.1 VAE")
    return vae.to(dtype).eval().requires_grad_(False)


def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=like.dtype, device=like.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=like.dtype, device=like.device).view(shape)
    return mean, std


@torch.no_grad()
def encode_video(vae, video: torch.Tensor) -> torch.Tensor:
    """Pixels ``[1, 3, F, H, W]`` in [-1, 1] -> normalized latents ``(mu - mean) / std`` as the DiT sees them."""
    param = next(vae.parameters())
    mu = vae.encode(video.to(param.device, param.dtype)).latent_dist.mode().float()
    mean, std = _stats(vae, mu)
    return (mu - mean) / std


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalized latents ``[1, z, f, h, w]`` -> pixels ``[1, 3, F, H, W]`` in [-1, 1] (float32, CPU)."""
    param = next(vae.parameters())
    z = latents.to(param.device, torch.float32)
    mean, std = _stats(vae, z)
    video = vae.decode((z * std + mean).to(param.dtype)).sample
    return video.float().clamp_(-1, 1).cpu()
