"""rms_norm + RoPE fused: the reference is the Wan attention's own math, the op's errors, and the Triton kernel
under TRITON_INTERPRET=1 (in a subprocess that runs this file as a script) and on a GPU."""
from __future__ import annotations

import pytest
import torch

from turbocompile.errors import InputError, UnsupportedShapeError
from turbocompile.kernels import rms_norm_rope as R

from interp_subprocess import report_fixture, write_report  # (tests/ is on sys.path under pytest and as a script)

EPS = 1e-6


def _case(b: int, l: int, heads: int, head_dim: int, seed: int, dtype=torch.bfloat16, device="cpu"):
    """x as the model has it (a strided view into a fused q/k/v output), a weight, and tables [1, L, 1, D/2]."""
    g = torch.Generator().manual_seed(seed)
    c, half = heads * head_dim, head_dim // 2
    qkv = (torch.randn(b, l, 3 * c, generator=g) * 2 + 0.5).to(dtype)
    w = torch.randn(c, generator=g)
    ang = torch.rand(l, half, generator=g, dtype=torch.float64) * 6.3
    cos, sin = ang.cos().float().reshape(1, l, 1, half), ang.sin().float().reshape(1, l, 1, half)
    return [t.to(device) for t in (qkv[..., c:2 * c], w, cos, sin)]


def _ulps_bf16(a: torch.Tensor, b: torch.Tensor) -> float:
    spacing = torch.finfo(torch.bfloat16).eps * b.float().abs().clamp_min(1e-3)
    return ((a.float() - b.float()).abs() / spacing).max().item()


