"""Apply a Wan block's residual step in the epilogue of the fp8-row GEMM whose output it adds.

Each Wan block updates its residual stream three times, each right after a linear (as diffusers writes it; in an
fp32 model the casts are no-ops that ``remove_noop_ops`` has dropped):

* self-attention: ``(h.float() + attn1.to_out(o) * gate_msa).type_as(h)``;
* cross-attention: ``h + attn2.to_out(o)``;
* feed-forward: ``(h.float() + ffn(x).float() * c_gate_msa).type_as(h)``.

Compiled, each step is an Inductor kernel of its own that reads the linear's output and ``h`` and writes the new
``h``: three bf16 tensors of [L, dim] per step. In the GEMM's epilogue it reads ``h`` and writes the new ``h``
instead of the linear's output, which saves a write and two reads per element.

The rewrite:

* ``fp8_row_linear(x, w_q, w_scale, bias)`` feeding such a step becomes ``quant_fp8_row(x)`` followed by
  ``fp8_row_gemm(q, s, w_q, w_scale, bias, dtype, "", h, gate)``. ``quant_fp8_row`` writes the same bits the
  linear quantized internally.
* An ``fp8_row_gemm`` (a norm already quantized its input) only gets ``h`` and ``gate``.

The linear's output must have no other user. The gate must be fp32 ``[N]`` or ``[B, 1, N]``, and ``h`` must have
the output's shape and dtype. Any other add is left alone and counted in the notes.

Same numbers: the epilogue rounds the GEMM's value to the output dtype first, as the graph's add read it, and
computes the step in fp32. The CPU reference is the graph's own ops, so a CPU program is bit-identical. On the
GPU the kernel may contract ``h + out·gate`` into one FMA, which is at most one fp32 rounding apart before the
bf16 rounding.

Runs after ``fuse_gelu``. ONNX/TensorRT builds skip it: their plugins cover ``fp8_row_linear``, not these ops.
"""
from __future__ import annotations

import operator

import torch

from turbocompile.passmanager import PassContext, PassResult, call_arg, copy_source_meta, is_call, node_val
from turbocompile.program import Program

aten = torch.ops.aten
NAME = "fuse_residual"

_CASTS = (aten.to.dtype, aten._to_copy.default, torch.ops.prims.convert_element_type.default)


