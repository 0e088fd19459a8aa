"""Replace attention: self-attention SDPA in the transformer blocks becomes SageSLA (sparse + linear,
INT8/FP8), or dense SageAttention, or bf16 SLA, or stays SDPA (option ``method``); cross-attention becomes
dense SageAttention or stays (option ``cross``; ``auto``, the default, keeps SDPA on sm_90, where cuDNN is
faster at 512 text keys, see ``CROSS_AUTO``). The first/last N blocks can stay dense (a quality knob).

SLA's linear branch needs the per-block ``proj_l`` of a TurboDiffusion checkpoint; without one the
projection is zero and SLA is plain block-sparse attention (the build log says so).
"""
from __future__ import annotations

import math
import re

import torch

from turbocompile.passmanager import PassContext, PassResult, copy_source_meta
from turbocompile.program import Program

aten = torch.ops.aten
NAME = "attention_to_sagesla"
METHODS = ("sagesla", "sage", "sla", "sdpa")
#: ``cross="auto"``: what cross-attention (video queries, 512 text keys) becomes per target, measured. On an H200
#: cuDNN's SDPA took 0.204 / 1.57 ms at the 1.3B@480p / 14B@720p shapes against 0.30 / 1.75 ms for
#: ``sage_attention``, whose quantization of all of Q costs as much as the four key tiles' attention
#: (docs/kernels-attention.md); elsewhere (not measured) SageAttention.
CROSS_AUTO = {"sm_90": "sdpa"}
_MODULE = re.compile(r"^blocks\.(\d+)\.(attn1|attn2)$")


def _plain_sdpa(node: torch.fx.Node) -> bool:
    """Non-causal, no mask, no dropout, default scale: the only SDPA the custom ops implement."""
    args = list(node.args) + [None] * (7 - len(node.args))
    mask = node.kwargs.get("attn_mask", args[3])
    dropout = node.kwargs.get("dropout_p", args[4] or 0.0)
    causal = node.kwargs.get("is_causal", args[5] or False)
    scale = node.kwargs.get("scale", args[6])
    q = node.args[0].meta.get("val")
    default_scale = scale is None or (q is not None and math.isclose(scale, q.shape[-1] ** -0.5))
    return mask is None and not dropout and not causal and default_scale and not node.kwargs.get("enable_gqa")


def attention_to_sagesla(prog: Program, ctx: PassContext) -> PassResult:
    import turbocompile.kernels  # noqa: F401  (registers torch.ops.turbocompile.*)
    turbocompile.kernels.load_ops()
    ops = torch.ops.turbocompile

    method = str(ctx.option(NAME, "method", "sagesla"))
    cross = str(ctx.option(NAME, "cross", "auto"))
    if cross == "auto":
        cross = CROSS_AUTO.get(ctx.target.name, "sage")
    topk = float(ctx.option(NAME, "topk", 0.1))
    dense_first = int(ctx.option(NAME, "dense_first", 0))
    dense_last = int(ctx.option(NAME, "dense_last", 0))
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if cross not in ("sage", "sdpa"):
        raise ValueError(f"cross must be 'auto', 'sage' or 'sdpa', got {cross!r}")
    if not 0.0 < topk <= 1.0:
        raise ValueError(f"topk must be in (0, 1], got {topk}")
    blk_q, blk_k = ctx.target.attn_blocks
    n_layers = ctx.spec.dit.num_layers
    res = PassResult()
    missing_proj = 0
    counts = {"sage_sla": 0, "sla": 0, "sage_attention": 0, "sdpa": 0}
    for node in list(prog.graph.nodes):
        if node.op != "call_function" or node.target != aten.scaled_dot_product_attention.default:
            continue
        m = _MODULE.match(node.meta.get("source_module", ""))
        if not m:
            continue
        res.matched += 1
        layer, which = int(m.group(1)), m.group(2)
        q, k, v = node.args[:3]
        qv = q.meta.get("val")
        if not _plain_sdpa(node) or qv is None or qv.shape[-1] not in (64, 128):
            res.notes.append(f"kept SDPA at {node.meta['source_module']}: unsupported variant or head_dim")
            counts["sdpa"] += 1
            continue
        dense = layer < dense_first or layer >= n_layers - dense_last
        if which == "attn2":
            choice = "sage_attention" if cross == "sage" else "sdpa"
        elif method == "sdpa":
            choice = "sdpa"
        elif dense or method == "sage":
            choice = "sage_attention" if method in ("sagesla", "sage") else "sdpa"
        else:
            choice = "sage_sla" if method == "sagesla" else "sla"
        counts[choice] += 1
        if choice == "sdpa":
            continue
        with prog.graph.inserting_before(node):
            if choice == "sage_attention":
                new = prog.graph.call_function(ops.sage_attention.default, (q, k, v, blk_q, blk_k))
            else:
                d = qv.shape[-1]
                key = f"blocks.{layer}.attn1.proj_l"
                w = ctx.extras.get(key + ".weight")
                b = ctx.extras.get(key + ".bias")
                if w is None:
                    missing_proj += 1
                    w, b = torch.zeros(d, d), torch.zeros(d)
                place = {"device": qv.device, "dtype": qv.dtype}  # beside the activations (GPU builds)
                w_node = prog.add_weight(key + ".weight", w.to(**place).contiguous())
                b_node = prog.add_weight(key + ".bias", (b if b is not None else torch.zeros(d)).to(**place))
                res.weight_bytes_changed += (d * d + d) * qv.element_size()
                op = ops.sage_sla.default if choice == "sage_sla" else ops.sla.default
                new = prog.graph.call_function(op, (q, k, v, w_node, b_node, topk, blk_q, blk_k))
        copy_source_meta(new, node)
        node.replace_all_uses_with(new)
        prog.graph.erase_node(node)
        res.rewritten += 1
    if missing_proj:
        res.notes.append(f"{missing_proj} self-attention layers have no proj_l in the checkpoint: their linear "
                         "branch is zero, so SLA runs as plain block-sparse attention (use a TurboDiffusion "
                         "checkpoint for the trained projection)")
    res.extra = {"method": method, "topk": topk, "blocks": [blk_q, blk_k], **counts}
    res.notes.append(", ".join(f"{k}: {v}" for k, v in counts.items()))
    return res
