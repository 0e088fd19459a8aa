"""One DiT forward at real size as an incremental ladder, and whole-video DiT time (original vs rCM).

Ladder rungs, each timed on the same input and compared (cosine) with the diffusers eager bf16 output:
diffusers eager bf16 -> captured graph (clean-up passes) -> + fused norms -> + fused q/k/v projections -> + W8A8
-> + fp8 input written by the norms -> + SageSLA -> + torch.compile (the ``torch`` backend). Passes are applied
incrementally to one program, so each rung adds exactly one optimization.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ..runtime import mark_weights_static
from ..zoo import ModelSpec
from . import Report, cuda_time, environment, rel_err

log = logging.getLogger(__name__)

#: The ladder's optional passes in the order it applies them, each with the rung it adds; ``bench model
#: --skip-pass`` can leave any of them out (the A/B of one optimization).
PASS_RUNGS: dict[str, str] = {
    "fuse_norms": "+ fused norms", "fuse_norm_rope": "+ RoPE written by the q/k norms",
    "fuse_projections": "+ fused q/k/v projections", "linear_to_w8a8": "+ W8A8 (auto scheme)",
    "fuse_norm_quant": "+ fp8 input written by the norms", "fuse_gelu": "+ GELU in the FFN GEMM's epilogue",
    "fuse_residual": "+ residual steps in the GEMMs' epilogues",
}
RUNGS = ["diffusers eager bf16", "captured graph (clean-up passes)", *PASS_RUNGS.values(), "+ SageSLA (topk 0.1)",
         "+ torch.compile"]
#: index of the SageSLA rung (the last one before compilation) and of the compiled rung
_SLA, _COMPILED = RUNGS.index("+ SageSLA (topk 0.1)"), RUNGS.index("+ torch.compile")
RUNG_GRAPHS = "+ CUDA graphs (compile mode reduce-overhead)"


def forward_flops(spec: ModelSpec, L: int) -> float:
    """Matmul FLOPs of one forward (attention core + linears), text length ``spec.text_len``."""
    d, f, n = spec.dit.dim, spec.dit.ffn_dim, spec.dit.num_layers
    lin = 2 * L * (6 * d * d + 2 * d * f) * n + 2 * spec.text_len * 2 * d * d * n
    attn = (4 * L * L * d + 4 * L * spec.text_len * d) * n
    return float(lin + attn)


def _ladder(spec: ModelSpec, resolution: str, repeats: int, report: Report, section: str,
            device: str = "cuda", compile: bool | str = True, profile: bool = False,
            skip: tuple[str, ...] = (), final_only: bool = False) -> dict[str, Any]:
    from ..modeling import example_inputs, random_dit_on_device
    from ..passmanager import PassContext, PassManager
    from ..passes import BY_NAME
    from ..program import capture
    from ..targets import local_target

    w, h = spec.pixel_size(resolution)
    L = spec.num_tokens(w, h, spec.default_frames)
    flops = forward_flops(spec, L)
    on_gpu = device == "cuda"
    model = random_dit_on_device(spec, device, torch.bfloat16)
    x, t, c = example_inputs(spec, w, h, spec.default_frames, dtype=torch.bfloat16, device=device)
    times: dict[str, float] = {}

    def rung(name: str, fn) -> torch.Tensor:
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            out = fn()
            sec = cuda_time(fn, repeats, warmup=1)
        times[name] = sec
        row = {"rung": name, "s/forward": sec, "TFLOP/s (dense-equiv.)": flops / sec / 1e12,
               "peak GiB": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan"),
               "speedup": times[RUNGS[0]] / sec if RUNGS[0] in times else 1.0}
        if name != RUNGS[0]:
            row.update(rel_err(out, base))
        report.add(section, row)
        return out

    base = rung(RUNGS[0], lambda: model(x, t, c, return_dict=False)[0])
    t0 = time.perf_counter()
    prog = capture(model, (x, t, c))
    capture_s = time.perf_counter() - t0
    ctx = PassContext(spec=spec, target=local_target())

    def apply(*names: str) -> None:
        PassManager([BY_NAME[n] for n in names if n not in skip], ctx, (x, t, c)).run(prog)

    apply("remove_noop_ops", "fold_constants", "eliminate_dead_code")
    for pass_name, name in [("", RUNGS[1]), *PASS_RUNGS.items()]:
        if pass_name:
            apply(pass_name)
        if pass_name == "linear_to_w8a8":
            model = None  # the bf16 block weights are no longer referenced by the program
            if on_gpu:
                torch.cuda.empty_cache()
        if pass_name in skip:
            report.add(section, {"rung": name, "note": f"skipped (--skip-pass {pass_name})"})
        elif final_only:
            report.add(section, {"rung": name, "note": "applied, not timed (--final-only)"})
        else:
            rung(name, lambda: prog(x, t, c))
    apply("attention_to_sagesla")
    final = rung(RUNGS[_SLA], lambda: prog(x, t, c))
    if profile and on_gpu:
        _profile(lambda: prog(x, t, c), report, f"where the time goes: {RUNGS[_SLA]} ({spec.id}@{resolution})",
                 times[RUNGS[_SLA]])
    if compile:
        compiled_s = _compiled_rung(prog, (x, t, c), on_gpu, rung, report, section, None, profile=profile)
        if compiled_s is not None:
            report.header[f"{section}: first compiled call s"] = round(compiled_s, 1)
        if compile == "reduce-overhead":
            graphs_s = _compiled_rung(prog, (x, t, c), on_gpu, rung, report, section, compile)
            if graphs_s is not None:
                report.header[f"{section}: first CUDA-graph call s"] = round(graphs_s, 1)
    else:
        report.add(section, {"rung": RUNGS[_COMPILED], "note": "skipped (--no-compile)"})
    report.header[f"{section}: capture s"] = round(capture_s, 1)
    del final, base
    return {"times": times, "tokens": L, "flops": flops}


def _profile(fn, report: Report, section: str, forward_s: float, top: int = 15) -> None:
    """One forward under torch.profiler: GPU time per op (children included, so an op and the aten ops it
    calls both appear), the largest first, as a share of the measured forward time."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and not e.key.startswith("ProfilerStep")]
    # custom ops, aten ops, and under torch.compile the generated Triton kernels and the compiled region itself
    ops = [e for e in events if e.key.startswith(("turbocompile::", "aten::", "triton_", "Torch-Compiled Region"))]
    for e in sorted(ops, key=lambda e: e.device_time_total, reverse=True)[:top]:
        report.add(section, {"op": e.key, "calls": e.count, "GPU ms (incl. children)": e.device_time_total / 1e3,
                             "share of forward %": 100 * e.device_time_total / 1e6 / forward_s})


