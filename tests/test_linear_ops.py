"""W8A8 linear ops: references, op registration/export, accuracy, and the Triton kernels under TRITON_INTERPRET=1.

The interpreter checks run in one subprocess (this file executed as a script with TRITON_INTERPRET=1 set before
triton is imported), which writes a JSON report that the tests below read.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from turbocompile.errors import InputError, UnsupportedShapeError
from turbocompile.kernels import linear_w8a8 as L
from turbocompile.kernels import quantize_activations as qa
from turbocompile.quantization import quantize_int8_block

from interp_subprocess import report_fixture, write_report  # (tests/ is on sys.path under pytest and as a script)

SCHEMES = list(L.SCHEMES)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(m: int, k: int, n: int, seed: int, dtype=torch.bfloat16, outliers: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if outliers:  # a few channels 40x larger, like real DiT activations
        x[:, torch.randperm(k, generator=g)[:4]] *= 40
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    b = torch.randn(n, generator=g) * 0.1
    return x.to(dtype), w, b


# --------------------------------------------------------------------------------------------------------------
# Weights and references
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_weight_layout(scheme):
    w = torch.randn(200, 300)
    d = L.quantize_weight(w, scheme)
    assert set(d) == {"w_q", "w_scale"}
    assert d["w_q"].shape == (200, 300) and d["w_q"].dtype == L._W_DTYPE[scheme]
    want = (200,) if scheme.endswith("-row") else (2, 3)
    assert tuple(d["w_scale"].shape) == want and d["w_scale"].dtype == torch.float32
    back = L.dequantize_weight(d["w_q"], d["w_scale"], scheme)
    assert _rel(back, w) < (0.02 if scheme.startswith("int8") else 0.05)


def test_int8_block_weight_is_the_paper_quantization():
    w = torch.randn(260, 140)
    q, s = quantize_int8_block(w)
    d = L.quantize_weight(w, "int8-block")
    assert torch.equal(d["w_q"], q) and torch.equal(d["w_scale"], s)


def test_quantize_weight_errors():
    with pytest.raises(InputError, match="unknown W8A8 scheme 'int4'"):
        L.quantize_weight(torch.randn(8, 8), "int4")
    with pytest.raises(UnsupportedShapeError, match="2-D"):
        L.quantize_weight(torch.randn(2, 8, 8), "int8-row")


def test_int8_block_reference_is_exact_in_the_integer_part():
    """The reference equals an fp64 evaluation of the same block math up to fp32 rounding."""
    x, w, b = _inputs(200, 384, 136, seed=1, dtype=torch.float32)
    d = L.quantize_weight(w, "int8-block")
    out = L.reference_linear(x, d["w_q"], d["w_scale"], b, "int8-block")
    qx, sx = quantize_int8_block(x)
    exact = torch.zeros(200, 136, dtype=torch.float64)
    for kb in range(3):
        ks = slice(kb * 128, (kb + 1) * 128)
        ints = qx[:, ks].long() @ d["w_q"][:, ks].long().t()  # integer GEMM, no rounding at all
        scale = sx[:, kb].double().repeat_interleave(128)[:200, None] * \
            d["w_scale"][:, kb].double().repeat_interleave(128)[None, :136]
        exact += ints.double() * scale
    exact += b.double()
    assert _rel(out, exact) < 1e-6


@pytest.mark.parametrize("scheme,bound", [("int8-block", 0.015), ("int8-row", 0.0125),
                                          ("fp8-row", 0.05), ("fp8-block", 0.05)])
def test_accuracy_against_bf16_on_gaussian_data(scheme, bound):
    """Relative L2 error of the quantized layer against the bf16 layer.

    8-bit absmax quantization of Gaussian data has a noise floor: a 128x128 block's amax is ~4.5 sigma, so one
    step is 0.035 sigma and the rounding noise 1.0% of each operand, ~1.4% of the product (docs/kernels-linear.md).
    """
    x, w, b = _inputs(512, 1536, 384, seed=2)
    ref = torch.nn.functional.linear(x, w.bfloat16(), b.bfloat16()).float()
    d = L.quantize_weight(w, scheme)
    out = L.reference_linear(x, d["w_q"], d["w_scale"], b, scheme)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert _rel(out, ref) < bound


@pytest.mark.parametrize("scheme", SCHEMES)
def test_outlier_channels_stay_bounded(scheme):
    x, w, b = _inputs(256, 384, 128, seed=3, outliers=True)
    ref = torch.nn.functional.linear(x.float(), w, b)
    d = L.quantize_weight(w, scheme)
    out = L.reference_linear(x, d["w_q"], d["w_scale"], b, scheme)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 0.1


# --------------------------------------------------------------------------------------------------------------
# Ops: registration, CPU dispatch, shapes, dtypes, errors, export
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_op_on_cpu_is_the_reference(scheme, dtype):
    x, w, b = _inputs(2 * 75, 256, 384, seed=4, dtype=dtype)
    x = x.reshape(2, 75, 256)
    d = L.quantize_weight(w, scheme)
    out = L.w8a8_linear(x, d["w_q"], d["w_scale"], b, scheme)
    assert out.shape == (2, 75, 384) and out.dtype == dtype
    ref = L.reference_linear(x, d["w_q"], d["w_scale"], b, scheme)
    assert torch.equal(out, ref)
    no_bias = getattr(torch.ops.turbocompile, L.OP_NAMES[scheme])(x, d["w_q"], d["w_scale"], None)
    assert torch.allclose(no_bias.float() + b.to(dtype).float(), out.float(), rtol=2e-2, atol=2e-2)


def test_op_errors_say_what_to_do():
    x = torch.randn(4, 64)
    d = L.quantize_weight(torch.randn(32, 128), "int8-block")
    with pytest.raises(UnsupportedShapeError, match="x has 64 input features but the weight has 128"):
        torch.ops.turbocompile.int8_block_linear(x, d["w_q"], d["w_scale"], None)
    with pytest.raises(InputError, match="quantize_weight"):
        torch.ops.turbocompile.fp8_row_linear(torch.randn(4, 128), d["w_q"], torch.ones(32), None)
    with pytest.raises(UnsupportedShapeError, match="w_scale must be fp32"):
        torch.ops.turbocompile.int8_row_linear(torch.randn(4, 128), d["w_q"], torch.ones(3), None)
    with pytest.raises(UnsupportedShapeError, match="bias must have shape"):
        torch.ops.turbocompile.int8_block_linear(torch.randn(4, 128), d["w_q"], d["w_scale"], torch.ones(5))


def test_ops_export_with_their_fake_impl():
    d = L.quantize_weight(torch.randn(64, 128), "int8-block")

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w_q", d["w_q"])
            self.register_buffer("w_scale", d["w_scale"])

        def forward(self, x):
            return torch.ops.turbocompile.int8_block_linear(x, self.w_q, self.w_scale, None)

    x = torch.randn(2, 10, 128)
    ep = torch.export.export(M(), (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.turbocompile.int8_block_linear.default in targets
    assert ep.module()(x).shape == (2, 10, 64)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_opcheck(scheme):
    x, w, b = _inputs(40, 128, 128, seed=5)
    d = L.quantize_weight(w, scheme)
    # opcheck's schema test multiplies the arguments, which torch's CPU kernels cannot do for float8 tensors.
    utils = ("test_schema", "test_faketensor") if scheme.startswith("int8") else ("test_faketensor",)
    torch.library.opcheck(L.SCHEMES[scheme], (x, d["w_q"], d["w_scale"], b), test_utils=utils)


def test_auto_scheme_table():
    assert L.auto_scheme("cpu") == "int8-block"
    assert L.auto_scheme("sm_90") == L.AUTO_TABLE["sm_90"]
    assert L.auto_scheme("sm90a") == L.auto_scheme("9.0") == L.AUTO_TABLE["sm_90"]
    assert L.auto_scheme("sm_61") == "int8-block"
    assert set(L.AUTO_TABLE.values()) <= set(L.SCHEMES)


# --------------------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (subprocess)
# --------------------------------------------------------------------------------------------------------------
def _interpret_checks() -> dict:
    """Runs with TRITON_INTERPRET=1: every kernel against its reference, outputs poisoned first."""
    from turbocompile.kernels.gemm_int8_block import CONFIGS, gemm_block_scaled
    from turbocompile.kernels.gemm_scaled import gemm_rowscale

    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):  # every output a kernel must overwrite starts as garbage
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(77)

    torch.empty = poisoned_empty
    report: dict = {}
    for m, k, n in [(200, 384, 256), (130, 256, 384)]:
        x, w, b = _inputs(m, k, n, seed=m + k, outliers=True)
        for scheme, (fn, ref) in qa.QUANTIZERS.items():
            q1, s1 = fn(x)
            q2, s2 = ref(x)
            if scheme.startswith("int8"):
                same = torch.equal(q1, q2) and torch.equal(s1, s2)
            else:  # interpreter rounds e4m3 subnormals by its own rule: allow one subnormal step (2**-9)
                same = torch.equal(s1, s2) and (q1.float() - q2.float()).abs().max().item() <= 2.0 ** -9
            report[f"quant/{scheme}/{m}x{k}"] = bool(same)
        q2, s2 = qa.quant_int8_block_ref(x)
        for groups, warps in qa.INT8_BLOCK_QUANT_SWEEP:  # K = 384 / 256: 3 / 2 blocks, so groups 2, 4 hit a tail
            q1, s1 = qa.quant_int8_block(x, (groups, warps))
            report[f"quantcfg/int8-block/{groups}x{warps}w/{m}x{k}"] = bool(torch.equal(q1, q2) and torch.equal(s1, s2))
        for scheme in qa.QUANTIZERS:
            d = L.quantize_weight(w, scheme)
            for dtype in (torch.float32, torch.bfloat16):
                for bias in (b, None):
                    xs = x.to(dtype).reshape(2, m // 2, k)
                    out = L.cuda_linear(xs, d["w_q"], d["w_scale"], bias, scheme, backend="triton")
                    ref = L.reference_linear(xs, d["w_q"], d["w_scale"], bias, scheme)
                    key = f"linear/{scheme}/{m}x{k}x{n}/{str(dtype)[6:]}/{'bias' if bias is not None else 'nobias'}"
                    report[key] = {"finite": bool(torch.isfinite(out).all()), "shape": list(out.shape) == [2, m // 2, n],
                                   "dtype": out.dtype == dtype, "rel": _rel(out.float(), ref.float())}
        # the other GEMM configurations (BLOCK_N 256, plain int32->fp32 convert, 4 warps) on int8-block
        qx, sx = qa.quant_int8_block(x)
        d = L.quantize_weight(w, "int8-block")
        base = gemm_block_scaled(qx, sx, d["w_q"], d["w_scale"], b, torch.float32)
        for name in ("128x128_w8_s4_magic", "128x128_w8_s4_r3", "128x256_w8_s3", "128x64_w4_s4", "256x128_w8_s3"):
            assert name in CONFIGS
            alt = gemm_block_scaled(qx, sx, d["w_q"], d["w_scale"], b, torch.float32, config=name)
            report[f"config/{name}/{m}"] = _rel(alt, base)
        qx, sx = qa.quant_fp8_row(x)
        d = L.quantize_weight(w, "fp8-row")
        exp = (qx.float() * sx[:, None]) @ L.dequantize_weight(d["w_q"], d["w_scale"], "fp8-row").t() + b
        report[f"rowscale_fp8/{m}"] = _rel(gemm_rowscale(qx, sx, d["w_q"], d["w_scale"], b, torch.float32), exp)
        # fp8_row_gemm's CUDA implementation (the linear after a norm that quantized its input) on the activation
        # the fp8-row quantizer wrote: the bits of cuda_linear on the unquantized input, 3-D, bf16 and fp32 out
        for dtype in (torch.bfloat16, torch.float32):
            xs = x.to(dtype).reshape(2, m // 2, k)
            q3, s3 = qa.quant_fp8_row(xs)
            got = L._fp8_row_gemm_cuda(q3.reshape(xs.shape), s3.reshape(xs.shape[:-1]), d["w_q"], d["w_scale"], b,
                                       dtype)
            want = L.cuda_linear(xs, d["w_q"], d["w_scale"], b, "fp8-row")
            report[f"prequant_fp8/{m}/{str(dtype)[6:]}"] = bool(got.shape == want.shape and got.dtype == dtype
                                                                and torch.equal(got, want))
            # with GELU in the epilogue (pass fuse_gelu): aten.gelu of the same rounded output, within fp32 ulps
            # of its tanh before the last rounding (the kernel's tanh is 1 - 2/(exp(2u)+1)); inputs scaled so the
            # outputs cover GELU's curved range
            got = L._fp8_row_gemm_cuda(q3.reshape(xs.shape), s3.reshape(xs.shape[:-1]), d["w_q"], d["w_scale"],
                                       b, dtype, "gelu_tanh")
            report[f"gelu_fp8/{m}/{str(dtype)[6:]}"] = _gelu_report(got, want, dtype)
            # with the block's residual step in the epilogue (pass fuse_residual): plain, then gated with one gate
            # row per batch element (B = 2), against the graph's own math on the unfused output
            torch.manual_seed(m)
            g, h = torch.randn(2, 1, n), torch.randn(2, m // 2, n).to(dtype)
            for name, gate in (("plain", None), ("gated", g)):
                got = L._fp8_row_gemm_cuda(q3.reshape(xs.shape), s3.reshape(xs.shape[:-1]), d["w_q"], d["w_scale"],
                                           b, dtype, "", h, gate)
                ref = L.residual_update(want, h, gate)
                report[f"residual_fp8/{name}/{m}/{str(dtype)[6:]}"] = {
                    "finite": bool(torch.isfinite(got).all()), "shape_dtype": got.shape == ref.shape and got.dtype == dtype,
                    "equal_frac": (got == ref).float().mean().item(), "rel": _rel(got.float(), ref.float()),
                    "moved": _rel(got.float(), want.float())}
    torch.empty = real_empty
    return report


interp_report = report_fixture(__file__, "linear.json")


def test_interp_quantizers_match_references(interp_report):
    quant = {k: v for k, v in interp_report.items() if k.startswith("quant/")}
    assert len(quant) == 8 and all(quant.values()), quant


def test_interp_int8_block_quantizer_configs_bit_identical(interp_report):
    cfg = {k: v for k, v in interp_report.items() if k.startswith("quantcfg/")}
    assert len(cfg) == 2 * len(qa.INT8_BLOCK_QUANT_SWEEP) and all(cfg.values()), cfg


def test_interp_linear_kernels_match_references(interp_report):
    lin = {k: v for k, v in interp_report.items() if k.startswith("linear/")}
    assert len(lin) == 2 * 4 * 2 * 2
    for key, r in lin.items():
        assert r["finite"] and r["shape"] and r["dtype"], key
        # int8 schemes: same integers, same fp32 multiply-adds -> equal up to fp32 rounding (and a bf16 cast).
        bound = 1e-6 if key.endswith(("float32/bias", "float32/nobias")) else 5e-3
        if "fp8" in key:  # e4m3 values identical; the dequantized fp32 GEMM sums in another order
            bound = max(bound, 1e-5)
        assert r["rel"] < bound, (key, r)


def test_interp_fp8_row_gemm_equals_the_fp8_row_linear(interp_report):
    """The GEMM a fused norm's quantized output goes to gives what fp8_row_linear gives on the norm's output."""
    pre = {k: v for k, v in interp_report.items() if k.startswith("prequant_fp8/")}
    assert len(pre) == 4 and all(pre.values()), pre


def _gelu_report(got: torch.Tensor, plain: torch.Tensor, dtype: torch.dtype) -> dict:
    """``got`` (GELU in the epilogue) against ``aten.gelu(plain)``; the error in units of dtype's eps times the
    GELU's input, since ``1 + tanh`` near 0 makes small outputs differ in low bits between tanh formulas (the
    kernel's has no cancellation there, PyTorch's ``1 + tanhf`` has)."""
    want = torch.nn.functional.gelu(plain, approximate="tanh")
    err = (got.float() - want.float()).abs() / (torch.finfo(dtype).eps * plain.float().abs().clamp_min(1e-3))
    return {"finite": bool(torch.isfinite(got).all()), "shape_dtype": got.shape == want.shape and got.dtype == dtype,
            "rel": _rel(got.float(), want.float()), "err_in_eps_of_input": err.max().item(),
            "neg_frac": (want < 0).float().mean().item()}


def test_interp_fp8_row_gemm_with_gelu_is_gelu_of_the_gemm(interp_report):
    """GELU (tanh) in the GEMM's epilogue gives ``aten.gelu`` of the unfused GEMM's output within two eps of the
    output dtype, measured on the GELU's input (fp32 differs by a few ulps of the tanh); every element written
    (outputs NaN-poisoned); the outputs span negative values (GELU's curved part), so a wrong formula would show."""
    rows = {k: v for k, v in interp_report.items() if k.startswith("gelu_fp8/")}
    assert len(rows) == 4
    for key, r in rows.items():
        assert r["finite"] and r["shape_dtype"] and r["neg_frac"] > 0.2, (key, r)
        assert r["err_in_eps_of_input"] <= 2 and r["rel"] < 1e-4, (key, r)


def test_interp_fp8_row_gemm_with_residual_is_the_residual_step(interp_report):
    """The residual step in the GEMM's epilogue (``h + out``, and ``h + out·gate`` with a gate row per batch
    element) gives the graph's own math on the unfused output: every element written (outputs NaN-poisoned),
    bit-equal under the interpreter (no FMA contraction there), and the residual really moved the output."""
    rows = {k: v for k, v in interp_report.items() if k.startswith("residual_fp8/")}
    assert len(rows) == 8
    for key, r in rows.items():
        assert r["finite"] and r["shape_dtype"] and r["equal_frac"] == 1.0 and r["rel"] == 0.0, (key, r)
        assert r["moved"] > 0.1, (key, r)


def test_fp8_row_gemm_residual_errors():
    """A residual of another shape or dtype, a gate that is not fp32 [N] / [B, 1, N], or a gate without a
    residual: one clear error each, from the reference and from the fake (what export sees)."""
    x, w, b = _inputs(8, 64, 32, seed=3)
    d = L.quantize_weight(w, "fp8-row")
    q, s = torch.ops.turbocompile.quant_fp8_row(x.reshape(2, 4, 64))
    args = (q, s, d["w_q"], d["w_scale"], b, torch.float32, "")
    h = torch.randn(2, 4, 32)
    for residual, gate, msg in [(h[:, :3], None, "residual must be torch.float32 (2, 4, 32)"),
                                (h.bfloat16(), None, "residual must be torch.float32 (2, 4, 32)"),
                                (h, torch.randn(3, 1, 32), "gate must be fp32 [32] or [B, 1, 32]"),
                                (h, torch.randn(2, 1, 32).double(), "gate must be fp32"),
                                (None, torch.randn(32), "with a residual; got torch.float32 (32,) and no residual")]:
        with pytest.raises(UnsupportedShapeError, match=re.escape(msg)):
            torch.ops.turbocompile.fp8_row_gemm(*args, residual, gate)
        with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(UnsupportedShapeError, match=re.escape(msg)):
            torch.ops.turbocompile.fp8_row_gemm(*args, residual, gate)


def test_interp_gemm_configs_agree(interp_report):
    cfg = {k: v for k, v in interp_report.items() if k.startswith(("config/", "rowscale_fp8/"))}
    assert len(cfg) >= 6
    # rescale mode 3 trades bit-faithfulness for one FFMA per element: the magic offset cancels at the end.
    assert all(v < (1e-3 if "_r3/" in k else 1e-5) for k, v in cfg.items()), cfg


# --------------------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cuda_op_matches_reference(scheme):
    x, w, b = _inputs(1000, 1536, 512, seed=6)
    x, w, b = x.cuda(), w.cuda(), b.cuda()
    d = L.quantize_weight(w, scheme)
    out = L.w8a8_linear(x, d["w_q"], d["w_scale"], b, scheme)
    ref = L.reference_linear(x, d["w_q"], d["w_scale"], b, scheme)
    assert _rel(out.float(), ref.float()) < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1000, 4099])  # (4099: a partial last row tile)
