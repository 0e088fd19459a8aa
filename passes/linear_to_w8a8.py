"""Quantize the Linear layers inside the transformer blocks to W8A8 (q, k, v, o of both attentions and both
FFN layers; never SLA's ``proj_l``; embeddings, time projection, head and modulation stay as they are).

Weights are quantized once here, one layer at a time (the old weight is dropped before the next layer is
touched, so a 14B build never holds two copies). A TurboDiffusion ``-quant`` checkpoint's own INT8 blocks
are used unchanged for the ``int8-block`` scheme.
"""
from __future__ import annotations

import re

import torch

from turbocompile.passmanager import PassContext, PassResult, call_arg, copy_source_meta
from turbocompile.program import Program

aten = torch.ops.aten
NAME = "linear_to_w8a8"
_IN_BLOCKS = re.compile(r"^blocks\.\d+\.")


def linear_to_w8a8(prog: Program, ctx: PassContext) -> PassResult:
    from turbocompile.kernels import linear_w8a8

    scheme = str(ctx.option(NAME, "scheme", "auto"))
    if scheme == "auto":
        scheme = linear_w8a8.auto_scheme(ctx.target.name)
    res = PassResult(extra={"scheme": scheme})
    if scheme in ("bf16", "off", "none"):
        res.notes.append("linear quantization off (scheme bf16)")
        return res
    if scheme not in linear_w8a8.SCHEMES:
        raise ValueError(f"unknown W8A8 scheme {scheme!r}; known: {', '.join(linear_w8a8.SCHEMES)}, bf16, auto")
    op = linear_w8a8.SCHEMES[scheme]
    reused = 0
    for node in list(prog.graph.nodes):
        if node.op != "call_function" or node.target != aten.linear.default:
            continue
        src = node.meta.get("source_module", "")
        if not _IN_BLOCKS.match(src) or "proj_l" in src:
            continue
        w_node = node.args[1]
        w = prog.weight_of(w_node)
        if w is None or w.ndim != 2:
            continue
        res.matched += 1
        key = prog.key_of(w_node)
        module = key[: -len(".weight")] if key.endswith(".weight") else key
        pre_q, pre_s = ctx.extras.get(module + ".int8_weight"), ctx.extras.get(module + ".scale")
        if scheme == "int8-block" and pre_q is not None and pre_s is not None:
            q = {"w_q": pre_q.to(w.device), "w_scale": pre_s.to(w.device, torch.float32)}
            reused += 1
        else:
            q = linear_w8a8.quantize_weight(w, scheme)
        bias = call_arg(node, 2, "bias")
        wq_node = prog.add_weight(module + ".w_q", q["w_q"])
        ws_node = prog.add_weight(module + ".w_scale", q["w_scale"])
        with prog.graph.inserting_before(node):
            new = prog.graph.call_function(op, (node.args[0], wq_node, ws_node, bias))
        copy_source_meta(new, node)
        node.replace_all_uses_with(new)
        prog.graph.erase_node(node)
        before = w.numel() * w.element_size()
        after = sum(t.numel() * t.element_size() for t in q.values())
        res.weight_bytes_changed += before - after
        prog.drop_unused_weights()  # free the bf16 weight now, not at the end
        res.rewritten += 1
    res.extra.update({"layers": res.rewritten, "checkpoint_int8_reused": reused,
                      "bytes_saved": res.weight_bytes_changed})
    res.notes.append(f"{res.rewritten} Linear layers -> {scheme} ({reused} from the checkpoint's int8 blocks), "
                     f"{res.weight_bytes_changed / 2**20:.1f} MiB saved")
    return res
