"""Fuse the norms inside the transformer blocks into single kernels:

- ``layer_norm(x.float()) * (1 + scale) + shift`` (no affine; adaLN modulation) -> ``layernorm_modulate``
- ``layer_norm(x.float(), w, b)`` (the cross-attention pre-norm)                 -> ``layer_norm_affine``
- ``rms_norm(x, [D], w)`` (q/k norms over the whole hidden dim)                  -> ``rms_norm``

Each fused op computes in fp32 and returns the input's dtype, which is what the following cast did anyway: that
cast (diffusers' ``.type_as(x)``) is then a no-op and goes too, so later passes see the norm's users directly.
"""
from __future__ import annotations

import re

import torch
import torch.fx as fx

from turbocompile.passmanager import PassContext, PassResult, call_arg, copy_source_meta
from turbocompile.program import Program

from .remove_noop_ops import _SAME_DTYPE_CASTS, is_noop

aten = torch.ops.aten
_IN_BLOCKS = re.compile(r"^blocks\.\d+\.")
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.type_as.default}


def _strip_float_cast(x: fx.Node) -> fx.Node:
    """``h.float()`` -> ``h``: the fused op reads the original tensor and upcasts in registers."""
    if x.op == "call_function" and x.target in _CASTS and len(x.users) >= 1:
        return x.args[0]
    return x


def _is_one_plus(node: object) -> fx.Node | None:
    """``1 + s`` / ``s + 1`` -> s."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target == aten.add.Tensor:
        a, b = node.args[:2]
        if isinstance(b, (int, float)) and b == 1 and isinstance(a, fx.Node):
            return a
        if isinstance(a, (int, float)) and a == 1 and isinstance(b, fx.Node):
            return b
    return None


def _drop_noop_casts(g: fx.Graph, new: fx.Node, x: fx.Node) -> None:
    """Remove the casts of the fused op ``new`` (of input ``x``) to the dtype it now returns. The fused ops return
    x's dtype, device and shape, which is what ``new``'s metadata says until shape propagation after the pass."""
    new.meta["val"] = x.meta.get("val")
    for u in list(new.users):
        if u.op == "call_function" and u.target in _SAME_DTYPE_CASTS and u.args[0] is new and is_noop(u):
            u.replace_all_uses_with(new)
            g.erase_node(u)


def fuse_norms(prog: Program, ctx: PassContext) -> PassResult:
    import turbocompile.kernels  # noqa: F401

    turbocompile.kernels.load_ops()
    ops = torch.ops.turbocompile
    res = PassResult()
    counts = {"layernorm_modulate": 0, "layer_norm_affine": 0, "rms_norm": 0}
    g = prog.graph
    for node in list(g.nodes):
        if node.op != "call_function" or not _IN_BLOCKS.match(node.meta.get("source_module", "")):
            continue
        if node.target == aten.rms_norm.default:
            x, shape = node.args[0], node.args[1]
            w = call_arg(node, 2, "weight")
            eps = call_arg(node, 3, "eps")
            res.matched += 1
            if w is None or len(shape) != 1 or eps is None:
                continue
            with g.inserting_before(node):
                new = g.call_function(ops.rms_norm.default, (x, w, float(eps)))
            copy_source_meta(new, node)
            node.replace_all_uses_with(new)
            g.erase_node(node)
            _drop_noop_casts(g, new, x)
            counts["rms_norm"] += 1
            continue
        if node.target != aten.layer_norm.default:
            continue
        res.matched += 1
        x, shape = node.args[0], node.args[1]
        w = node.args[2] if len(node.args) > 2 else None
        b = node.args[3] if len(node.args) > 3 else None
        eps = float(node.args[4]) if len(node.args) > 4 else 1e-5
        if len(shape) != 1:
            continue
        x_in = _strip_float_cast(x)
        if w is not None and b is not None:
            with g.inserting_before(node):
                new = g.call_function(ops.layer_norm_affine.default, (x_in, w, b, eps))
            copy_source_meta(new, node)
            node.replace_all_uses_with(new)
            g.erase_node(node)
            _drop_noop_casts(g, new, x_in)
            counts["layer_norm_affine"] += 1
            continue
        if w is not None or b is not None or len(node.users) != 1:
            continue
        mul = next(iter(node.users))
        if mul.target != aten.mul.Tensor or len(mul.users) != 1:
            continue
        other = mul.args[1] if mul.args[0] is node else mul.args[0]
        scale = _is_one_plus(other)
        add = next(iter(mul.users))
        if scale is None or add.target != aten.add.Tensor:
            continue
        shift = add.args[1] if add.args[0] is mul else add.args[0]
        if not isinstance(shift, fx.Node):
            continue
        with g.inserting_before(add):
            new = g.call_function(ops.layernorm_modulate.default, (x_in, shift, scale, eps))
        copy_source_meta(new, node)
        add.replace_all_uses_with(new)
        for dead in (add, mul, node):
            g.erase_node(dead)
        _drop_noop_casts(g, new, x_in)
        counts["layernorm_modulate"] += 1
    g.eliminate_dead_code()
    res.rewritten = sum(counts.values())
    res.extra = counts
    res.notes.append(", ".join(f"{k}: {v}" for k, v in counts.items()))
    return res
