"""The components around the DiT: text encoder (+ tokenizer) and VAE, real or tiny.

Real models load from the user's files (official Wan files or diffusers folders). The embedded
``wan-tiny`` models (``spec.text_encoder == "tiny"``, ``spec.vae == "tiny"``) get tiny *random*, seeded
components instead: a 2-layer UMT5 with ``d_model = spec.dit.text_dim`` and the offline
:class:`~turbocompile.pipeline.tokenizer.HashWordTokenizer`, and a small ``AutoencoderKLWan`` with the
Wan2.1 layout (z_dim 16, strides 4x8x8). They produce a real, playable (if meaningless) video with no
download.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..zoo import ModelSpec
from .text_encoder import TextEncoder, load_tokenizer, load_umt5

log = logging.getLogger(__name__)

TINY_VOCAB = 4096


@dataclass
class PipelineComponents:
    """Text encoder (with its tokenizer and prompt cache) and VAE for one model family."""

    text_encoder: TextEncoder
    vae: torch.nn.Module

    def vae_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.vae.parameters())


def tiny_text_encoder(spec: ModelSpec, seed: int = 0, cache_dir: str | Path | None = None) -> TextEncoder:
    """A seeded random 2-layer UMT5 (d_model = the DiT's text_dim) with the hashing tokenizer."""
    from transformers import UMT5Config, UMT5EncoderModel

    from .tokenizer import HashWordTokenizer

    d = spec.dit.text_dim
    config = UMT5Config(vocab_size=TINY_VOCAB, d_model=d, d_kv=d // 4, d_ff=2 * d, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=32, relative_attention_max_distance=128,
                        feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False,
                        use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config)
    model.eval().requires_grad_(False)
    return TextEncoder(model, HashWordTokenizer(hash_vocab_size=TINY_VOCAB), spec.text_len,
                       f"tiny-umt5/{spec.id}/seed{seed}", cache_dir)


def tiny_vae(seed: int = 0) -> torch.nn.Module:
    """A seeded random ``AutoencoderKLWan`` with the Wan2.1 layout at base_dim 8 (about 0.7 M parameters)."""
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
    return vae.eval().requires_grad_(False)


def load_components(spec: ModelSpec, text_encoder_path: str | Path | None = None,
                    tokenizer_path: str | Path | None = None, vae_path: str | Path | None = None,
                    device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
                    seed: int = 0, vae_dtype: torch.dtype = torch.float32) -> PipelineComponents:
    """Build (tiny models) or load (real models) the text encoder and VAE; they rest on ``device``.

    ``cache_dir`` enables the on-disk prompt-embedding cache. ``vae_dtype`` is float32 by default (Wan's
    own VAE precision); bfloat16 halves the decode memory (TurboDiffusion decodes in bf16).
    Missing paths for a real model raise a one-line :class:`InputError` naming the flag to pass.
    """
    if spec.text_encoder == "tiny":
        encoder = tiny_text_encoder(spec, seed, cache_dir)
    else:
        if text_encoder_path is None:
            raise InputError(f"{spec.id} needs the umT5-XXL text encoder: pass --text-encoder "
                             "models_t5_umt5-xxl-enc-bf16.pth (or a diffusers text_encoder/ folder)")
        te_path = Path(text_encoder_path)
        if tokenizer_path is None:
            sibling = te_path.parent / "tokenizer" if te_path.is_dir() else None
            if te_path.is_dir() and (te_path / "tokenizer").is_dir():
                tokenizer_path = te_path / "tokenizer"
            elif sibling is not None and sibling.is_dir():
                tokenizer_path = sibling
            else:
                raise InputError(f"{spec.id} needs the umT5 tokenizer: pass --tokenizer with the google/umt5-xxl "
                                 "tokenizer folder")
        model = load_umt5(te_path, dtype=torch.bfloat16)
        stat = te_path.stat()
        encoder = TextEncoder(model, load_tokenizer(tokenizer_path), spec.text_len,
                              f"umt5/{te_path.resolve()}/{stat.st_size}", cache_dir)
    if spec.vae == "tiny":
        vae = tiny_vae(seed)
    else:
        if vae_path is None:
            hint = "Wan2.1_VAE.pth" if spec.vae == "wan2.1" else "the model's diffusers vae/ folder"
            raise InputError(f"{spec.id} needs its VAE: pass --vae {hint}")
        from .vae import load_vae

        vae = load_vae(vae_path, spec.vae, dtype=vae_dtype)
    encoder.to(device)
    vae.to(device)
    return PipelineComponents(encoder, vae)
