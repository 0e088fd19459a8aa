"""Fuse the Linear layers of a block that read the same input into one: self-attention q/k/v -> one [3D, D]
projection, cross-attention k/v of the text context -> one [2D, D]; the output is split back into the pieces.

Why: one GEMM of N = 3D instead of three of N = D (at D = 1536 the N = 1536 shape is the least efficient GEMM
the model runs), and after ``linear_to_w8a8`` one activation quantization instead of three. Numerically it is
the same layer: each output column is the same dot product over the same K, and the 8-bit schemes quantize
weights per output channel or per 128 output channels (D is a multiple of 128), so the fused weight quantizes
to exactly the pieces' values. A TurboDiffusion ``-quant`` checkpoint's int8 blocks are concatenated the same
way, so ``linear_to_w8a8`` still uses them unchanged.

Runs before ``linear_to_w8a8`` (it matches ``aten.linear`` with bf16/fp32 weights).
"""
from __future__ import annotations

import operator
import re

import torch

from turbocompile.passmanager import PassContext, PassResult, call_arg
from turbocompile.program import Program

aten = torch.ops.aten
NAME = "fuse_projections"
_IN_BLOCKS = re.compile(r"^blocks\.\d+\.")
_CHECKPOINT_INT8 = (".int8_weight", ".scale")


def fuse_projections(prog: Program, ctx: PassContext) -> PassResult:
    res = PassResult()
    groups: dict[tuple[torch.fx.Node, str], list[torch.fx.Node]] = {}  # (input, block) -> linears
    for node in prog.graph.nodes:
        if node.op != "call_function" or node.target != aten.linear.default:
            continue
        src = node.meta.get("source_module", "")
        w = prog.weight_of(node.args[1])
        if not _IN_BLOCKS.match(src) or "proj_l" in src or w is None or w.ndim != 2:
            continue
        res.matched += 1
        # the text context feeds every block's cross-attention: group by input *and* block
        groups.setdefault((node.args[0], src.split(".")[1]), []).append(node)
    fused_layers = 0
    for nodes in groups.values():
        if len(nodes) < 2 or not _fusable(prog, nodes):
            continue
        _fuse(prog, ctx, nodes)
        res.rewritten += len(nodes)
        fused_layers += 1
    prog.drop_unused_weights()
    res.extra.update({"groups": fused_layers, "layers_fused": res.rewritten})
    res.notes.append(f"{res.rewritten} Linear layers fused into {fused_layers} (shared inputs: q/k/v, context k/v)")
    return res


def _module(prog: Program, node: torch.fx.Node) -> str:
    key = prog.key_of(node.args[1])
    return key[: -len(".weight")] if key.endswith(".weight") else key


def _bias(node: torch.fx.Node) -> torch.fx.Node | None:
    return call_arg(node, 2, "bias")


def _fusable(prog: Program, nodes: list[torch.fx.Node]) -> bool:
    """Same weight dtype/device, all with or all without a weight bias, and every piece's output count a
    multiple of 128 (so the 128x128-block schemes quantize the fused weight exactly as the pieces). The nodes
    come grouped by input and block already."""
    ws = [prog.weight_of(n.args[1]) for n in nodes]
    biases = [_bias(n) for n in nodes]
    if len({(w.dtype, w.device, w.shape[1]) for w in ws}) != 1:
        return False
    if any(b is None for b in biases) != all(b is None for b in biases):
        return False
    if any(b is not None and prog.weight_of(b) is None for b in biases):
        return False
    return all(w.shape[0] % 128 == 0 for w in ws)


def _fuse(prog: Program, ctx: PassContext, nodes: list[torch.fx.Node]) -> None:
    order = {n: i for i, n in enumerate(prog.graph.nodes)}
    nodes = sorted(nodes, key=order.__getitem__)
    modules = [_module(prog, n) for n in nodes]
    prefix = modules[0].rsplit(".", 1)[0]
    fused_name = f"{prefix}.fused_" + "_".join(m.rsplit(".", 1)[-1] for m in modules)
    ws = [prog.weight_of(n.args[1]) for n in nodes]
    sizes = [w.shape[0] for w in ws]
    w_node = prog.add_weight(fused_name + ".weight", torch.cat(ws, 0))
    b_node = None
    if _bias(nodes[0]) is not None:
        b_node = prog.add_weight(fused_name + ".bias", torch.cat([prog.weight_of(_bias(n)) for n in nodes], 0))
    pre = [[ctx.extras.get(m + suffix) for suffix in _CHECKPOINT_INT8] for m in modules]
    if all(q is not None and s is not None for q, s in pre):
        for i, suffix in enumerate(_CHECKPOINT_INT8):
            ctx.extras[fused_name + suffix] = torch.cat([p[i] for p in pre], 0)
    first = nodes[0]
    with prog.graph.inserting_before(first):
        fused = prog.graph.call_function(aten.linear.default, (first.args[0], w_node, b_node))
        parts = prog.graph.call_function(aten.split_with_sizes.default, (fused, sizes, -1))
        outs = [prog.graph.call_function(operator.getitem, (parts, i)) for i in range(len(nodes))]
    fused.meta.update({k: first.meta[k] for k in ("nn_module_stack", "stack_trace") if k in first.meta})
    fused.meta["source_module"] = fused_name
    for node, out in zip(nodes, outs):
        out.meta.update({k: node.meta[k] for k in ("source_module", "nn_module_stack", "stack_trace", "val")
                         if k in node.meta})
        node.replace_all_uses_with(out)
        prog.graph.erase_node(node)
