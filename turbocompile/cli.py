"""The ``turbocompile`` command line: models, build, inspect, generate, convert, bench.

Errors a user can cause print as one red line and exit non-zero; anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import difflib
import json
import logging
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from .errors import TurboCompileError

console = Console()
# Logs going to a file or pipe (CI, the GPU machine) keep long lines whole.
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 240)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _parse_bytes(text: str | None) -> int | None:
    if text is None:
        return None
    t = text.strip().upper().replace("IB", "").replace("B", "")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(float(t))
    except ValueError:
        raise click.BadParameter(f"cannot read '{text}' as a size; use e.g. 32GiB or 24G") from None


class _Group(click.Group):
    """Turns TurboCompileError into one red line and its exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TurboCompileError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]")
            sys.exit(130)
        except Exception as exc:  # torch is imported lazily, so its OOM error is matched by name
            if type(exc).__name__ != "OutOfMemoryError":
                raise
            first = str(exc).split(". ")[0]
            err_console.print(f"[bold red]error:[/] the GPU ran out of memory ({first}); pass --gpu-memory-budget "
                              "with what the card can give (experts are then swapped and the VAE tiled), or use "
                              "a lower resolution or frame count", highlight=False, soft_wrap=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="turbocompile")
def main(verbose: int) -> None:
    """Compile Wan video diffusion transformers into fast engines and sample them with rCM.

    \b
    turbocompile build --model wan-tiny --gpu cpu --out build/wan-tiny
    turbocompile generate build/wan-tiny --prompt "a red fox running through snow" --out fox.mp4
    turbocompile inspect build/wan-tiny
    """
    from rich.logging import RichHandler

    level = logging.WARNING - 10 * min(verbose + 1, 2)
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err_console,
                                                                                show_path=False)])


# -- models --------------------------------------------------------------------------------------

@main.group(invoke_without_command=True)
@click.pass_context
def models(ctx: click.Context) -> None:
    """List the model zoo (`models info ID` for one entry)."""
    if ctx.invoked_subcommand is not None:
        return
    from .zoo import MODELS

    table = Table(title="turbocompile model zoo")
    for col in ("id", "task", "experts", "dim", "layers", "params", "default size", "frames", "sigma_max"):
        table.add_column(col, overflow="fold", no_wrap=col == "id")
    for s in MODELS.values():
        w, h = s.pixel_size()
        table.add_row(s.id, s.task, "+".join(s.experts), str(s.dit.dim), str(s.dit.num_layers),
                      f"{s.dit.num_params() / 1e9:.2f} B", f"{w}x{h} ({s.default_resolution})",
                      str(s.default_frames), f"{s.sigma_max:g}")
    console.print(table)


@models.command("info")
@click.argument("model_id")
def models_info(model_id: str) -> None:
    """Config, experts, weight memory per precision and token counts of one model."""
    from .zoo import RESOLUTIONS, get_model, weight_bytes

    s = get_model(model_id)
    d = s.dit
    console.print(f"[bold]{s.id}[/]: {s.description}")
    console.print(f"  task {s.task}; experts: {', '.join(s.experts)}"
                  + (f" (switch to low-noise below t = {s.boundary})" if s.boundary else ""))
    console.print(f"  DiT: dim {d.dim}, ffn {d.ffn_dim}, {d.num_heads} heads x {d.head_dim}, {d.num_layers} layers, "
                  f"in {d.in_channels} / out {d.out_channels} channels, text dim {d.text_dim}"
                  + (f", CLIP image dim {d.image_dim}" if d.image_dim else ""))
    console.print(f"  parameters per expert: {d.num_params():,}")
    console.print(f"  VAE {s.vae} (stride {s.vae_stride}), text encoder {s.text_encoder} ({s.text_len} tokens), "
                  f"{s.default_frames} frames at {s.fps} fps")
    console.print(f"  rCM sigma_max {s.sigma_max:g}; original sampler: {s.original_steps} steps, shift "
                  f"{s.sample_shift:g}, guidance {s.guide_scale:g}")
    t = Table(title="weight memory per expert")
    t.add_column("precision")
    t.add_column("bytes")
    for p in ("fp32", "bf16", "int8", "fp8"):
        t.add_row(p + (" (block linears; rest bf16)" if p in ("int8", "fp8") else ""),
                  _human_bytes(weight_bytes(s, p)))
    console.print(t)
    t = Table(title=f"tokens per resolution ({s.default_frames} frames)")
    for col in ("resolution", "aspect", "size", "latent", "tokens"):
        t.add_column(col)
    for r in s.resolutions:
        for a, (w, h) in RESOLUTIONS[r].items():
            try:
                lat = s.latent_shape(w, h, s.default_frames)
            except TurboCompileError:
                continue
            t.add_row(r, a, f"{w}x{h}", "x".join(map(str, lat)), f"{s.num_tokens(w, h, s.default_frames):,}")
    console.print(t)


