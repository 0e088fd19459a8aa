"""K's token mean and FP8 V's scale in one pass (``kernels/kv_moments.py``): the Triton kernels under
TRITON_INTERPRET=1 in a subprocess against the PyTorch reference (odd token counts from 1, strided (B, L, H, D)
views, NaN-poisoned outputs, bf16 and fp16), the quantizer with and without them, the input checks, and on a GPU
the compiled kernels against the same reference at a Wan shape."""
from __future__ import annotations

import pytest
import torch

from turbocompile.kernels.kv_moments import kv_moments_reference, supported
from turbocompile.kernels.sage_attention import structured_qkv

from interp_subprocess import report_fixture, write_report  # (tests/ is on sys.path under pytest and as a script)

#: (B, H, L, D, dtype, strided): one token, fewer tokens than one step, several chunks, a (B, L, H, D) view
CASES = [(1, 1, 1, 64, "bfloat16", False), (1, 2, 7, 128, "bfloat16", False), (2, 3, 129, 64, "float16", True),
         (1, 2, 1000, 128, "bfloat16", True), (1, 1, 4097, 64, "float16", False)]


def _inputs(b, h, n, d, dtype, strided, seed):
    """Structured K and V (a low-rank component plus noise, a nonzero mean: not zero-centred) with a channel offset."""
    _, k, v = structured_qkv(b, h, n, d, getattr(torch, dtype), torch.device("cpu"), seed=seed)
    k = k + torch.linspace(-2, 3, d, dtype=k.dtype)
    if strided:  # the model's (B, L, H, D) activations seen as (B, H, L, D)
        k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    return k, v


def _interpret_checks() -> dict:
    from turbocompile.kernels import kv_moments as KM
    from turbocompile.kernels import sage_attention as sa

    report = {"cases": []}
    for i, (b, h, n, d, dtype, strided) in enumerate(CASES):
        k, v = _inputs(b, h, n, d, dtype, strided, seed=i)
        km, vs = KM.kv_moments(k, v)
        rk, rv = kv_moments_reference(k, v)
        report["cases"].append({
            "case": [b, h, n, d, dtype, strided], "strided": not k.is_contiguous(),
            "finite": bool(torch.isfinite(km).all() and torch.isfinite(vs).all()),
            "k_mean_err": float((km - rk).abs().max()), "k_mean_scale": float(rk.abs().max()),
            "v_scale_equal": bool(torch.equal(vs, rv)), "shapes": [list(km.shape), list(vs.shape)]})
    # the quantizer: moments by this pass (default) against the PyTorch reductions
    q, k, v = (t.to(torch.bfloat16) for t in structured_qkv(1, 2, 300, 64, torch.float32, torch.device("cpu"), seed=9))
    fused = sa.sage_quantize_triton(q, k, v, 64, 128)
    sa.FUSED_MOMENTS = False
    plain = sa.sage_quantize_triton(q, k, v, 64, 128)
    sa.FUSED_MOMENTS = True
    report["quant"] = {
        "v_scale_equal": bool(torch.equal(fused["v_scale"], plain["v_scale"])),
        "k_mean_err": float((fused["k_mean"] - plain["k_mean"]).abs().max()),
        "k_int8_max_diff": int((fused["k"].int() - plain["k"].int()).abs().max()),
        "v_equal": bool(torch.equal(fused["v"].view(torch.uint8), plain["v"].view(torch.uint8)))}
    return report


interp_report = report_fixture(__file__, "kv_moments.json", timeout=300)


@pytest.mark.parametrize("i", range(len(CASES)))
def test_one_pass_moments_match_pytorch_under_the_interpreter(interp_report, i):
    case = interp_report["cases"][i]
    b, h, n, d, _, strided = case["case"]
    assert case["strided"] == strided
    assert case["shapes"] == [[b, h, d], [b, h, d]]
    assert case["finite"]
    # fp32 sums of up to 4097 bf16 values in another order than PyTorch's: a few ulps of the largest mean
    assert case["k_mean_err"] <= 1e-5 * max(1.0, case["k_mean_scale"]), case
    assert case["v_scale_equal"], case  # a maximum and one IEEE division: exact


def test_quantizer_takes_them_and_gets_the_same_v(interp_report):
    quant = interp_report["quant"]
    assert quant["v_scale_equal"] and quant["v_equal"]
    assert quant["k_mean_err"] <= 1e-5
    assert quant["k_int8_max_diff"] <= 1  # a mean a few ulps apart can move a rounding by one step


def test_supported_says_why_not():
    k = torch.randn(1, 2, 8, 64)
    assert "CUDA tensors" in supported(k, k)  # a CPU tensor outside the interpreter
    assert "must both be (B, H, L, D)" in supported(k, k[:, :, :4])
    assert "power of two" in supported(torch.randn(1, 2, 8, 48), torch.randn(1, 2, 8, 48))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_moments_match_pytorch_on_the_gpu():
    from turbocompile.kernels.kv_moments import kv_moments

    for n, strided in ((32760, False), (333, True), (1, False)):
        k, v = _inputs(1, 12, n, 128, "bfloat16", strided, seed=n)
        k, v = k.cuda(), v.cuda()
        km, vs = kv_moments(k, v)
        rk, rv = kv_moments_reference(k, v)
        # PyTorch's CUDA division by a scalar multiplies by its reciprocal: within one ulp of the IEEE quotient
        assert float(((vs - rv).abs() / rv).max()) <= 2.4e-7
        assert float((km - rk).abs().max()) <= 1e-5 * max(1.0, float(rk.abs().max()))


if __name__ == "__main__":  # the interpreter subprocess
    write_report(_interpret_checks())
