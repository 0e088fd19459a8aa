"""Apply the FFN's GELU in the epilogue of the fp8-row GEMM that produces its input.

A Wan block's feed-forward is ``Linear → GELU(tanh) → Linear``. On sm_90 builds (``fp8-row``, with
``fuse_norm_quant``) the first Linear is an ``fp8_row_gemm`` and the GELU an ``aten.gelu`` that Inductor compiles
into a kernel of its own: it reads the GEMM's [L, ffn_dim] output and writes it again (10.6 ms of a 1.3B@480p
forward on an H200, 2026-11-27: 30 calls of 354 µs). Here ``gelu(fp8_row_gemm(...), approximate="tanh")`` whose
GEMM has no other user becomes ``fp8_row_gemm(..., activation="gelu_tanh")``: the GEMM's epilogue rounds each
value to the output dtype (what the GELU read), applies the GELU in fp32 and writes once.

Runs after ``fuse_norm_quant``. Other GELUs (exact erf form, another producer, a GEMM output read elsewhere) are
left alone and counted in the notes. ONNX/TensorRT builds never have ``fp8_row_gemm`` (they skip
``fuse_norm_quant``) and skip this pass too.
"""
from __future__ import annotations

import torch

from turbocompile.passmanager import PassContext, PassResult, call_arg, is_call
from turbocompile.program import Program

aten = torch.ops.aten
NAME = "fuse_gelu"


def fuse_gelu(prog: Program, ctx: PassContext) -> PassResult:
    import turbocompile.kernels  # noqa: F401

    turbocompile.kernels.load_ops()
    gemm = torch.ops.turbocompile.fp8_row_gemm.default
    res = PassResult()
    g = prog.graph
    for node in list(g.nodes):
        if not is_call(node, aten.gelu.default):
            continue
        res.matched += 1
        src = node.args[0]
        approximate = call_arg(node, 1, "approximate", "none")
        why = None
        if approximate != "tanh":
            why = f"GELU approximate={approximate!r} (the epilogue computes the tanh form)"
        elif not is_call(src, gemm):
            why = "input is not an fp8_row_gemm"
        elif len(src.users) != 1:
            why = "the GEMM's output has other users"
        elif call_arg(src, 6, "activation", ""):
            why = "the GEMM already applies an activation"
        if why:
            res.skip(why)
            continue
        src.args = tuple(src.args[:6]) + ("gelu_tanh",)
        src.kwargs = {k: v for k, v in src.kwargs.items() if k != "activation"}
        node.replace_all_uses_with(src)
        g.erase_node(node)
        res.rewritten += 1
    res.extra = {"gelu_in_gemm": res.rewritten}
    res.notes.append(f"{res.rewritten} GELUs now applied in their fp8-row GEMM's epilogue")
    res.note_skipped("GELU")
    return res