def test_cuda_fp8_row_gemm_gelu_epilogue(m):
    """The GELU epilogue of the TMA kernel against aten.gelu of the unfused GEMM, bf16, at the 1.3B FFN width."""
    x, w, b = _inputs(m, 1536, 8960, seed=m)
    x, w, b = x.cuda().bfloat16(), w.cuda(), b.cuda()
    d = L.quantize_weight(w, "fp8-row")
    q, s = qa.quant_fp8_row(x)
    plain = torch.ops.turbocompile.fp8_row_gemm(q, s, d["w_q"], d["w_scale"], b, torch.bfloat16)
    got = torch.ops.turbocompile.fp8_row_gemm(q, s, d["w_q"], d["w_scale"], b, torch.bfloat16, "gelu_tanh")
    r = _gelu_report(got, plain, torch.bfloat16)
    assert r["finite"] and r["shape_dtype"] and r["neg_frac"] > 0.2, r
    assert r["err_in_eps_of_input"] <= 2 and r["rel"] < 1e-3, r


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 2])
def test_cuda_fp8_row_gemm_residual_epilogue(batch):
    """The residual step in the TMA kernel's epilogue (pass ``fuse_residual``) against the graph's math on the
    unfused GEMM, bf16, at the 1.3B o-projection width with a partial last row tile: plain and gated (one gate row
    per batch element), after a GELU epilogue too; every element written (the GEMM output is fresh memory and
    the result must be finite and within one bf16 rounding of the reference: the kernel may contract h + out·gate
    into one FMA)."""
    m = 4099 * batch
    x, w, b = _inputs(m, 1536, 1536, seed=batch)
    x, w, b = x.cuda().bfloat16().reshape(batch, -1, 1536), w.cuda(), b.cuda()
    d = L.quantize_weight(w, "fp8-row")
    q, s = torch.ops.turbocompile.quant_fp8_row(x)
    torch.manual_seed(batch)
    h = torch.randn(batch, m // batch, 1536, device="cuda").bfloat16()
    gate = torch.randn(batch, 1, 1536, device="cuda")
    eps = torch.finfo(torch.bfloat16).eps
    for act in ("", "gelu_tanh"):
        plain = torch.ops.turbocompile.fp8_row_gemm(q, s, d["w_q"], d["w_scale"], b, torch.bfloat16, act)
        for g in (None, gate):
            got = torch.ops.turbocompile.fp8_row_gemm(q, s, d["w_q"], d["w_scale"], b, torch.bfloat16, act, h, g)
            ref = L.residual_update(plain, h, g)
            err = (got.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-2)
            assert got.shape == ref.shape and got.dtype == torch.bfloat16 and torch.isfinite(got).all()
            assert err.max().item() <= eps and (got == ref).float().mean().item() > 0.99, (act, g is None)


if __name__ == "__main__":  # the interpreter subprocess
    torch.manual_seed(0)
    write_report(_interpret_checks())
