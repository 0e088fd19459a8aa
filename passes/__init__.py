"""Graph passes, one per file, and the ordered list the pass manager runs.

To add a pass: write ``passes/my_pass.py`` with ``def my_pass(prog, ctx) -> PassResult``, then add a
:class:`~turbocompile.passmanager.PassInfo` line below at the place in the order where it belongs.
See ``docs/passes.md``.
"""
from __future__ import annotations

from turbocompile.errors import PassError
from turbocompile.passmanager import PassInfo

from .attention_to_sagesla import attention_to_sagesla
from .eliminate_dead_code import eliminate_dead_code
from .fold_constants import fold_constants
from .fuse_norm_quant import fuse_norm_quant
from .fuse_norm_rope import fuse_norm_rope
from .fuse_gelu import fuse_gelu
from .fuse_residual import fuse_residual
from .fuse_norms import fuse_norms
from .fuse_projections import fuse_projections
from .linear_to_w8a8 import linear_to_w8a8
from .remove_noop_ops import remove_noop_ops

PASSES: list[PassInfo] = [
    PassInfo("remove_noop_ops", remove_noop_ops,
             "drop metadata asserts, eval dropout, same-dtype casts, identity views"),
    PassInfo("fold_constants", fold_constants,
             "precompute weight-only subgraphs (RoPE tables for the static shape)"),
    PassInfo("eliminate_dead_code", eliminate_dead_code, "drop unused nodes and weights"),
    PassInfo("attention_to_sagesla", attention_to_sagesla,
             "self-attention SDPA -> sage_sla / sage_attention / sla; cross-attention -> sage_attention (or SDPA "
             "where faster)",
             options={"method": "sagesla", "topk": 0.1, "cross": "auto", "dense_first": 0, "dense_last": 0}),
    PassInfo("fuse_projections", fuse_projections,
             "Linear layers of a block that read the same input (q/k/v, context k/v) -> one GEMM + split"),
    PassInfo("linear_to_w8a8", linear_to_w8a8,
             "Linear layers inside the blocks -> W8A8 quantized GEMMs (except proj_l)",
             options={"scheme": "auto"}),
    PassInfo("fuse_norms", fuse_norms,
             "LayerNorm + adaLN modulation, affine LayerNorm and q/k RMSNorm -> fused kernels"),
    PassInfo("fuse_norm_rope", fuse_norm_rope,
             "a self-attention's q/k RMSNorm and the RoPE rotation after it -> one rms_norm_rope kernel"),
    PassInfo("fuse_norm_quant", fuse_norm_quant,
             "a norm that only feeds fp8-row linears writes their e4m3 input itself; the linears -> fp8_row_gemm"),
    PassInfo("fuse_gelu", fuse_gelu, "the FFN's GELU (tanh) -> the epilogue of the fp8_row_gemm that feeds it"),
    PassInfo("fuse_residual", fuse_residual,
             "a block's residual step (h + out, or h + out * gate) -> the epilogue of the fp8-row GEMM of out"),
]

#: Passes that builds for the ONNX / TensorRT backends leave out: their ops have no ONNX schema or plugin.
ONNX_SKIPPED_PASSES = ("fuse_norm_rope", "fuse_norm_quant", "fuse_gelu", "fuse_residual")

BY_NAME = {p.name: p for p in PASSES}


def select_passes(names: list[str] | None = None, skip: list[str] | None = None) -> list[PassInfo]:
    """The pipeline for ``--passes`` / ``--skip-pass``; unknown names are a clear error."""
    for n in (names or []) + (skip or []):
        if n not in BY_NAME:
            raise PassError(f"unknown pass '{n}'; known passes: {', '.join(BY_NAME)}")
    chosen = [BY_NAME[n] for n in names] if names else [p for p in PASSES if p.default]
    return [p for p in chosen if p.name not in set(skip or [])]


def parse_pass_options(items: list[str]) -> dict[str, dict[str, object]]:
    """``["sla.topk=0.15", "attention_to_sagesla.method=sla"]`` -> nested dict (values parsed as numbers
    where they look like numbers). ``sla.`` / ``w8a8.`` are short for the attention and linear passes."""
    alias = {"sla": "attention_to_sagesla", "attention": "attention_to_sagesla", "w8a8": "linear_to_w8a8",
             "linear": "linear_to_w8a8"}
    out: dict[str, dict[str, object]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise PassError(f"--pass-option '{item}' must look like PASS.OPTION=VALUE (e.g. sla.topk=0.15)")
        lhs, value = item.split("=", 1)
        pname, opt = lhs.split(".", 1)
        pname = alias.get(pname, pname)
        if pname not in BY_NAME:
            raise PassError(f"--pass-option '{item}': unknown pass '{pname}'; known: {', '.join(BY_NAME)}")
        known = BY_NAME[pname].options
        if opt not in known:
            raise PassError(f"--pass-option '{item}': pass '{pname}' has no option '{opt}'; "
                            f"options: {', '.join(known) or 'none'}")
        parsed: object = value
        for conv in (int, float):
            try:
                parsed = conv(value)
                break
            except ValueError:
                pass
        out.setdefault(pname, {})[opt] = parsed
    return out
