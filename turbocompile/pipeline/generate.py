"""``generate()``: prompt (+ image) -> .mp4, end to end, around an :class:`~turbocompile.engine.Engine`.

Order of work and where each component lives, so the peak GPU memory stays within a budget:

1. the text encoder moves to the GPU (if it fits the budget, else it runs on the CPU), encodes the prompt
   (and the negative prompt for the original sampler), and goes back to the host;
2. I2V only: the VAE moves to the GPU, encodes the conditioning image, and goes back;
3. the sampler drives the engine's experts (the engine manages their residency and the expert switch);
   the experts are released afterwards;
4. the VAE moves to the GPU and decodes, tiled (diffusers' ``enable_tiling``) when the estimated decode
   memory does not fit the budget; the frames are written to an .mp4 atomically.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ..engine import Engine
from ..errors import InputError, UnsupportedShapeError
from ..sampling import WAN_NEGATIVE_PROMPT, check_dense_steps, check_rcm_steps, sample_original, sample_rcm
from .components import PipelineComponents, load_components
from .conditioning import check_image_size, i2v_condition, load_image
from .vae import decode_latents
from .video import require_ffmpeg, to_uint8_frames, write_mp4

log = logging.getLogger(__name__)

SAMPLERS = ("rcm", "original")


@dataclass
class GenerateResult:
    """What :func:`generate` made and how long each part took."""

    path: Path
    frames: torch.Tensor  # [F, H, W, 3] uint8, as written
    timings: dict[str, Any] = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    experts: list[str] = field(default_factory=list)  # expert used at each step
    sampler: str = "rcm"
    steps: int = 4
    seed: int = 0

    def summary(self) -> str:
        """One line for the CLI: the time of each stage and the peak GPU memory."""
        t = self.timings
        per_step = t.get("steps_s", [])
        parts = [f"text encoder {t.get('text_encode_s', 0.0):.2f} s"]
        if "vae_encode_s" in t:
            parts.append(f"image encode {t['vae_encode_s']:.2f} s")
        mean = sum(per_step) / len(per_step) if per_step else 0.0
        parts.append(f"{self.sampler} {len(per_step)} steps {t.get('sample_s', 0.0):.2f} s ({mean:.3f} s/step)")
        parts.append(f"VAE decode {t.get('vae_decode_s', 0.0):.2f} s")
        parts.append(f"total {t.get('total_s', 0.0):.2f} s")
        if self.peak_memory_bytes is not None:
            parts.append(f"peak GPU {self.peak_memory_bytes / 2**30:.2f} GiB")
        return " | ".join(parts)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _resident(module: Any, device: torch.device, home: torch.device) -> Iterator[None]:
    """Run a block with ``module`` on ``device``, then send it back ``home`` (frees the GPU for the next stage)."""
    module.to(device)
    try:
        yield
    finally:
        if device != home:
            module.to(home)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def vae_decode_bytes(vae: torch.nn.Module, width: int, height: int) -> int:
    """Rough peak activation bytes of an untiled decode: diffusers decodes one latent frame (4 pixel frames)
    at a time; the widest full-resolution stage has ``4 * base_dim`` channels, counted 4 times (input, output,
    causal cache, padding). A heuristic to decide on tiling, not a measurement."""
    elem = next(vae.parameters()).element_size()
    return 4 * width * height * 4 * int(vae.config.base_dim) * elem * 4


class _Progress:
    """A rich progress bar over the sampling steps (or nothing when ``enabled`` is false)."""

    def __init__(self, enabled: bool, total: int, label: str):
        self._bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), transient=False)
            self._task = self._bar.add_task(label, total=total)

    def __enter__(self) -> "_Progress":
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def advance(self, description: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=description)


def _validate(engine: Engine, image: Any, sampler: str, steps: int | None, frames: int | None) -> int:
    spec = engine.spec
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}")
    if sampler == "rcm":
        steps = 4 if steps is None else steps
        check_rcm_steps(steps)
    else:
        steps = spec.original_steps if steps is None else steps
        if not isinstance(steps, int) or steps < 1:
            raise InputError(f"--steps must be a positive integer, got {steps}")
    st = spec.vae_stride[0]
    if frames is not None and (frames < 1 or (frames - 1) % st):
        raise UnsupportedShapeError(f"frames must be of the form {st}k+1 (e.g. 81, 49, 17), got {frames}")
    spec.latent_shape(engine.width, engine.height, engine.frames)  # raises for a bad engine shape
    if spec.dit.image_dim:
        raise InputError(f"{spec.id} conditions on CLIP image features, which this pipeline does not compute; "
                         "use wan2.2-i2v-a14b for image-to-video")
    if spec.task == "i2v" and image is None:
        raise InputError(f"{spec.id} is an image-to-video model: pass --image")
    if spec.task == "t2v" and image is not None:
        raise InputError(f"{spec.id} is a text-to-video model and takes no image; drop --image or use an I2V model")
    if spec.task == "ti2v" and image is not None:
        raise InputError(f"image conditioning for {spec.id} (TI2V) is not supported yet; drop --image for text-to-video")
    return steps


def generate(engine: Engine, prompt: str, *, image: Any = None, steps: int | None = None, seed: int = 0,
             sigma_max: float | None = None, ode: bool = False, sampler: str = "rcm",
             guidance_scale: float | None = None, negative_prompt: str | None = None,
             out: str | Path = "video.mp4", components: PipelineComponents | None = None,
             gpu_memory_budget: int | None = None, progress: bool = True, frames: int | None = None,
             adaptive_resolution: bool = False, fps: int | None = None, quality: float = 8.0,
             dense_steps: int = 0) -> GenerateResult:
    """Make one video from ``prompt`` (and ``image`` for I2V models) and write it to ``out`` (.mp4).

    ``steps`` defaults to 4 for rCM and ``spec.original_steps`` for ``sampler="original"``; ``sigma_max`` and
    ``ode`` apply to rCM, ``guidance_scale``/``negative_prompt`` to the original sampler (rCM has no CFG).
    ``components`` come from :func:`load_components`; for the embedded tiny models they are built when
    omitted. ``gpu_memory_budget`` (bytes, default: the whole card) bounds the text encoder / VAE placement.
    ``dense_steps`` (rCM): the first N steps run with dense attention instead of the built SageSLA.
    Raises :class:`InputError` / :class:`UnsupportedShapeError` with one-line messages for bad inputs,
    before any expensive work.
    """
    t_start = time.perf_counter()
    spec, device = engine.spec, torch.device(engine.device)
    steps = _validate(engine, image, sampler, steps, frames)
    if dense_steps and sampler != "rcm":
        raise InputError("--dense-steps applies to the rCM sampler; drop it for --sampler unipc")
    check_dense_steps(engine, steps, dense_steps)
    if frames is not None and frames != engine.frames:
        if not hasattr(engine, "with_frames"):
            raise UnsupportedShapeError(f"this engine was built for {engine.frames} frames, not {frames}; "
                                        f"build one with --frames {frames}")
        engine = engine.with_frames(frames)  # raises unless the program has dynamic frames
    out = Path(out)
    if out.suffix.lower() != ".mp4":
        raise InputError(f"the output must be an .mp4 file, got {out}")
    if not out.parent.exists():
        raise InputError(f"the output folder {out.parent} does not exist; create it or pass another --out")
    require_ffmpeg()  # before any sampling, not after it
    pil_image = None
    if image is not None:
        pil_image = load_image(image)
        check_image_size(pil_image.width, pil_image.height, engine.width, engine.height, adaptive_resolution)
    if sampler == "rcm" and (guidance_scale is not None or negative_prompt is not None):
        log.warning("rCM samples without classifier-free guidance: guidance_scale/negative_prompt are ignored")
    if components is None:
        components = load_components(spec)
    encoder = components.text_encoder
    encoder.check_prompt(prompt)

    cuda = device.type == "cuda"
    home = torch.device("cpu")
    budget = gpu_memory_budget
    if cuda:
        budget = budget or torch.cuda.get_device_properties(device).total_memory
        torch.cuda.reset_peak_memory_stats(device)
    timings: dict[str, Any] = {}

    # 1. text
    t0 = time.perf_counter()
    # what the engine already holds on the GPU (resident experts) counts against the budget
    te_room = budget - torch.cuda.memory_allocated(device) if cuda else 0
    te_device = device if (not cuda or encoder.num_bytes() <= te_room) else home
    if te_device != device:
        log.info("the text encoder (%.1f GB) does not fit the %.1f GB left of the GPU budget: encoding on the CPU",
                 encoder.num_bytes() / 1e9, te_room / 1e9)
    use_cfg = sampler == "original" and (spec.guide_scale if guidance_scale is None else guidance_scale) > 1.0
    neg_prompt = negative_prompt or WAN_NEGATIVE_PROMPT
    all_cached = encoder.cached(prompt) is not None and (not use_cfg or encoder.cached(neg_prompt) is not None)
    # a cached prompt skips the encoder, and with it the (11 GB for umT5-XXL) trip to the GPU and back
    with contextlib.nullcontext() if all_cached else _resident(encoder, te_device, home):
        context = encoder.encode(prompt)
        negative = encoder.encode(neg_prompt, truncate=True) if use_cfg else None
    timings["text_encode_s"] = time.perf_counter() - t0

    # 2. image conditioning
    condition = None
    if pil_image is not None:
        t0 = time.perf_counter()
        with _resident(components.vae, device, home):
            condition = i2v_condition(components.vae, pil_image, spec, engine.width, engine.height, engine.frames,
                                      adaptive_resolution).cpu()
        timings["vae_encode_s"] = time.perf_counter() - t0

    # 3. sampling
    step_times: list[float] = []
    experts: list[str] = []
    label = f"{sampler} sampling"
    with _Progress(progress, steps, label) as bar:
        last = [time.perf_counter()]

        def on_step(i: int, n: int, t: float, expert: str) -> None:
            _sync(device)
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now
            experts.append(expert)
            bar.advance(f"{label} (t={t:.3f}, {expert})")

        t0 = time.perf_counter()
        if sampler == "rcm":
            latents = sample_rcm(engine, context, condition=condition, steps=steps, sigma_max=sigma_max, ode=ode,
                                 seed=seed, on_step=on_step, dense_steps=dense_steps)
        else:
            latents = sample_original(engine, context, negative, condition=condition, steps=steps,
                                      guidance_scale=guidance_scale, seed=seed, on_step=on_step)
        _sync(device)
        timings["sample_s"] = time.perf_counter() - t0
    timings["steps_s"] = step_times
    for name in engine.expert_names:
        engine.release(name)

    # 4. decode and write
    t0 = time.perf_counter()
    vae = components.vae
    tiled = False
    if cuda:
        free = budget - torch.cuda.memory_allocated(device) - components.vae_bytes()
        tiled = vae_decode_bytes(vae, engine.width, engine.height) > free
    if tiled and hasattr(vae, "enable_tiling"):
        log.info("decoding tiled to stay within the GPU memory budget")
        vae.enable_tiling()
    try:
        with _resident(vae, device, home):
            video = decode_latents(vae, latents)
    finally:
        if tiled and hasattr(vae, "disable_tiling"):
            vae.disable_tiling()
    _sync(device)
    timings["vae_decode_s"] = time.perf_counter() - t0
    timings["vae_tiled"] = tiled
    t0 = time.perf_counter()
    frames_u8 = to_uint8_frames(video)
    path = write_mp4(frames_u8, out, fps or spec.fps, quality)
    timings["write_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return GenerateResult(path=path, frames=torch.from_numpy(frames_u8), timings=timings, peak_memory_bytes=peak,
                          experts=experts, sampler=sampler, steps=steps, seed=seed)
