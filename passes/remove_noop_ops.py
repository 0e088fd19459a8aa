"""Remove nodes that do nothing at run time: metadata asserts, eval-mode dropout, same-dtype casts,
``contiguous`` on contiguous tensors and views to the same shape. Fewer nodes make the later pattern
matches simpler (a norm followed by a no-op cast is still a norm) and the dumps shorter."""
from __future__ import annotations

import torch

from turbocompile.passmanager import PassContext, PassResult, call_arg, node_val
from turbocompile.program import Program

aten = torch.ops.aten

_ASSERTS = {aten._assert_tensor_metadata.default}
# Casts that return their input unchanged when dtype, device and shape already match (``_to_copy`` is left
# alone: it is an explicit copy and may change the memory format).
_SAME_DTYPE_CASTS = {aten.to.dtype, aten.type_as.default, aten.to.dtype_layout}
_VIEWS = {aten.view.default, aten.reshape.default, aten.contiguous.default, aten.alias.default,
          aten.flatten.using_ints, aten.unflatten.int}


def is_noop(node: torch.fx.Node) -> bool:
    """Whether ``node`` returns its input unchanged (by the nodes' ``val`` metadata); shared with ``fuse_norms``."""
    if node.target in (aten.dropout.default,):
        p, train = node.args[1], call_arg(node, 2, "train", False)
        return (not train) or p == 0.0
    src, out = node_val(node.args[0]) if node.args else None, node_val(node)
    if src is None or out is None:
        return False
    if node.target in _SAME_DTYPE_CASTS:
        return (src.dtype == out.dtype and src.device == out.device and not node.kwargs.get("copy", False)
                and src.shape == out.shape)
    if node.target in _VIEWS:
        return src.shape == out.shape and (node.target != aten.contiguous.default or src.is_contiguous())
    return False


def remove_noop_ops(prog: Program, ctx: PassContext) -> PassResult:
    res = PassResult()
    for node in list(prog.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _ASSERTS:
            res.matched += 1
            if not node.users:
                prog.graph.erase_node(node)
                res.rewritten += 1
            continue
        if node.target in _SAME_DTYPE_CASTS or node.target in _VIEWS or node.target == aten.dropout.default:
            res.matched += 1
            if is_noop(node):
                node.replace_all_uses_with(node.args[0])
                prog.graph.erase_node(node)
                res.rewritten += 1
    res.notes.append(f"removed {res.rewritten} no-op nodes")
    return res