def test_reference_is_the_wan_attention_norm_and_rotation():
    """The reference equals diffusers' WanAttnProcessor math (norm_q, then apply_rotary_emb on [B, L, H, D]) bit
    for bit, in bf16 and fp32."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: F401 (the real source)

    for dtype in (torch.bfloat16, torch.float32):
        x, w, cos, sin = _case(2, 33, 3, 64, seed=1, dtype=dtype)
        norm = torch.nn.RMSNorm(x.shape[-1], eps=EPS, elementwise_affine=True)
        with torch.no_grad():
            norm.weight.copy_(w)
        r = norm(x.float()).to(dtype) if dtype != torch.float32 else norm(x)
        want = R._wan_rope(r, cos, sin, 3).flatten(2)
        got = torch.ops.turbocompile.rms_norm_rope(x, w, EPS, cos, sin)
        assert got.dtype == dtype and got.shape == x.shape
        assert _ulps_bf16(got, want) <= 1 if dtype == torch.bfloat16 else torch.allclose(got, want, atol=1e-5)
        # and exactly the unfused turbocompile ops the graph had before the pass
        unfused = R._wan_rope(torch.ops.turbocompile.rms_norm(x, w, EPS), cos, sin, 3).flatten(2)
        assert torch.equal(got, unfused)
    torch.library.opcheck(torch.ops.turbocompile.rms_norm_rope.default, (x, w, EPS, cos, sin))


def test_errors_are_one_line():
    x, w, cos, sin = _case(1, 8, 2, 32, seed=2)
    op = torch.ops.turbocompile.rms_norm_rope
    with pytest.raises(InputError, match="cos must be float32"):
        op(x, w, EPS, cos.bfloat16(), sin)
    with pytest.raises(UnsupportedShapeError, match=r"sin must have shape \(8, 16\) or \(1, 8, 1, 16\)"):
        op(x, w, EPS, cos, sin[:, :4])
    with pytest.raises(UnsupportedShapeError, match=r"weight must have shape \(64,\)"):
        op(x, w[:10], EPS, cos, sin)
    with pytest.raises(UnsupportedShapeError, match="x must be"):
        op(x[0], w, EPS, cos, sin)
    with pytest.raises(UnsupportedShapeError, match="half a head_dim dividing C = 64"):
        op(x, w, EPS, torch.zeros(1, 8, 1, 24), torch.zeros(1, 8, 1, 24))


def test_kernel_shape_limits():
    """Shapes the kernel cannot hold (a row over MAX_C, a head_dim that is not a power of two) go to the reference
    on CUDA instead of failing at run time; the launcher itself says why."""
    x, w, cos, sin = _case(1, 4, 2, 48, seed=4)
    assert not R.kernel_supports(x, cos)
    x2, _, cos2, _ = _case(1, 4, 2, 64, seed=4)
    assert R.kernel_supports(x2, cos2) is (R.triton is not None)
    if R.triton is not None:
        with pytest.raises(UnsupportedShapeError, match="power-of-two head_dim"):
            R._launch(x, w, EPS, cos, sin)


# --------------------------------------------------------------------------------------------------------------
# The Triton kernel under the interpreter
# --------------------------------------------------------------------------------------------------------------
SHAPES = [(2, 37, 3, 64), (1, 5, 12, 128), (1, 1, 2, 128), (3, 4, 5, 16)]  # heads not a power of two, L = 1


def _interpret_checks() -> dict:
    real_empty = torch.empty
    torch.empty = lambda *a, **k: real_empty(*a, **k).fill_(float("nan"))  # poison every output
    rep: dict = {}
    for b, l, heads, head_dim in SHAPES:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            x, w, cos, sin = _case(b, l, heads, head_dim, seed=b * l + heads, dtype=dtype)
            got = R.launch_triton(x, w, EPS, cos, sin)
            want = R.rms_norm_rope_ref(x, w, EPS, cos, sin)
            rep[f"{b}x{l}x{heads}x{head_dim}/{str(dtype)[6:]}"] = {
                "finite": bool(torch.isfinite(got).all()), "shape": got.shape == want.shape,
                "dtype": got.dtype == want.dtype, "equal": bool(torch.equal(got, want)),
                "ulps": ((got.float() - want.float()).abs()
                         / (torch.finfo(dtype).eps * want.float().abs().clamp_min(1e-3))).max().item(),
                "rel": ((got.double() - want.double()).norm() / want.double().norm()).item()}
    x, w, cos, sin = _case(1, 6, 2, 64, seed=5)  # [L, D/2] tables are taken as well as [1, L, 1, D/2]
    rep["2d_tables"] = bool(torch.equal(R.launch_triton(x, w, EPS, cos[0, :, 0], sin[0, :, 0]),
                                        R.rms_norm_rope_ref(x, w, EPS, cos, sin)))
    torch.empty = real_empty
    return rep


interp_report = report_fixture(__file__, "rms_norm_rope.json")


def test_interp_kernel_matches_reference(interp_report):
    """Every element written (outputs are NaN-poisoned) and equal to the reference within one rounding step of the
    output dtype: the normalized row is rounded to x's dtype before the rotation in both, but the kernel sums the
    squares in another order and takes 1/sqrt instead of rsqrt, which can move a value across a rounding boundary
    (seen in fp16, a few elements; bf16 came out bit-equal at these shapes). fp32 is compared by relative L2."""
    assert len(interp_report) == len(SHAPES) * 3 + 1 and interp_report["2d_tables"]
    for key, r in interp_report.items():
        if key == "2d_tables":
            continue
        assert r["finite"] and r["shape"] and r["dtype"], (key, r)
        if key.endswith("float32"):  # (a rotation that cancels makes ulps of the output meaningless here)
            assert r["rel"] < 1e-6, (key, r)
        else:
            assert r["ulps"] <= 1 and r["rel"] < 1e-5, (key, r)


@pytest.mark.gpu
def test_cuda_kernel_matches_reference_at_wan_shapes():
    for heads in (12, 40):  # 1.3B and 14B widths, short sequences
        x, w, cos, sin = _case(1, 1000, heads, 128, seed=heads, device="cuda")
        got = torch.ops.turbocompile.rms_norm_rope(x, w, EPS, cos, sin)
        want = R.rms_norm_rope_ref(x, w, EPS, cos, sin)
        unfused = R._wan_rope(torch.ops.turbocompile.rms_norm(x, w, EPS), cos, sin, heads).flatten(2)
        # measured on the pair's magnitude (R.pair_error says why): one rounding step of the normalized input,
        # which the GPU's 1/sqrt and sum order can move as the rms_norm kernel's do, is at most 1.5
        assert torch.isfinite(got).all() and R.pair_error(got, want) <= 2, heads
        assert R.pair_error(got, unfused) <= 2, heads
        assert (got == want).float().mean() > 0.5, heads  # and most elements are the same bits


if __name__ == "__main__":  # the interpreter subprocess
    write_report(_interpret_checks())