def _compiled_rung(prog, inputs, on_gpu: bool, rung, report: Report, section: str,
                   mode: str | None = None, profile: bool = False) -> float | None:
    """torch.compile the rewritten graph (custom ops stay opaque kernels); returns the first-call seconds.

    ``mode="reduce-overhead"`` also replays the forward as a CUDA graph (static shapes): its rung is named
    ``+ CUDA graphs``. A graph replay reuses its output buffer, so each call marks a new step and the
    output is cloned (one latent, a few MB) before the next replay can overwrite it."""
    name = RUNGS[_COMPILED] if mode is None else RUNG_GRAPHS
    try:
        weights = prog.ordered_weights()
        torch._dynamo.reset()
        if mode == "reduce-overhead":  # as the engine does: the replay reads the weights in place
            mark_weights_static(weights)
        t0 = time.perf_counter()
        compiled = torch.compile(prog.gm, fullgraph=True, mode=mode)
        if mode is not None:
            report.header[f"{section}: torch.compile mode"] = mode

        def call():
            if mode is not None:
                torch.compiler.cudagraph_mark_step_begin()
                return compiled(*weights, *inputs)[0].clone()
            return compiled(*weights, *inputs)[0]

        with torch.no_grad():
            call()
            if mode is not None:
                call()  # the first call warms up, the second records the graph
        if on_gpu:
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        rung(name, call)
        if profile and on_gpu:
            sec = report.sections[section][-1].get("s/forward", float("nan"))
            _profile(call, report, f"where the time goes: {name} ({section})", sec)
        return first
    except Exception as exc:  # noqa: BLE001 - record why the rung is missing, keep the rest
        report.add(section, {"rung": name, "note": f"failed: {type(exc).__name__}: {str(exc)[:200]}"})
        return None


