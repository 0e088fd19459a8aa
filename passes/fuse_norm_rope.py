"""Fuse a self-attention's q/k RMSNorm with the rotary embedding that follows it into ``rms_norm_rope``.

After ``fuse_norms`` a Wan self-attention normalizes q and k with one ``rms_norm`` op each, and the exported
graph then rotates the result as diffusers' ``apply_rotary_emb`` writes it::

    u  = unflatten(r, 2, [H, -1]);  x1, x2 = unbind(unflatten(u, -1, [-1, 2]), -1);  e = empty_like(u)
    copy_(e[..., 0::2], x1 * cos - x2 * sin);  copy_(e[..., 1::2], x1 * sin + x2 * cos)

with ``cos``/``sin`` the fp32 tables ``fold_constants`` precomputed for the static shape. Compiled, that rotation
is a kernel of its own that reads the norm's output and writes it again (4.46 ms of a 164.8 ms 1.3B@480p forward on
an H200). The pass replaces the norm and the whole pattern by ``rms_norm_rope(x, w, eps, cos, sin)`` followed by
the same ``unflatten``, which every user of ``e`` then reads: same math, one read and one write of q and of k.

Runs after ``fuse_norms``. A norm whose users are not exactly this pattern (other code, tables that are not fp32
weights, a different pairing) is left alone and counted in the notes. Builds for the ONNX/TensorRT backends skip
it (no plugin for the fused op; theirs cover ``rms_norm`` and run the rotation as ONNX ops).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from turbocompile.passmanager import PassContext, PassResult, copy_source_meta, is_call
from turbocompile.program import Program

aten = torch.ops.aten
NAME = "fuse_norm_rope"


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _mul_operand(mul: object, x: fx.Node) -> fx.Node | None:
    """``mul(x, t)`` or ``mul(t, x)`` -> t."""
    if not is_call(mul, aten.mul.Tensor) or len(mul.args) != 2 or mul.kwargs:
        return None
    a, b = mul.args
    return b if a is x else a if b is x else None


def _rotation(x1: fx.Node, x2: fx.Node, sub: object, add: object) -> tuple[fx.Node, fx.Node] | None:
    """(cos, sin) when ``sub = x1*cos - x2*sin`` and ``add = x1*sin + x2*cos`` (add in either order), else None."""
    if not (is_call(sub, aten.sub.Tensor) and is_call(add, aten.add.Tensor) and len(sub.args) == 2
            and len(add.args) == 2 and not sub.kwargs and not add.kwargs):
        return None
    cos, sin = _mul_operand(sub.args[0], x1), _mul_operand(sub.args[1], x2)
    a0, a1 = add.args
    if _mul_operand(a0, x2) is not None:
        a0, a1 = a1, a0
    if cos is None or sin is None or _mul_operand(a0, x1) is not sin or _mul_operand(a1, x2) is not cos:
        return None
    return cos, sin


def _interleaved_copy(copy: fx.Node, e: fx.Node) -> tuple[int, fx.Node] | None:
    """(start, value) for ``copy_(slice(e, last dim, start in {0, 1}, to the end, step 2), value)``."""
    if not is_call(copy, aten.copy_.default) or len(copy.args) != 2 or copy.users:
        return None
    dst, value = copy.args
    if not is_call(dst, aten.slice.Tensor) or dst.args[0] is not e or len(dst.users) != 1 or "val" not in e.meta:
        return None
    args = list(dst.args) + [0, None, None, 1][len(dst.args) - 1:]
    dim, start, end, step = args[1:5]
    shape = e.meta["val"].shape
    if dim % len(shape) != len(shape) - 1 or step != 2 or (start or 0) not in (0, 1):
        return None
    if end is not None and end < shape[-1]:
        return None
    return start or 0, value


def _match(prog: Program, norm: fx.Node) -> tuple[dict, list[fx.Node]] | str:
    """The rotation after ``norm``: ({heads, cos, sin, e}, the nodes it replaces), or why it does not match."""
    u = _only_user(norm)
    if not (is_call(u, aten.unflatten.int) and u.args[0] is norm and u.args[1] in (2, -1)):
        return "no rotation follows (a cross-attention norm)"
    heads = u.args[2][0]
    users = list(u.users)
    pairs = [n for n in users if is_call(n, aten.unflatten.int) and list(n.args[2]) == [-1, 2]]
    empties = [n for n in users if is_call(n, aten.empty_like.default)]
    if len(users) != 2 or len(pairs) != 1 or len(empties) != 1:
        return "no rotation follows (a cross-attention norm)"
    pair, e = pairs[0], empties[0]
    if pair.args[1] not in (-1, 3) or e.kwargs.get("dtype") is not None:
        return "not a pairing of each head's last dim"
    unbind = _only_user(pair)
    if not is_call(unbind, aten.unbind.int) or unbind.args[1] not in (-1, 4):
        return "pairs not unbound"
    gets = {n.args[1]: n for n in unbind.users if is_call(n, operator.getitem)}
    if set(gets) != {0, 1} or len(unbind.users) != 2:
        return "unbind not read as (x1, x2)"
    x1, x2 = gets[0], gets[1]
    muls = list(x1.users) + list(x2.users)
    if len(x1.users) != 2 or len(x2.users) != 2:
        return "x1/x2 have other users"
    copies = [next(iter(n.users)) for n in e.users if is_call(n, aten.slice.Tensor) and len(n.users) == 1]
    found = {}
    for c in copies:
        got = _interleaved_copy(c, e)
        if got is None:
            return "empty_like written other than by two interleaved copies"
        found[got[0]] = (c, got[1])
    if set(found) != {0, 1}:
        return "empty_like not written by two interleaved copies"
    sub, add = found[0][1], found[1][1]
    rot = _rotation(x1, x2, sub, add)
    if rot is None or len(sub.users) != 1 or len(add.users) != 1:
        return "not the x1*cos - x2*sin / x1*sin + x2*cos rotation"
    cos, sin = rot
    val = norm.meta.get("val")
    for t in (cos, sin):
        w = prog.weight_of(t)
        if w is None or w.dtype != torch.float32 or val is None or tuple(w.shape) != (
                1, val.shape[1], 1, val.shape[-1] // (2 * heads)) or 2 * heads * w.shape[-1] != val.shape[-1]:
            return "tables are not fp32 [1, L, 1, D/2] weights"
    # producers before their users, so that erasing in reverse order never leaves a node with users
    erase = [norm, u, pair, e, unbind, x1, x2, *muls, sub, add]
    for c, _value in found.values():
        erase += [c.args[0], c]
    return {"heads": heads, "cos": cos, "sin": sin, "e": e}, erase


def fuse_norm_rope(prog: Program, ctx: PassContext) -> PassResult:
    import turbocompile.kernels  # noqa: F401

    turbocompile.kernels.load_ops()
    ops = torch.ops.turbocompile
    res = PassResult()
    g = prog.graph
    fused = 0
    for norm in list(g.nodes):
        if not is_call(norm, ops.rms_norm.default):
            continue
        res.matched += 1
        got = _match(prog, norm)
        if isinstance(got, str):
            res.skip(got)
            continue
        m, erase = got
        x, w, eps = norm.args
        e = m["e"]
        with g.inserting_before(e):
            new = g.call_function(ops.rms_norm_rope.default, (x, w, eps, m["cos"], m["sin"]))
            view = g.call_function(aten.unflatten.int, (new, 2, [m["heads"], -1]))
        copy_source_meta(new, norm)
        copy_source_meta(view, e)
        e.replace_all_uses_with(view, delete_user_cb=lambda user: user not in erase)
        for n in reversed(erase):
            g.erase_node(n)
        fused += 1
    res.rewritten = fused
    res.extra = {"rms_norm_rope": fused}
    res.notes.append(f"{fused} q/k norms now write rotated values (rms_norm_rope)")
    res.note_skipped("rms_norm")
    return res