def _cast_dtype(node) -> torch.dtype | None:
    """The dtype a cast node converts to (None if ``node`` is not a plain dtype cast)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or node.target not in _CASTS:
        return None
    if node.target == aten._to_copy.default:
        return node.kwargs.get("dtype") if set(node.kwargs) <= {"dtype"} else None
    return node.args[1] if len(node.args) > 1 and isinstance(node.args[1], torch.dtype) else None


def _candidates(step, linears) -> list[tuple]:
    """``step`` (the node whose value would become the new residual) -> its readings as a residual step on an
    fp8-row linear: (linear, h, gate, nodes to erase, nodes to erase if then unused); none if it is another add
    or cast (the time embedding's, the modulation's, the norms')."""
    def is_linear(n) -> bool:
        return is_call(n, linears[0]) or is_call(n, linears[1])

    if is_call(step, aten.add.Tensor) and len(step.args) == 2 and not step.kwargs:
        a, b = step.args
        found = [(lin, h, None, [step], []) for lin, h in ((a, b), (b, a)) if is_linear(lin)]  # h + out
        for mul, h in ((a, b), (b, a)):  # h + out * gate with no casts (an fp32 model: h.float() is h)
            if is_call(mul, aten.mul.Tensor) and len(mul.users) == 1:
                found += [(lin, h, gate, [step, mul], []) for lin, gate in (mul.args, mul.args[::-1])
                          if is_linear(lin)]
        return found
    # (h.float() + lin * gate).type_as(h), or .to(h.dtype)
    if is_call(step, aten.type_as.default):
        add, h_ref = step.args
    elif _cast_dtype(step) is not None:
        add, h_ref = step.args[0], None
    else:
        return []
    if not is_call(add, aten.add.Tensor) or len(add.args) != 2 or add.kwargs or len(add.users) != 1:
        return []
    found = []
    for t, mul in (add.args, add.args[::-1]):
        if _cast_dtype(t) != torch.float32 or not is_call(mul, aten.mul.Tensor) or len(mul.users) != 1:
            continue
        h = t.args[0]
        if h_ref is not None and h_ref is not h:
            continue
        for lin, gate in (mul.args, mul.args[::-1]):
            inner = lin
            if _cast_dtype(lin) == torch.float32 and len(lin.users) == 1:
                inner = lin.args[0]
            if is_linear(inner):
                found.append((inner, h, gate, [step, add, mul] + ([lin] if inner is not lin else []), [t]))
    return found


def _why_not(lin, h, gate, step, gemm) -> str | None:
    """Why this reading cannot go into the GEMM's epilogue (None: it can)."""
    from turbocompile.kernels.linear_w8a8 import gate_rows

    out, hv, gv, sv = node_val(lin), node_val(h), node_val(gate), node_val(step)
    if len(lin.users) != 1:
        return "the linear's output has other users"
    if out is None or hv is None or sv is None:
        return "shapes unknown"
    if tuple(hv.shape) != tuple(out.shape) or hv.dtype != out.dtype or sv.dtype != out.dtype:
        return "the residual's shape or dtype differs from the linear's output"
    if lin.target == gemm and (len(lin.args) > 7 or set(lin.kwargs) - {"activation"}):
        return "the GEMM already takes a residual"
    if gate is not None and (gv is None or gv.dtype != torch.float32 or gate_rows(gv.shape, out.shape) is None):
        return "the gate is not fp32 [N] or [B, 1, N]"
    return None


def fuse_residual(prog: Program, ctx: PassContext) -> PassResult:
    import turbocompile.kernels  # noqa: F401

    turbocompile.kernels.load_ops()
    ops = torch.ops.turbocompile
    linear, gemm = ops.fp8_row_linear.default, ops.fp8_row_gemm.default
    res = PassResult()
    counts = {"gated": 0, "plain": 0, "linears_split": 0}
    g = prog.graph
    for step in list(g.nodes):
        if step.op != "call_function" or step.target not in (aten.add.Tensor, aten.type_as.default, *_CASTS):
            continue
        found = _candidates(step, (linear, gemm))
        if not found:
            continue
        res.matched += 1
        whys = [_why_not(c[0], c[1], c[2], step, gemm) for c in found]
        if all(whys):
            res.skip(whys[0])
            continue
        lin, h, gate, erase, maybe_dead = found[whys.index(None)]
        out = node_val(lin)
        with g.inserting_before(step):
            if lin.target == linear:
                x, w_q, w_scale = lin.args[:3]
                bias = call_arg(lin, 3, "bias")
                quant = g.call_function(ops.quant_fp8_row.default, (x,))
                q = g.call_function(operator.getitem, (quant, 0))
                s = g.call_function(operator.getitem, (quant, 1))
                for new in (quant, q, s):
                    copy_source_meta(new, lin)
                args = (q, s, w_q, w_scale, bias, out.dtype, "")
                counts["linears_split"] += 1
            else:
                act = call_arg(lin, 6, "activation", "")
                args = tuple(lin.args[:6]) + (act,)
            fused = g.call_function(gemm, args + (h, gate))
        fused.meta.update(lin.meta)
        fused.meta["val"] = node_val(step)
        step.replace_all_uses_with(fused)
        for node in erase + [lin]:
            g.erase_node(node)
        for node in maybe_dead:  # h.float(), unless something else reads it
            if not node.users:
                g.erase_node(node)
        counts["gated" if gate is not None else "plain"] += 1
        res.rewritten += 1
    res.extra = {"residual_in_gemm": res.rewritten, **counts}
    res.notes.append(f"{res.rewritten} residual steps now in their fp8-row GEMM's epilogue ({counts['gated']} gated, "
                     f"{counts['plain']} plain; {counts['linears_split']} linears split into quant_fp8_row + GEMM)")
    res.note_skipped("residual adds")
    return res
