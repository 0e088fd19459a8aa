"""``turbocompile bench``: kernels, one DiT forward as an incremental ladder, and whole-video DiT time.

Every number is measured on the GPU in the same run as its baseline (cuDNN SDPA, cuBLAS bf16, diffusers
eager), with CUDA events after warm-up, median over repeats. ``--dry-run`` checks the plan on the CPU
(shapes, FLOP counts, the rungs it would run) without timing anything; it is what the tests exercise.
"""
from __future__ import annotations

import json
import logging
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import GPUError, InputError
from ..zoo import get_model

log = logging.getLogger(__name__)


#: Where every Report writes itself after each row (the CLI sets it from --json).
AUTOSAVE: list[Any] = [None]


@dataclass
class Report:
    title: str
    header: dict[str, Any]
    sections: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    autosave: Any = None  # a Path: rewritten after every row, so a crash keeps what was measured

    def __post_init__(self) -> None:
        if self.autosave is None:
            self.autosave = AUTOSAVE[0]

    def add(self, section: str, row: dict[str, Any]) -> None:
        self.sections.setdefault(section, []).append(row)
        log.info("%s: %s", section, json.dumps(row, default=str))
        if self.autosave is not None:
            self.autosave.write_text(json.dumps(self.as_dict(), indent=2, default=str))

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "header": self.header, "sections": self.sections}

    def markdown(self) -> str:
        out = [f"## {self.title}", ""]
        out += [f"- {k}: {v}" for k, v in self.header.items()]
        for name, rows in self.sections.items():
            if not rows:
                continue
            cols = list(dict.fromkeys(k for r in rows for k in r))
            out += ["", f"### {name}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for r in rows:
                out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
        return "\n".join(out) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}" if abs(v) < 100 else f"{v:.1f}"
        return f"{v:.3e}"
    return str(v)


def environment(dry_run: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if dry_run or not torch.cuda.is_available():
        info["gpu"] = "none (dry run: plan only, nothing timed)" if dry_run else "none (CPU smoke run)"
        return info
    info["gpu"] = torch.cuda.get_device_name(0)
    cap = torch.cuda.get_device_capability(0)
    info["arch"] = f"sm_{cap[0]}{cap[1]}"
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem,power.limit",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        info["clocks (sm, max sm, mem, power limit)"] = q.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["clocks"] = "nvidia-smi not available"
    return info


def cuda_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 2, min_window_s: float = 0.02) -> float:
    """Median seconds per call of ``fn`` by CUDA events, after ``warmup`` calls (host clock when there is no
    GPU, which only the CPU smoke tests use).

    A call shorter than ``min_window_s`` is timed as a back-to-back batch of calls between one pair of events,
    so the host's launch latency of one isolated call (Python wrapper, dispatcher, a few launches: tens of
    microseconds) does not land in the number of a 0.2 ms kernel."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def window(n: int) -> float:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        for _ in range(n):
            fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / 1e3 / n

    one = window(1)
    inner = max(1, min(200, int(min_window_s / max(one, 1e-6))))
    return statistics.median(window(inner) for _ in range(repeats))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    a, b = out.double().flatten(), ref.double().flatten()
    return {"rel_l2": ((a - b).norm() / b.norm()).item(),
            "cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item()}


def run_bench(what: str, model_id: str = "wan2.1-t2v-1.3b", resolution: str | None = None, repeats: int = 5,
              dry_run: bool = False, compile: bool | str = True, gpu_memory_budget: int | None = None,
              artifact: Any = None, profile: bool = False, skip_passes: tuple[str, ...] = (),
              final_only: bool = False) -> Report:
    spec = get_model(model_id)
    if skip_passes and what != "model":
        raise InputError("--skip-pass applies to `bench model` only (the ladder's optional passes)")
    if final_only and what != "model":
        raise InputError("--final-only applies to `bench model` only (the ladder's rungs)")
    if skip_passes:
        from .model import PASS_RUNGS

        for name in skip_passes:
            if name not in PASS_RUNGS:
                raise InputError(f"--skip-pass {name}: the ladder can leave out {', '.join(PASS_RUNGS)}")
    if not dry_run and not torch.cuda.is_available():
        raise GPUError("turbocompile bench needs a CUDA GPU (none visible); use --dry-run to check the plan on CPU")
    res = resolution or ("480p" if "480p" in spec.resolutions else spec.default_resolution)
    if what == "kernels":
        from .kernels import bench_kernels

        return bench_kernels(spec, res, repeats, dry_run)
    if what == "model":
        from .model import bench_model

        return bench_model(spec, res, repeats, dry_run, compile=compile, profile=profile, skip=tuple(skip_passes),
                           final_only=final_only)
    if what == "e2e":
        from .model import bench_e2e

        return bench_e2e(spec, res, repeats, dry_run, compile=compile, profile=profile)
    if what == "pipeline":
        if dry_run:
            return Report(f"pipeline {spec.id}@{res} (dry run)", environment(True),
                          {"plan": [{"stage": s} for s in ("build (random weights)", "load", "text encode",
                                                           "rCM 4 steps", "VAE decode", "write mp4",
                                                           "second video, warm")]})
        from .pipeline import bench_pipeline

        return bench_pipeline(spec, res, gpu_memory_budget, artifact, compile=bool(compile), profile=profile)
    raise ValueError(f"unknown bench {what!r}")


def attention_flops(b: int, h: int, lq: int, lk: int, d: int) -> float:
    return 4.0 * b * h * lq * lk * d


__all__ = ["Report", "run_bench", "cuda_time", "rel_err", "attention_flops", "environment"]