def bench_model(spec: ModelSpec, resolution: str, repeats: int, dry_run: bool, device: str = "cuda",
                compile: bool | str = True, profile: bool = False, skip: tuple[str, ...] = (),
                final_only: bool = False) -> Report:
    """The ladder: one forward timed after each pass. ``final_only`` times only the eager model, the program with
    every pass (the SageSLA rung) and the compiled rungs; the passes in between still run, untimed (at 14B@720p
    each eager rung costs ~36 s, which keeps the whole ladder under the GPU machine's 10-minute call)."""
    w, h = spec.pixel_size(resolution)
    L = spec.num_tokens(w, h, spec.default_frames)
    report = Report(f"one DiT forward, {spec.id}@{resolution} ({L} tokens, random weights)", environment(dry_run))
    report.header["command"] = (f"turbocompile bench model --model {spec.id} --resolution {resolution} "
                                f"--repeats {repeats}" + "".join(f" --skip-pass {n}" for n in skip)
                                + (" --final-only" if final_only else ""))
    section = f"ladder {spec.id}@{resolution}"
    if dry_run:
        for r in RUNGS:
            report.add(section, {"rung": r, "tokens": L, "dense TFLOP/forward": forward_flops(spec, L) / 1e12})
        return report
    _ladder(spec, resolution, repeats, report, section, device=device, compile=compile, profile=profile, skip=skip,
            final_only=final_only)
    return report


def _text_encoder_time(spec: ModelSpec, repeats: int) -> float:
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     feed_forward_proj="gated-gelu")
    with torch.device("cuda"):
        enc = UMT5EncoderModel(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 256384, (1, spec.text_len), device="cuda")
    with torch.no_grad():
        t = cuda_time(lambda: enc(input_ids=ids).last_hidden_state, repeats, warmup=1)
    del enc
    torch.cuda.empty_cache()
    return t


def _vae_decode_time(spec: ModelSpec, resolution: str) -> float:
    from diffusers import AutoencoderKLWan

    with torch.device("cuda"):
        vae = AutoencoderKLWan().to(torch.bfloat16).eval()
    w, h = spec.pixel_size(resolution)
    _, f, lh, lw = spec.latent_shape(w, h, spec.default_frames)
    z = torch.randn(1, 16, f, lh, lw, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        t = cuda_time(lambda: vae.decode(z).sample, 1, warmup=0)
    del vae
    torch.cuda.empty_cache()
    return t


def bench_e2e(spec: ModelSpec, resolution: str, repeats: int, dry_run: bool, compile: bool | str = True,
              profile: bool = False) -> Report:
    w, h = spec.pixel_size(resolution)
    L = spec.num_tokens(w, h, spec.default_frames)
    report = Report(f"whole-video DiT time, {spec.id}@{resolution} ({L} tokens, {spec.default_frames} frames)",
                    environment(dry_run))
    report.header["command"] = (f"turbocompile bench e2e --model {spec.id} --resolution {resolution} "
                                f"--repeats {repeats}")
    report.header["method"] = ("per-forward DiT times measured (CUDA events, median) in this run, times the "
                               "number of network calls of each sampler; sampler arithmetic is negligible")
    nfe_orig = spec.original_steps * 2
    if dry_run:
        report.add("plan", {"sampler": f"original UniPC {spec.original_steps} steps x CFG", "NFE": nfe_orig})
        for s in (4, 3, 2):
            report.add("plan", {"sampler": f"rCM {s} steps", "NFE": s})
        return report
    ladder = _ladder(spec, resolution, repeats, report, f"ladder {spec.id}@{resolution}", compile=compile,
                     profile=profile)
    times = ladder["times"]
    base = times[RUNGS[0]]
    best_name = min((r for r in RUNGS[_SLA:] if r in times), key=lambda r: times[r])
    best = times[best_name]
    te = _text_encoder_time(spec, repeats)
    vae = _vae_decode_time(spec, resolution)
    orig_dit = nfe_orig * base
    report.add("video", {"sampler": f"original: UniPC {spec.original_steps} steps x CFG, eager bf16",
                         "NFE": nfe_orig, "DiT s": orig_dit, "speedup (DiT only)": 1.0,
                         "with text enc + VAE s": orig_dit + 2 * te + vae, "speedup (incl.)": 1.0})
    for steps in (4, 3, 2):
        dit = steps * best
        report.add("video", {"sampler": f"rCM {steps} steps, engine ({best_name})", "NFE": steps, "DiT s": dit,
                             "speedup (DiT only)": orig_dit / dit, "with text enc + VAE s": dit + te + vae,
                             "speedup (incl.)": (orig_dit + 2 * te + vae) / (dit + te + vae)})
    report.add("components", {"stage": "umT5-XXL text encoder (512 tokens, bf16)", "s": te})
    report.add("components", {"stage": "Wan2.1 VAE decode (bf16)", "s": vae})
    return report
