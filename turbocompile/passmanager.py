"""The pass manager: run named graph passes in order, check the graph after each, dump every stage.

A pass is a plain function ``run(prog: Program, ctx: PassContext) -> PassResult`` in a file of its own
under ``passes/``; ``turbocompile.passes.PASSES`` lists them in order. After each pass the manager
lints the graph, propagates shapes and dtypes with fake tensors, optionally measures the numeric
drift against the previous stage on a probe input (``verify``), and writes the stage's dump.
A pass that raises or leaves a broken graph fails the build with the pass's name.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .errors import PassError
from .program import Program
from .targets import Target
from .zoo import ModelSpec

log = logging.getLogger(__name__)


@dataclass
class PassContext:
    """What a pass may read: its options, the target, the model, and checkpoint extras."""

    spec: ModelSpec
    target: Target
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # pass name -> option -> value
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. proj_l, int8 blocks from a checkpoint
    expert: str = "main"
    notes: list[str] = field(default_factory=list)

    def option(self, pass_name: str, key: str, default: Any) -> Any:
        return self.options.get(pass_name, {}).get(key, default)


@dataclass
class PassResult:
    """Statistics a pass reports; ``matched`` nodes looked at, ``rewritten`` nodes changed."""

    matched: int = 0
    rewritten: int = 0
    weight_bytes_changed: int = 0
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # why a matched node was left alone -> how many

    def skip(self, why: str) -> None:
        """Count one matched node left alone for ``why``."""
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def note_skipped(self, what: str) -> None:
        """One note per reason counted by :meth:`skip`: ``"<n> <what> left as is: <why>"``."""
        self.notes += [f"{n} {what} left as is: {why}" for why, n in self.skipped.items()]


#: Node metadata a rewritten node inherits from the one it replaces: where it came from, for the dumps, the
#: passes that match by module path (``blocks.3.attn1``) and error messages.
SOURCE_META = ("source_module", "nn_module_stack", "stack_trace")


def copy_source_meta(new: torch.fx.Node, old: torch.fx.Node) -> None:
    """Give ``new`` the :data:`SOURCE_META` entries of ``old``, the node it replaces."""
    new.meta.update({k: old.meta[k] for k in SOURCE_META if k in old.meta})


def is_call(node: object, target) -> bool:
    """Whether ``node`` is a graph node calling ``target`` (the patterns' operands may be constants)."""
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == target


def call_arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call node, given at position ``index`` or as a keyword (``default`` if neither)."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def node_val(node: object) -> torch.Tensor | None:
    """The tensor the shape propagation recorded for ``node`` (None for constants, tuples, unknown shapes)."""
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


@dataclass(frozen=True)
class PassInfo:
    name: str
    run: Callable[[Program, PassContext], PassResult]
    description: str
    default: bool = True  # in the default pipeline
    options: dict[str, Any] = field(default_factory=dict)  # option -> default value


@dataclass
class Numerics:
    max_abs: float
    rel_l2: float
    cosine: float

    def as_dict(self) -> dict[str, float]:
        return {"max_abs": self.max_abs, "rel_l2": self.rel_l2, "cosine": self.cosine}


def compare(out: torch.Tensor, ref: torch.Tensor) -> Numerics:
    a, b = out.detach().double().flatten(), ref.detach().double().flatten()
    if not torch.isfinite(a).all():
        return Numerics(float("inf"), float("inf"), float("nan"))
    diff = a - b
    rel = (diff.norm() / b.norm().clamp_min(1e-30)).item()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    return Numerics(diff.abs().max().item(), rel, cos)


def propagate_shapes(prog: Program, example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Fill ``node.meta['val']`` with fake tensors (shape, dtype, device) without running the kernels."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        args = [mode.from_tensor(t) for t in prog.ordered_weights()]
        args += [mode.from_tensor(t) for t in example_inputs]
    FakeTensorProp(prog.gm, mode).propagate_dont_convert_inputs(*args)


@dataclass
class StageRecord:
    index: int
    name: str
    seconds: float
    result: PassResult
    node_count: int
    numerics: Numerics | None


class PassManager:
    """Runs an ordered list of passes over one expert's program."""

    def __init__(self, passes: list[PassInfo], ctx: PassContext, example_inputs: tuple[torch.Tensor, ...],
                 dump_dir: Path | None = None, verify: bool = False, max_rel_l2: float = 0.1,
                 progress: Callable[[str], None] | None = None):
        self.passes, self.ctx, self.example_inputs = passes, ctx, example_inputs
        self.dump_dir, self.verify, self.max_rel_l2 = dump_dir, verify, max_rel_l2
        self.progress = progress
        self.records: list[StageRecord] = []

    def _probe(self, prog: Program) -> torch.Tensor:
        with torch.no_grad():
            return prog(*self.example_inputs)

    def run(self, prog: Program) -> Program:
        from . import dumps

        propagate_shapes(prog, self.example_inputs)
        previous = self._probe(prog) if self.verify else None
        first = StageRecord(0, "capture", 0.0, PassResult(), len(prog.graph.nodes), None)
        self.records.append(first)
        if self.dump_dir is not None:
            dumps.write_stage(self.dump_dir, first, prog, None)
        prev_text = dumps.graph_text(prog)
        for i, info in enumerate(self.passes, start=1):
            if self.progress:
                self.progress(info.name)
            t0 = time.perf_counter()
            try:
                result = info.run(prog, self.ctx)
                prog.graph.lint()
                prog.recompile()
                propagate_shapes(prog, self.example_inputs)
            except PassError:
                raise
            except Exception as exc:  # a pass that breaks the graph fails the build with its name
                raise PassError(f"pass '{info.name}' failed: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
            seconds = time.perf_counter() - t0
            numerics = None
            if self.verify:
                out = self._probe(prog)
                numerics = compare(out, previous)
                previous = out
                if not numerics.rel_l2 <= self.max_rel_l2:
                    raise PassError(
                        f"pass '{info.name}' changed the output by relative L2 {numerics.rel_l2:.3g} "
                        f"(cosine {numerics.cosine:.5f}) > --max-drift {self.max_rel_l2}; "
                        f"skip it with --skip-pass {info.name} or raise --max-drift"
                    )
            rec = StageRecord(i, info.name, seconds, result, len(prog.graph.nodes), numerics)
            self.records.append(rec)
            for note in result.notes:
                log.info("[%s] %s", info.name, note)
            if self.dump_dir is not None:
                text = dumps.graph_text(prog)
                dumps.write_stage(self.dump_dir, rec, prog, prev_text, text)
                prev_text = text
        return prog
