"""``turbocompile build``: load -> capture -> passes (dumped) -> serialize, into an artifact directory."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import artifact, dumps
from .errors import CheckpointError, UnsupportedShapeError
from .passmanager import PassContext, PassManager
from .program import INPUT_NAMES, Program, capture, export_program
from .targets import Target, get_target, local_target
from .zoo import ModelSpec, get_model

log = logging.getLogger(__name__)

BACKENDS = ("torch", "eager", "aoti", "onnx", "tensorrt")


@dataclass
class BuildOptions:
    model: str
    out: Path
    gpu: str = "cpu"
    checkpoint: Path | None = None
    random_weights: bool = False
    resolution: str | None = None
    aspect: str = "16:9"
    frames: int | None = None
    batch: int = 1
    dtype: str | None = None  # default: bf16 on GPU targets, fp32 on cpu
    passes: list[str] | None = None
    skip_passes: list[str] = field(default_factory=list)
    pass_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    verify: bool = False
    max_drift: float = 0.1
    dynamic_frames: bool = False
    backend: str = "torch"
    force: bool = False
    seed: int = 0


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _build_device(target: Target) -> tuple[torch.device, list[str]]:
    """Where to trace and quantize; builds for a GPU that is not here make the portable parts on the CPU."""
    notes = []
    if not target.is_gpu:
        return torch.device("cpu"), notes
    here = local_target()
    if here.name == target.name:
        return torch.device("cuda"), notes
    notes.append(f"built on {here.name} for {target.name}: the graph, weights and dumps are portable; the Triton "
                 f"kernels compile and autotune on the first run on the {target.name} GPU, and --verify "
                 "numerics used the reference implementations")
    return torch.device("cpu"), notes


def _load_models(spec: ModelSpec, opts: BuildOptions, device: torch.device, dtype: torch.dtype
                 ) -> tuple[dict[str, Callable[[], torch.nn.Module]], dict[str, dict[str, torch.Tensor]], str]:
    """One loader per expert (random experts are made one at a time, so an A14B build holds one 14B model)."""
    from .modeling import random_dit, random_dit_on_device

    if opts.checkpoint is not None:
        from .checkpoints import load_checkpoint

        loaded = load_checkpoint(opts.checkpoint, spec.id, device=device, dtype=dtype)
        models = loaded.models
        return ({name: (lambda n=name: models.pop(n)) for name in list(models)}, loaded.extras,
                f"checkpoint {opts.checkpoint} ({loaded.layout})")
    if spec.embedded:  # seeded on the CPU so tests can rebuild the same eager model
        loaders = {name: (lambda i=i: random_dit(spec, seed=opts.seed + i, dtype=dtype, device=device))
                   for i, name in enumerate(spec.experts)}
    elif opts.random_weights:
        loaders = {name: (lambda i=i: random_dit_on_device(spec, device, dtype, seed=opts.seed + i))
                   for i, name in enumerate(spec.experts)}
    else:
        raise CheckpointError(
            f"{spec.id} needs --checkpoint PATH (official, diffusers or TurboDiffusion layout; nothing is "
            "downloaded), or --random-weights to build with random weights at the real shapes"
        )
    return loaders, {name: {} for name in spec.experts}, f"random weights (seed {opts.seed})"


def build(opts: BuildOptions, progress: Callable[[str], None] | None = None) -> Path:
    """Build an artifact; returns its path. Nothing is left behind on failure."""
    spec = get_model(opts.model)
    target = get_target(opts.gpu)
    if opts.backend not in ("torch", "eager"):
        from .backends import check_backend

        check_backend(opts.backend, target.name)
    res = opts.resolution or spec.default_resolution
    if res not in spec.resolutions:
        raise UnsupportedShapeError(f"{spec.id} supports resolutions {', '.join(spec.resolutions)}, not {res}")
    width, height = spec.pixel_size(res, opts.aspect)
    frames = opts.frames or spec.default_frames
    spec.latent_shape(width, height, frames)  # validates 4k+1 and multiples
    device, notes = _build_device(target)
    dtype = _DTYPES[opts.dtype] if opts.dtype else (torch.bfloat16 if target.is_gpu else torch.float32)
    say = progress or (lambda msg: log.info(msg))

    import turbocompile.kernels as kernels
    from .passes import ONNX_SKIPPED_PASSES, select_passes

    kernels.load_ops()
    passes = select_passes(opts.passes, opts.skip_passes)
    if opts.backend in ("onnx", "tensorrt"):  # their plugins cover the unfused norm and linear ops only
        passes = [p for p in passes if p.name not in ONNX_SKIPPED_PASSES]
    t_start = time.perf_counter()
    with artifact.atomic_directory(opts.out, force=opts.force) as tmp:
        say(f"loading {spec.id}")
        loaders, extras, source = _load_models(spec, opts, device, dtype)
        from .modeling import example_inputs

        expert_info = {}
        svgs = {}
        for name, load_expert in loaders.items():
            model = load_expert()
            say(f"[{name}] capturing with torch.export")
            inputs = example_inputs(spec, width, height, frames, batch=opts.batch, dtype=dtype, device=device)
            prog = capture(model, inputs, dynamic_frames=opts.dynamic_frames)
            del model  # the program now owns the weights
            ctx = PassContext(spec=spec, target=target, options=opts.pass_options, extras=extras.get(name, {}),
                              expert=name)
            pm = PassManager(passes, ctx, inputs, dump_dir=tmp / "dumps" / name, verify=opts.verify,
                             max_rel_l2=opts.max_drift, progress=lambda p, n=name: say(f"[{n}] pass {p}"))
            prog = pm.run(prog)
            svgs[name] = dumps.block_svg(prog)
            say(f"[{name}] serializing program and weights")
            expert_info[name] = _save_expert(prog, inputs, tmp / "experts" / name, opts.dynamic_frames)
            expert_info[name]["passes"] = [
                {"name": r.name, "matched": r.result.matched, "rewritten": r.result.rewritten,
                 "weight_bytes_changed": r.result.weight_bytes_changed, "seconds": round(r.seconds, 3),
                 "numerics": r.numerics.as_dict() if r.numerics else None, "notes": r.result.notes,
                 "extra": r.result.extra}
                for r in pm.records
            ]
            del prog
            if device.type == "cuda":
                torch.cuda.empty_cache()
        dumps.write_index(tmp / "dumps", f"turbocompile build: {spec.id} for {target.name}", svgs)
        manifest = {
            "model": spec.id,
            "dit_config": spec.dit.__dict__,
            "task": spec.task,
            "experts": list(expert_info),
            "boundary": spec.boundary,
            "shapes": {"width": width, "height": height, "frames": frames, "batch": opts.batch,
                       "resolution": res, "aspect": opts.aspect, "dynamic_frames": opts.dynamic_frames,
                       "latent": list(spec.latent_shape(width, height, frames)),
                       "tokens": spec.num_tokens(width, height, frames)},
            "dtype": str(dtype).replace("torch.", ""),
            "target": target.name,
            "built_on": local_target().name,
            "backend": opts.backend,
            "weights_source": source,
            "passes": [p.name for p in passes],
            "pass_options": opts.pass_options,
            "notes": notes,
            "expert_info": expert_info,
            "versions": artifact.versions(),
            "build_seconds": round(time.perf_counter() - t_start, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if opts.backend not in ("torch", "eager"):
            from .backends import lower

            say(f"lowering with the {opts.backend} backend")
            manifest["backend_files"] = lower(opts.backend, tmp, manifest)
        artifact.write_manifest(tmp, manifest)
    for n in notes:
        log.warning(n)
    return Path(opts.out)


def _save_expert(prog: Program, inputs: tuple[torch.Tensor, ...], folder: Path, dynamic_frames: bool = False
                 ) -> dict[str, Any]:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    ep = export_program(prog, inputs, dynamic_frames)
    # the example inputs of this export are every weight plus (x, t, context): saved with the program they
    # would store the model a second time beside weights.safetensors (1.5 GB more for 1.3B, 15 GB per A14B
    # expert, and minutes of build and load). The graph's placeholders keep the shapes and dtypes.
    ep.example_inputs = None
    torch.export.save(ep, str(folder / "program.pt2"))
    order = [n.name for n in prog.weight_placeholders()]
    tensors = {}
    for n in order:
        t = prog.weights[n].detach()
        whole = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        tensors[n] = t if whole else t.contiguous().clone()  # safetensors refuses views and shared storage
    save_file({k: v.cpu() if v.device.type != "cpu" else v for k, v in tensors.items()},
              str(folder / "weights.safetensors"))
    return {
        "weight_order": order,
        "weight_keys": {n: prog.weight_keys.get(n, n) for n in order},
        "inputs": list(INPUT_NAMES),
        "input_shapes": [list(t.shape) for t in inputs],
        "weight_bytes_by_dtype": prog.weight_bytes_by_dtype(),
        "nodes": len(prog.graph.nodes),
    }
