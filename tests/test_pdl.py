"""Programmatic dependent launch between an op's kernels (kernels/pdl.py): where it turns on, and that it changes
when kernels may start, never what they compute (GPU: bit-equal outputs with it on and off, eagerly and replayed
from a CUDA graph, for the eight-kernel ``sage_sla`` and the two-kernel fp8-row linear)."""
from __future__ import annotations

import pytest
import torch

from turbocompile.kernels import load_ops, pdl

load_ops()
ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def test_pdl_is_off_on_the_cpu_under_the_interpreter_and_when_disabled(monkeypatch):
    assert not pdl.use_pdl(torch.empty(1))
    assert pdl.launch_kwargs(False) == {"PDL": False}
    assert pdl.launch_kwargs(True) == {"PDL": True, "launch_pdl": True}
    if torch.cuda.is_available():
        t = torch.empty(1, device="cuda")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert not pdl.use_pdl(t)
        monkeypatch.delenv("TRITON_INTERPRET")
        monkeypatch.setattr(pdl, "ENABLED", False)
        assert not pdl.use_pdl(t)


def _both(fn, monkeypatch, graph: bool):
    """``fn()`` with PDL on and off (each eagerly or as a CUDA-graph replay): the two outputs."""
    outs = []
    for on in (True, False):
        monkeypatch.setattr(pdl, "ENABLED", on)
        assert pdl.use_pdl(torch.empty(1, device="cuda")) == on
        if graph:
            fn()  # compile outside the capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = fn()
            out.fill_(float("nan"))
            g.replay()
        else:
            out = fn()
        torch.cuda.synchronize()
        outs.append(out.clone())
    return outs


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="programmatic dependent launch needs an sm_90+ GPU")
@pytest.mark.parametrize("graph", [False, True])
def test_sage_sla_is_bit_equal_with_and_without_pdl(graph, monkeypatch):
    from turbocompile.kernels.sage_attention import structured_qkv
    from turbocompile.kernels.sage_sla import sage_sla

    q, k, v = structured_qkv(1, 4, 3001, 128, torch.bfloat16, torch.device("cuda"), seed=7)
    w, b = torch.randn(128, 128, device="cuda") * 0.05, torch.randn(128, device="cuda") * 0.05
    on, off = _both(lambda: sage_sla(q, k, v, w, b, 0.1, 64, 128), monkeypatch, graph)
    assert not on.isnan().any()
    assert torch.equal(on, off)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="programmatic dependent launch needs an sm_90+ GPU")
@pytest.mark.parametrize("graph", [False, True])
def test_fp8_row_linear_is_bit_equal_with_and_without_pdl(graph, monkeypatch):
    from turbocompile.kernels.linear_w8a8 import cuda_linear, quantize_weight

    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(4000, 1536, device="cuda", generator=g, dtype=torch.bfloat16)
    wq = quantize_weight(torch.randn(1536, 1536, device="cuda", generator=g) * 0.03, "fp8-row")
    bias = torch.randn(1536, device="cuda", generator=g, dtype=torch.bfloat16)
    on, off = _both(lambda: cuda_linear(x, wq["w_q"], wq["w_scale"], bias, "fp8-row"), monkeypatch, graph)
    assert not on.isnan().any()
    assert torch.equal(on, off)
