"""The compiler's IR: an ATen-level FX graph whose weights are explicit inputs.

:func:`capture` runs ``torch.export`` on the DiT and keeps the exported graph as it is, parameters and
buffers lifted to placeholders. A :class:`Program` pairs that graph with the tensors behind those
placeholders. Passes rewrite the graph and add or drop weights through :meth:`Program.add_weight`; nothing
is hidden in module attributes, so the weights can be written to safetensors and the graph serialized with
``torch.export.save`` without them (production runtimes bind the weights at load time).

Every call_function node carries ``node.meta["source_module"]``: the DiT module path it came from
(``blocks.3.attn1``, ``blocks.3.ffn.net.0.proj`` ...), so passes can tell self- from cross-attention.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

log = logging.getLogger(__name__)

INPUT_NAMES = ("x", "timestep", "context")


class DiTCallable(torch.nn.Module):
    """``(x, timestep, context) -> velocity``: the DiT with the plain signature the engine calls."""

    def __init__(self, dit: torch.nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.dit(x, timestep, context, return_dict=False)[0]


def _source_module(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^(L__self__\.?)", "", path)
    return path[len("dit."):] if path.startswith("dit.") else ("" if path == "dit" else path)


@dataclass
class Program:
    """A graph with weights as leading placeholders, followed by the user inputs ``INPUT_NAMES``."""

    gm: fx.GraphModule
    weights: dict[str, torch.Tensor]  # placeholder name -> tensor
    weight_keys: dict[str, str] = field(default_factory=dict)  # placeholder name -> readable key

    # -- structure ---------------------------------------------------------------------------
    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def weight_placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder" and n.name in self.weights]

    def input_placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder" and n.name not in self.weights]

    def weight_of(self, node: fx.Node) -> torch.Tensor | None:
        """The tensor behind a weight placeholder, or None for anything else."""
        if node.op == "placeholder" and node.name in self.weights:
            return self.weights[node.name]
        return None

    def key_of(self, node: fx.Node) -> str:
        return self.weight_keys.get(node.name, node.name)

    def add_weight(self, key: str, tensor: torch.Tensor) -> fx.Node:
        """Add a new weight input (inserted before the user inputs); returns its placeholder node."""
        first_input = self.input_placeholders()[0]
        base = re.sub(r"[^0-9a-zA-Z_]", "_", key)
        name, i = base, 0
        existing = {n.name for n in self.graph.nodes}
        while name in existing:
            i += 1
            name = f"{base}_{i}"
        with self.graph.inserting_before(first_input):
            node = self.graph.placeholder(name)
        node.meta["val"] = tensor
        self.weights[node.name] = tensor
        self.weight_keys[node.name] = key
        return node

    def drop_unused_weights(self) -> int:
        """Remove weight placeholders nothing uses; returns the bytes freed."""
        freed = 0
        for node in self.weight_placeholders():
            if not node.users:
                t = self.weights.pop(node.name)
                self.weight_keys.pop(node.name, None)
                freed += t.numel() * t.element_size()
                self.graph.erase_node(node)
        return freed

    def recompile(self) -> None:
        self.gm.recompile()

    # -- running -----------------------------------------------------------------------------
    def ordered_weights(self) -> list[torch.Tensor]:
        return [self.weights[n.name] for n in self.weight_placeholders()]

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        out = self.gm(*self.ordered_weights(), x, timestep, context)
        return out[0] if isinstance(out, (tuple, list)) else out

    def weight_bytes_by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.weights.values():
            k = str(t.dtype).replace("torch.", "")
            out[k] = out.get(k, 0) + t.numel() * t.element_size()
        return out

    def to(self, device: torch.device | str) -> "Program":
        self.weights = {k: v.to(device) for k, v in self.weights.items()}
        return self


def _frames_dim() -> torch.export.Dim:
    return torch.export.Dim("latent_frames", min=2, max=64)


def capture(dit: torch.nn.Module, example_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
            dynamic_frames: bool = False) -> Program:
    """``torch.export`` the DiT for the given input shapes into a :class:`Program`.

    Latent frames and spatial size are static by default (fastest kernels, CUDA graphs); with
    ``dynamic_frames`` the latent frame count is a symbolic dimension.
    """
    wrapper = DiTCallable(dit)
    dynamic_shapes = None
    if dynamic_frames:
        dynamic_shapes = {"x": {2: _frames_dim()}, "timestep": None, "context": None}
    with torch.no_grad():
        ep = torch.export.export(wrapper, tuple(example_inputs), dynamic_shapes=dynamic_shapes, strict=False)
    return program_from_exported(ep)


def program_from_exported(ep: torch.export.ExportedProgram) -> Program:
    """Turn an ExportedProgram (parameters lifted) into a Program with readable weight keys."""
    gm = ep.graph_module
    state = {**ep.state_dict, **ep.constants}
    weights: dict[str, torch.Tensor] = {}
    keys: dict[str, str] = {}
    inputs = iter(INPUT_NAMES)
    for spec in ep.graph_signature.input_specs:
        if spec.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            t = state[spec.target]
            weights[spec.arg.name] = t.detach()
            key = spec.target[len("dit."):] if spec.target.startswith("dit.") else spec.target
            keys[spec.arg.name] = key
        elif spec.kind.name == "USER_INPUT":
            name = next(inputs)
            node = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == spec.arg.name)
            node.meta["input_name"] = name
        else:  # pragma: no cover - the DiT has no tokens/custom objects
            raise NotImplementedError(f"unsupported export input kind {spec.kind}")
    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.meta["source_module"] = _source_module(node)
    prog = Program(gm=gm, weights=weights, weight_keys=keys)
    prog.graph.lint()
    return prog


def export_program(prog: Program, example_inputs: tuple[torch.Tensor, ...], dynamic_frames: bool = False
                   ) -> torch.export.ExportedProgram:
    """Re-export the rewritten graph (weights as inputs) into a portable ExportedProgram."""
    weights = prog.ordered_weights()
    args = tuple(weights) + tuple(example_inputs)
    dynamic_shapes = None
    if dynamic_frames:
        dynamic_shapes = [None] * len(weights) + [{2: _frames_dim()}, None, None]
    with torch.no_grad():
        return torch.export.export(prog.gm, args, dynamic_shapes=dynamic_shapes, strict=False)
