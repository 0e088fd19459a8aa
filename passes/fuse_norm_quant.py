"""Fuse the fp8-row linears' activation quantization into the norm that feeds them.

``layernorm_modulate`` / ``layer_norm_affine`` whose every user is an ``fp8_row_linear`` taking it as input
becomes ``layernorm_modulate_fp8_row`` / ``layer_norm_affine_fp8_row`` (the norm writes e4m3 values and one fp32
scale per row), and those linears become ``fp8_row_gemm`` (the GEMM alone). Why: the quantization pass over the
norm's output was ~20% of an fp8-row linear at K = 1536 (the 1.3B model's q/k/v, cross-attention q and first FFN
layer), and the norm no longer writes a bf16 tensor that only the quantizer reads. Same bits as before: the fused
kernel rounds each row to the activation dtype before quantizing it, as the unfused pair did.

Runs after ``linear_to_w8a8`` and ``fuse_norms``; it changes nothing unless the scheme is ``fp8-row`` (``auto``
on sm_90); ``fuse_norms`` has removed the no-op cast diffusers puts after the norm, so the linears read it
directly. Builds for the ONNX/TensorRT backends skip it (their plugins cover the unfused ops).
"""
from __future__ import annotations

import operator

import torch

from turbocompile.passmanager import PassContext, PassResult, call_arg, copy_source_meta
from turbocompile.program import Program

NAME = "fuse_norm_quant"


def fuse_norm_quant(prog: Program, ctx: PassContext) -> PassResult:
    import turbocompile.kernels  # noqa: F401

    turbocompile.kernels.load_ops()
    ops = torch.ops.turbocompile
    fused_op = {ops.layernorm_modulate.default: ops.layernorm_modulate_fp8_row.default,
                ops.layer_norm_affine.default: ops.layer_norm_affine_fp8_row.default}
    linear = ops.fp8_row_linear.default
    res = PassResult()
    counts = {"norms": 0, "linears": 0}
    g = prog.graph
    for node in list(g.nodes):
        if node.op != "call_function" or node.target not in fused_op:
            continue
        res.matched += 1
        users = list(node.users)
        val = node.meta.get("val")  # (the pass manager's shape propagation: the linears' output dtype)
        if val is None or not users or any(u.target != linear or u.args[0] is not node or node in u.args[1:]
                                           for u in users):
            continue
        with g.inserting_after(node):
            fused = g.call_function(fused_op[node.target], node.args)
        with g.inserting_after(fused):
            q = g.call_function(operator.getitem, (fused, 0))
        with g.inserting_after(q):
            s = g.call_function(operator.getitem, (fused, 1))
        for new in (fused, q, s):  # (their shapes come from the shape propagation after the pass)
            copy_source_meta(new, node)
        for u in users:
            w_q, w_scale = u.args[1], u.args[2]
            bias = call_arg(u, 3, "bias")
            with g.inserting_before(u):
                gemm = g.call_function(ops.fp8_row_gemm.default, (q, s, w_q, w_scale, bias, val.dtype))
            gemm.meta.update(u.meta)
            u.replace_all_uses_with(gemm)
            g.erase_node(u)
            counts["linears"] += 1
        g.erase_node(node)
        counts["norms"] += 1
    res.rewritten = counts["norms"]
    res.extra = counts
    res.notes.append(f"{counts['norms']} norms now quantize for {counts['linears']} fp8-row linears"
                     if counts["norms"] else "no norm feeds only fp8-row linears (scheme is not fp8-row?)")
    return res
