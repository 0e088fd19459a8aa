"""Evaluate, once at build time, every subgraph that depends only on weights (the RoPE cos/sin tables
for the build's static shape are the main one) and replace it with a precomputed weight."""
from __future__ import annotations

import torch
import torch.fx as fx

from turbocompile.passmanager import PassContext, PassResult
from turbocompile.program import Program

aten = torch.ops.aten
_PURE_VIEWS = {aten.view.default, aten.reshape.default, aten.unsqueeze.default, aten.t.default,
               aten.permute.default, aten.expand.default, aten.slice.Tensor, aten.select.int}
MAX_FOLD_BYTES = 256 * 2**20
# Tensor factories with no inputs that are safe to evaluate at build time.
_FACTORIES = {aten.arange.start, aten.arange.default, aten.arange.start_step, aten.full.default,
              aten.zeros.default, aten.ones.default}


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema and schema.is_mutable)


def fold_constants(prog: Program, ctx: PassContext) -> PassResult:
    res = PassResult()
    env: dict[fx.Node, object] = {}
    mutated = {n.args[0] for n in prog.graph.nodes if n.op == "call_function" and _mutates(n) and n.args}
    for node in prog.graph.nodes:
        w = prog.weight_of(node)
        if w is not None:
            env[node] = w
            continue
        if node.op != "call_function" or _mutates(node) or node in mutated:
            continue
        if node.meta.get("val") is None or "nondeterministic_seeded" in getattr(node.target, "tags", ()):
            continue
        if not node.all_input_nodes and node.target not in _FACTORIES:
            continue
        if not all(a in env for a in node.all_input_nodes):
            continue
        args = torch.fx.node.map_arg(node.args, lambda a: env[a])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: env[a])
        with torch.no_grad():
            env[node] = node.target(*args, **kwargs)
        res.matched += 1
    # Replace the frontier: constant nodes used by non-constant nodes (or the output). Equal tables
    # (each layer slices the same RoPE cos/sin) share one weight.
    folded: list[tuple[torch.Tensor, fx.Node]] = []
    for node in list(env):
        if prog.weight_of(node) is not None:
            continue
        val = env[node]
        if not isinstance(val, torch.Tensor):
            continue
        if not any(u not in env for u in node.users):
            continue
        if node.target in _PURE_VIEWS and prog.weight_of(node.args[0]) is not None:
            continue  # a view of a weight: nothing to gain, and folding would copy it
        if val.numel() * val.element_size() > MAX_FOLD_BYTES:
            res.notes.append(f"not folded (too large): {node.name} {tuple(val.shape)}")
            continue
        new = next((n for t, n in folded if t.shape == val.shape and t.dtype == val.dtype and torch.equal(t, val)),
                   None)
        if new is None:
            key = f"folded.{node.meta.get('source_module') or 'root'}.{node.name}"
            new = prog.add_weight(key, val.contiguous().clone())
            new.meta["val"] = node.meta.get("val")
            folded.append((val, new))
            res.weight_bytes_changed += val.numel() * val.element_size()
        node.replace_all_uses_with(new, delete_user_cb=lambda u: u not in env)
        res.rewritten += 1
    prog.graph.eliminate_dead_code()
    res.weight_bytes_changed -= prog.drop_unused_weights()
    res.notes.append(f"folded {res.rewritten} constant subgraphs ({res.matched} nodes evaluated)")
    return res
