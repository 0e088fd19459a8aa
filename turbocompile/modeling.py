"""Build diffusers' ``WanTransformer3DModel`` for a zoo entry: empty (meta), or filled with random weights.

The DiT definition is diffusers' own; this module only knows how to construct it for a
:class:`~turbocompile.zoo.DiTConfig` and how to give it non-trivial random weights (norm weights,
modulation tables and biases randomized too, so a wrong key mapping shows up in outputs).
"""
from __future__ import annotations

import math

import torch

from .zoo import DiTConfig, ModelSpec


def dit_class():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel


def build_dit(config: DiTConfig, device: str | torch.device = "meta") -> torch.nn.Module:
    """Construct the DiT with uninitialized weights on ``device`` (``meta`` allocates nothing)."""
    cls = dit_class()
    with torch.device(device):
        model = cls(**config.diffusers_kwargs())
    return model.eval().requires_grad_(False)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter with seeded random values of a sensible scale.

    Matrices get ``N(0, 1/fan_in)``; vectors (norm weights, biases) get ``1 + 0.1·N`` or ``0.1·N`` so
    a swapped norm or a dropped bias changes the output; modulation tables get ``N(0, 1/dim)``.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.is_meta:
            raise ValueError("randomize_ needs a materialized model (use build_dit(..., device='cpu'))")
        if p.ndim >= 2 and "scale_shift_table" not in name:
            fan_in = p[0].numel()
            val = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
        elif "scale_shift_table" in name:
            val = torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1])
        elif "norm" in name and name.endswith("weight"):
            val = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        else:
            val = 0.1 * torch.randn(p.shape, generator=gen)
        p.copy_(val.to(p.dtype))
    return model


def random_dit(spec: ModelSpec | DiTConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> torch.nn.Module:
    """A materialized DiT with seeded random weights (what ``wan-tiny`` and the tests use)."""
    config = spec.dit if isinstance(spec, ModelSpec) else spec
    model = build_dit(config, device="cpu")
    randomize_(model, seed)
    model.to(device)
    if dtype != torch.float32:
        # as diffusers' from_pretrained(torch_dtype=...) and the checkpoint loader do: its fp32 modules (RoPE
        # tables, time embedder, norms, modulation tables) stay fp32, so the graph is the one a real model gives
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and not keep_fp32(model, name):
                t.data = t.data.to(dtype)
    return model


def keep_fp32(model: torch.nn.Module, key: str) -> bool:
    """True for tensors diffusers keeps in fp32 (``_keep_in_fp32_modules``: rope, time embedder, norms, tables)."""
    names = getattr(model, "_keep_in_fp32_modules", None) or []
    return any(part in names for part in key.split("."))


def example_inputs(spec: ModelSpec, width: int, height: int, frames: int, batch: int = 1,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latent x, timestep t, text context) shaped as the sampler feeds the DiT."""
    gen = torch.Generator().manual_seed(seed)
    _, f, h, w = spec.latent_shape(width, height, frames)
    x = torch.randn(batch, spec.dit.in_channels, f, h, w, generator=gen)
    t = torch.full((batch,), 933.0)
    ctx = torch.randn(batch, spec.text_len, spec.dit.text_dim, generator=gen)
    return x.to(device, dtype), t.to(device), ctx.to(device, dtype)


@torch.no_grad()
def random_dit_on_device(spec: ModelSpec | DiTConfig, device: str | torch.device, dtype: torch.dtype = torch.bfloat16,
                         seed: int = 0) -> torch.nn.Module:
    """Random weights generated directly on ``device`` in ``dtype`` (what benchmarks use for 14B models:
    no fp32 copy on the host). diffusers' fp32 modules (norms, time embedder, modulation tables) stay fp32."""
    config = spec.dit if isinstance(spec, ModelSpec) else spec
    model = build_dit(config, device="meta")
    gen = torch.Generator(device=device).manual_seed(seed)
    for mod_name, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            full = f"{mod_name}.{pname}" if mod_name else pname
            dt = torch.float32 if keep_fp32(model, full) else dtype
            if p.ndim >= 2 and "scale_shift_table" not in full:
                val = torch.randn(p.shape, device=device, generator=gen, dtype=dt) / math.sqrt(p[0].numel())
            elif "scale_shift_table" in full:
                val = torch.randn(p.shape, device=device, generator=gen, dtype=dt) / math.sqrt(p.shape[-1])
            elif "norm" in full and pname == "weight":
                val = 1.0 + 0.1 * torch.randn(p.shape, device=device, generator=gen, dtype=dt)
            else:
                val = 0.1 * torch.randn(p.shape, device=device, generator=gen, dtype=dt)
            setattr(module, pname, torch.nn.Parameter(val, requires_grad=False))
    # Buffers (the RoPE tables) were created on meta: rebuild that module on the device.
    rope = model.rope
    model.rope = type(rope)(model.config.attention_head_dim, model.config.patch_size,
                            model.config.rope_max_seq_len).to(device)
    return model.eval()
