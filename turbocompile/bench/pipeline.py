"""The whole pipeline at real size under a GPU memory cap: build (random weights), load, generate.

Random full-size components stand in for the real ones (umT5-XXL with a hashing tokenizer, the Wan2.1
VAE): the shapes, bytes and FLOPs are the real ones, the video is noise. The cap is enforced with
``torch.cuda.set_per_process_memory_fraction`` so an allocation past it fails, as it would on the
smaller card.
"""
from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

import torch

from ..zoo import ModelSpec
from . import Report, environment

log = logging.getLogger(__name__)


@torch.no_grad()
def _random_on(module_fn, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Construct on meta, then fill every parameter with scaled random values on ``device`` in ``dtype``."""
    with torch.device("meta"):
        module = module_fn()
    gen = torch.Generator(device=device).manual_seed(seed)
    for mod in module.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            fan = p[0].numel() if p.ndim >= 2 else 1
            val = torch.randn(p.shape, device=device, dtype=dtype, generator=gen) / math.sqrt(fan)
            if p.ndim == 1:
                val = 1.0 + 0.1 * val
            setattr(mod, name, torch.nn.Parameter(val, requires_grad=False))
        for name, b in list(mod.named_buffers(recurse=False)):
            if b.is_meta:
                mod.register_buffer(name, torch.zeros(b.shape, device=device, dtype=b.dtype))
    return module.eval()


def random_components(spec: ModelSpec):
    """Full-size random umT5-XXL (bf16, left on the host) and Wan2.1 VAE (bf16)."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    from ..pipeline import PipelineComponents, TextEncoder
    from ..pipeline.tokenizer import HashWordTokenizer

    cfg = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, dropout_rate=0.0)
    enc = _random_on(lambda: UMT5EncoderModel(cfg), "cuda", torch.bfloat16).to("cpu")
    torch.cuda.empty_cache()
    text = TextEncoder(enc, HashWordTokenizer(hash_vocab_size=256384), spec.text_len, "random-umt5-xxl")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKLWan().to(torch.bfloat16).eval().requires_grad_(False)
    return PipelineComponents(text, vae)


def bench_pipeline(spec: ModelSpec, resolution: str, budget_bytes: int | None, artifact: Path | None,
                   compile: bool = True, profile: bool = False) -> Report:
    """Build (unless ``artifact`` holds one), load under the cap and generate one 4-step video; ``compile``
    False runs the rewritten graph without torch.compile (minutes less, a few percent slower per step).
    ``profile``: afterwards, time one warm call of the first expert on GPU events and on the host clock (the
    sampler's step times are host-clock) and list its ops under torch.profiler."""
    import turbocompile
    from ..build import BuildOptions, build
    from ..pipeline import generate
    from ..targets import local_target

    w, h = spec.pixel_size(resolution)
    report = Report(f"pipeline {spec.id}@{resolution} ({w}x{h}x{spec.default_frames}), random weights",
                    environment(False))
    cap = f"{budget_bytes / 2**30:.0f} GiB" if budget_bytes else "the card"
    report.header["command"] = (f"turbocompile bench pipeline --model {spec.id} --resolution {resolution}"
                                + (f" --gpu-memory-budget {cap.replace(' ', '')}" if budget_bytes else ""))
    report.header["GPU memory cap"] = cap
    tmp = None
    built_here = artifact is None or not (artifact / "manifest.json").exists()
    if built_here:
        tmp = tempfile.TemporaryDirectory(prefix="tc-bench-")
        artifact = artifact or Path(tmp.name) / "art"
        t0 = time.perf_counter()
        build(BuildOptions(model=spec.id, out=artifact, gpu=local_target().name, random_weights=True,
                           resolution=resolution))
        report.add("stages", {"stage": "build (random weights, all passes)", "s": time.perf_counter() - t0})
    comps = random_components(spec)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    if budget_bytes:
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total))
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    # an artifact this run just wrote is not re-hashed (30 GB for A14B: minutes of reading it back)
    engine = turbocompile.load(artifact, gpu_memory_budget=budget_bytes, verify_hashes=not built_here,
                               compile=compile)
    report.header["torch.compile"] = "yes (step 1 of each expert includes compiling)" if compile else "no"
    report.add("stages", {"stage": "load (weights to host/GPU" + ("" if built_here else ", sha256 checks") + ")",
                          "s": time.perf_counter() - t0})
    image = None
    if spec.task == "i2v":
        from PIL import Image

        g = torch.Generator().manual_seed(0)
        image = Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
    out = Path(tempfile.mkdtemp(prefix="tc-video-")) / "video.mp4"
    prompt = "a long descriptive english prompt about a cat surfing a wave at sunset " * 3
    # the first video pays the compiles (and encodes the prompt); the second, in the same process, is what a
    # service making many videos sees: compiled programs and the cached prompt embedding are reused
    for section in ("stages", "second video (warm: compiled, prompt cached)"):
        result = generate(engine, prompt, image=image, steps=4, seed=0, out=out, components=comps,
                          gpu_memory_budget=budget_bytes, progress=False)
        for k, v in result.timings.items():
            if isinstance(v, (list, tuple)):
                for i, s in enumerate(v, 1):
                    report.add(section, {"stage": f"{k} {i}", "s": s})
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                report.add(section, {"stage": k, "s": float(v)})
    if profile:
        _profile_expert(engine, spec, report)
    report.add("memory", {"peak allocated GiB": torch.cuda.max_memory_allocated() / 2**30,
                          "peak reserved GiB": torch.cuda.max_memory_reserved() / 2**30, "cap": cap,
                          "experts": ", ".join(getattr(result, "experts", []) or [])})
    if tmp is not None:
        tmp.cleanup()
    return report


def _profile_expert(engine, spec: ModelSpec, report: Report) -> None:
    """One expert of the loaded engine on the sampler's input shapes: GPU-event time, host time per call with a
    sync (what a sampler step sees), and the per-op GPU time table."""
    from ..modeling import example_inputs
    from . import cuda_time
    from .model import _profile

    name = engine.expert_names[0]
    expert = engine.expert(name)
    x, t, c = example_inputs(spec, engine.width, engine.height, engine.frames, dtype=engine.dtype,
                             device=engine.device)
    section = f"one warm call of expert {name!r} (the sampler's shapes)"
    with torch.no_grad():
        gpu_s = cuda_time(lambda: expert(x, t, c), 5, warmup=1)
        host = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            expert(x, t, c)
            torch.cuda.synchronize()
            host.append(time.perf_counter() - t0)
    report.add(section, {"op": "GPU events (back to back)", "ms": gpu_s * 1e3})
    report.add(section, {"op": "host clock, synchronized, median of 5", "ms": sorted(host)[2] * 1e3})
    _profile(lambda: expert(x, t, c), report, section, gpu_s, top=25)