# -- build ---------------------------------------------------------------------------------------

@main.command()
@click.option("--model", "model_id", required=True, help="Zoo id (see `turbocompile models`).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Official / diffusers / TurboDiffusion checkpoint (file or folder). Not needed for wan-tiny.")
@click.option("--random-weights", is_flag=True, help="Random weights at the real shapes (benchmarks).")
@click.option("--gpu", default="cpu", show_default=True,
              help="Target: sm_80, sm_89, sm_90, sm_100, sm_120 or cpu.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Artifact directory to create.")
@click.option("--resolution", default=None, help="480p, 720p, ... (default: the model's).")
@click.option("--aspect", default="16:9", show_default=True)
@click.option("--frames", type=int, default=None, help="Pixel frames, 4k+1 (default: the model's).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="Model dtype (default: bf16 on GPU targets, fp32 on cpu).")
@click.option("--passes", default=None, help="Comma-separated pass list (default: all).")
@click.option("--skip-pass", multiple=True, help="Skip a pass (repeatable).")
@click.option("--pass-option", multiple=True, help="PASS.OPTION=VALUE, e.g. sla.topk=0.15 (repeatable).")
@click.option("--attention", type=click.Choice(["sagesla", "sage", "sla", "sdpa"]), default=None,
              help="Self-attention method (short for --pass-option sla.method=...).")
@click.option("--topk", type=float, default=None, help="SLA top-k fraction (short for sla.topk).")
@click.option("--linear", type=click.Choice(["auto", "int8-block", "int8-row", "fp8-row", "fp8-block", "bf16"]),
              default=None, help="W8A8 scheme (short for w8a8.scheme).")
@click.option("--verify", is_flag=True, help="Measure each pass's numeric drift on a probe input.")
@click.option("--max-drift", type=float, default=0.1, show_default=True,
              help="Fail the build when a pass changes the output by more than this relative L2.")
@click.option("--dynamic-frames", is_flag=True, help="Export with a symbolic latent-frame dimension.")
@click.option("--backend", type=click.Choice(["torch", "eager", "aoti", "onnx", "tensorrt"]), default="torch",
              show_default=True, help="Lowering backend.")
@click.option("--force", is_flag=True, help="Replace an existing --out directory.")
def build(model_id, checkpoint, random_weights, gpu, out, resolution, aspect, frames, dtype, passes, skip_pass,
          pass_option, attention, topk, linear, verify, max_drift, dynamic_frames, backend, force) -> None:
    """Load, capture, rewrite (dumping every pass) and serialize a model into an artifact directory."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .build import BuildOptions, build as run_build
    from .passes import parse_pass_options

    options = list(pass_option)
    if attention:
        options.append(f"sla.method={attention}")
    if topk is not None:
        options.append(f"sla.topk={topk}")
    if linear:
        options.append(f"w8a8.scheme={linear}")
    opts = BuildOptions(model=model_id, out=out, gpu=gpu, checkpoint=checkpoint, random_weights=random_weights,
                        resolution=resolution, aspect=aspect, frames=frames, dtype=dtype,
                        passes=[p for p in passes.split(",") if p] if passes else None,
                        skip_passes=list(skip_pass), pass_options=parse_pass_options(options), verify=verify,
                        max_drift=max_drift, dynamic_frames=dynamic_frames, backend=backend, force=force)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        task = progress.add_task("building", total=None)
        path = run_build(opts, progress=lambda msg: progress.update(task, description=msg))
    console.print(f"[green]built[/] {path}")
    _print_stage_table(path)
    console.print(f"dumps: {path / 'dumps' / 'index.html'}")


# -- inspect -------------------------------------------------------------------------------------

def _expert_dirs(root: Path, expert: str | None) -> list[Path]:
    base = root / "dumps"
    dirs = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if expert:
        dirs = [d for d in dirs if d.name == expert]
        if not dirs:
            raise TurboCompileError(f"{root} has no dumps for expert '{expert}'")
    return dirs


def _print_stage_table(root: Path, expert: str | None = None) -> None:
    from .dumps import read_stages

    for d in _expert_dirs(root, expert):
        t = Table(title=f"passes ({d.name})")
        for col in ("#", "pass", "nodes", "matched", "rewritten", "weights changed", "rel L2", "cosine", "time"):
            t.add_column(col, overflow="fold", no_wrap=col == "pass")
        for s in read_stages(d):
            num = s.get("numerics") or {}
            t.add_row(str(s["index"]), s["pass"], str(s["nodes"]), str(s["matched"]), str(s["rewritten"]),
                      _human_bytes(s["weight_bytes_changed"]),
                      f"{num['rel_l2']:.2e}" if num else "-", f"{num['cosine']:.6f}" if num else "-",
                      f"{s['seconds']:.2f}s")
        console.print(t)


def _find_stage(expert_dir: Path, name: str) -> Path:
    for d in sorted(expert_dir.iterdir()):
        if d.is_dir() and (d.name == name or d.name.split("_", 1)[-1] == name or d.name.split("_", 1)[0] == name):
            return d
    known = ", ".join(d.name for d in sorted(expert_dir.iterdir()) if d.is_dir())
    raise TurboCompileError(f"no stage '{name}' in {expert_dir}; stages: {known}")


@main.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--pass", "pass_name", default=None, help="Print one stage's graph (name or number).")
@click.option("--diff", nargs=2, default=None, help="Diff two stages' graphs: --diff capture fuse_norms.")
@click.option("--expert", default=None, help="Which expert (default: all / the first).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable per-pass summaries.")
@click.option("--code", is_flag=True, help="With --pass: print the Python code instead of the graph.")
def inspect(artifact_dir: Path, pass_name, diff, expert, as_json, code) -> None:
    """Show the per-pass table of a build and open any stage."""
    from .artifact import read_manifest
    from .dumps import read_stages

    manifest = read_manifest(artifact_dir, verify_hashes=False)
    dirs = _expert_dirs(artifact_dir, expert)
    if as_json:
        out = {"manifest": {k: manifest[k] for k in ("model", "target", "shapes", "passes", "pass_options",
                                                      "backend", "versions")},
               "experts": {d.name: read_stages(d) for d in dirs}}
        click.echo(json.dumps(out, indent=2, default=str))
        return
    if pass_name:
        stage = _find_stage(dirs[0], pass_name)
        click.echo((stage / ("code.py" if code else "graph.txt")).read_text())
        return
    if diff:
        a, b = (_find_stage(dirs[0], n) for n in diff)
        text = difflib.unified_diff((a / "graph.txt").read_text().splitlines(True),
                                    (b / "graph.txt").read_text().splitlines(True), a.name, b.name, n=1)
        click.echo("".join(text))
        return
    console.print(f"[bold]{manifest['model']}[/] for {manifest['target']} ({manifest['dtype']}), "
                  f"{manifest['shapes']['width']}x{manifest['shapes']['height']}x{manifest['shapes']['frames']} "
                  f"= {manifest['shapes']['tokens']:,} tokens, backend {manifest['backend']}, "
                  f"weights: {manifest['weights_source']}")
    _print_stage_table(artifact_dir, expert)
    for note in manifest.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")


# -- generate ------------------------------------------------------------------------------------

@main.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--prompt", required=True)
@click.option("--image", type=click.Path(path_type=Path), default=None, help="First frame (I2V models).")
@click.option("--frames", type=int, default=None,
              help="Pixel frames (4k+1); default the build's. Other values need a --dynamic-frames build.")
@click.option("--steps", type=int, default=None,
              help="rCM steps, 1-4 (default 4); for --sampler unipc the model's original count (e.g. 50).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sigma-max", type=float, default=None, help="rCM sigma_max (default: the model's).")
@click.option("--ode", is_flag=True, help="Deterministic rCM update instead of re-noising.")
@click.option("--sampler", type=click.Choice(["rcm", "unipc"]), default="rcm", show_default=True,
              help="rcm: few-step, no CFG. unipc: the original Wan sampler (flow-shift UniPC with CFG).")
@click.option("--guidance-scale", type=float, default=None, help="CFG scale for --sampler unipc.")
@click.option("--negative-prompt", default=None, help="For --sampler unipc.")
@click.option("--text-encoder", type=click.Path(path_type=Path), default=None,
              help="umT5 weights: models_t5_umt5-xxl-enc-bf16.pth or a diffusers text_encoder/ folder.")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None, help="google/umt5-xxl tokenizer folder.")
@click.option("--vae", type=click.Path(path_type=Path), default=None,
              help="Wan2.1_VAE.pth or a diffusers vae/ folder.")
@click.option("--gpu-memory-budget", default=None, help="Peak GPU memory to stay under, e.g. 32GiB.")
@click.option("--adaptive-resolution", is_flag=True, help="I2V: accept an image of another size (resized).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("video.mp4"), show_default=True)
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the artifact's files.")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None,
              help="Replay each forward as a CUDA graph. Default: on where it can work (a compiled static-shape "
              "artifact on CUDA with every expert resident); --cuda-graphs requires it, --no-cuda-graphs turns "
              "it off.")
@click.option("--dense-steps", type=int, default=0, show_default=True,
              help="rCM: run the first N steps with dense attention instead of SageSLA (quality knob).")
def generate(artifact_dir, prompt, image, frames, steps, seed, sigma_max, ode, sampler, guidance_scale, negative_prompt,
             text_encoder, tokenizer, vae, gpu_memory_budget, adaptive_resolution, out, no_verify,
             cuda_graphs, dense_steps) -> None:
    """Sample a video from a built artifact and write an .mp4."""
    import turbocompile
    from .pipeline import generate as run_generate, load_components

    budget = _parse_bytes(gpu_memory_budget)
    engine = turbocompile.load(artifact_dir, verify_hashes=not no_verify, gpu_memory_budget=budget,
                               cuda_graphs=cuda_graphs)
    components = load_components(engine.spec, text_encoder_path=text_encoder, tokenizer_path=tokenizer,
                                 vae_path=vae, device=engine.device)
    result = run_generate(engine, prompt, image=image, steps=steps, seed=seed, sigma_max=sigma_max, ode=ode,
                          sampler="original" if sampler == "unipc" else sampler,
                          guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                          out=out, components=components, gpu_memory_budget=budget,
                          adaptive_resolution=adaptive_resolution, frames=frames, dense_steps=dense_steps)
    console.print(f"[green]wrote[/] {result.path}")
    t = Table(title="timings")
    t.add_column("stage")
    t.add_column("seconds", justify="right")
    for k, v in result.timings.items():
        if isinstance(v, bool):
            t.add_row(k, "yes" if v else "no")
        elif isinstance(v, (list, tuple)):
            for i, s in enumerate(v, 1):
                t.add_row(f"{k} {i}", f"{s:.3f}")
        else:
            t.add_row(k, f"{v:.3f}")
    console.print(t)
    peak = getattr(result, "peak_memory_bytes", None)
    if peak:
        console.print(f"peak GPU memory: {_human_bytes(peak)}")


# -- convert -------------------------------------------------------------------------------------

@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--to", "to", type=click.Choice(["diffusers", "official"]), required=True)
@click.option("--model", "model_id", default=None, help="Zoo id, when the checkpoint carries no config.")
def convert(src: Path, dst: Path, to: str, model_id: str | None) -> None:
    """Write a checkpoint in the other layout (official <-> diffusers; TurboDiffusion .pth as a source)."""
    from .checkpoints import convert_checkpoint

    path = convert_checkpoint(src, dst, to=to, model_id=model_id)
    console.print(f"[green]wrote[/] {path}")


# -- bench ---------------------------------------------------------------------------------------

@main.command()
@click.argument("what", type=click.Choice(["kernels", "model", "e2e", "pipeline"]))
@click.option("--model", "model_id", default="wan2.1-t2v-1.3b", show_default=True)
@click.option("--resolution", default=None)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write results as JSON.")
@click.option("--markdown", "md_out", type=click.Path(path_type=Path), default=None, help="Write a markdown table.")
@click.option("--repeats", type=int, default=5, show_default=True)
@click.option("--dry-run", is_flag=True, help="Check the plan on the CPU without timing anything.")
@click.option("--no-compile", is_flag=True,
              help="model/e2e: leave out the torch.compile rung; pipeline: run the engine uncompiled.")
@click.option("--cuda-graphs", is_flag=True, help="After the compiled rung, add one compiled with mode=reduce-overhead (CUDA-graph replay).")
@click.option("--profile", is_flag=True, help="model/e2e: per-op GPU time of the accelerated forward; pipeline: "
              "GPU and host time of one warm expert call and its per-op GPU time.")
@click.option("--gpu-memory-budget", default=None, help="pipeline: cap GPU memory, e.g. 32GiB.")
@click.option("--artifact", type=click.Path(path_type=Path), default=None,
              help="pipeline: reuse (or keep) this artifact instead of a temporary build.")
@click.option("--skip-pass", multiple=True,
              help="model: leave this pass out of the ladder (fuse_norms, fuse_norm_rope, fuse_projections, "
              "linear_to_w8a8, fuse_norm_quant, fuse_gelu, fuse_residual); "
              "repeatable.")
@click.option("--final-only", is_flag=True,
              help="model: time only the eager model, the program after every pass and the compiled rungs (the "
              "passes in between run untimed).")
def bench(what, model_id, resolution, json_out, md_out, repeats, dry_run, no_compile, cuda_graphs, profile,
          gpu_memory_budget, artifact, skip_pass, final_only) -> None:
    """Measure kernels, one DiT forward (incremental ladder), whole-video DiT time against the original
    sampler, or the whole pipeline under a memory cap."""
    from . import bench as bench_mod
    from .bench import run_bench

    bench_mod.AUTOSAVE[0] = json_out
    report = run_bench(what, model_id=model_id, resolution=resolution, repeats=repeats, dry_run=dry_run,
                       compile=False if no_compile else ("reduce-overhead" if cuda_graphs else True),
                       gpu_memory_budget=_parse_bytes(gpu_memory_budget),
                       artifact=artifact, profile=profile, skip_passes=tuple(skip_pass), final_only=final_only)
    click.echo(report.markdown())
    if json_out:
        json_out.write_text(json.dumps(report.as_dict(), indent=2, default=str))
    if md_out:
        md_out.write_text(report.markdown())


if __name__ == "__main__":  # pragma: no cover
    main()
