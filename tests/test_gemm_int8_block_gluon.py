"""Gluon block-scaled int8 GEMM: input checks (CPU, no GPU touched) and accuracy on a Hopper GPU.

The GPU tests compare against an fp64 reference and the Triton ``gemm_block_scaled`` at shapes that exercise the
M tail (TMA zero-fill + masked store), M smaller than one tile, and odd/even/single K-block counts (the kernel's
loop is unrolled by two and has separate tails).
"""
from __future__ import annotations

import math

import pytest
import torch

from turbocompile.errors import GPUError, UnsupportedShapeError
from turbocompile.kernels import gemm_int8_block_gluon as G


def _inputs(m: int, k: int, n: int, seed: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    a_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    a_scale = torch.rand((math.ceil(m / 128), math.ceil(k / 128)), generator=g) * 2e-2 + 1e-3
    w_scale = torch.rand((math.ceil(n / 128), math.ceil(k / 128)), generator=g) * 2e-3 + 1e-4
    bias = torch.randn(n, generator=g)
    return [t.to(device) for t in (a_q, a_scale, w_q, w_scale, bias)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --------------------------------------------------------------------------------------------------------------
# Input checks: raised before any GPU work, so they run on CPU tensors
# --------------------------------------------------------------------------------------------------------------
def _bad_cases():
    a_q, a_s, w_q, w_s, b = _inputs(200, 256, 384, seed=0)
    a2, a2s, w2, w2s, _ = _inputs(200, 200, 384, seed=0)
    w3, w3s = _inputs(200, 256, 200, seed=0)[2:4]
    return {
        "K not a multiple of 128": ((a2, a2s, w2, w2s, None), "multiples of 128, got K=200 N=384"),
        "N not a multiple of 128": ((a_q, a_s, w3, w3s, None), "multiples of 128, got K=256 N=200"),
        "float operands": ((a_q.float(), a_s, w_q, w_s, None), "needs int8 A and W"),
        "K mismatch": ((a_q, a_s, w_q[:, :128].contiguous(), w_s[:, :1].contiguous(), None), "differ in K"),
        "non-contiguous A": ((a_q.t().contiguous().t(), a_s, w_q, w_s, None), "contiguous row-major"),
        "3-D A": ((a_q[None], a_s, w_q, w_s, None), "2-D A"),
        "A scale shape": ((a_q, a_s[:1], w_q, w_s, None), "activation scale must be float32 (2, 2)"),
        "W scale dtype": ((a_q, a_s, w_q, w_s.half(), None), "weight scale must be float32 (3, 2)"),
        "bias length": ((a_q, a_s, w_q, w_s, b[:10]), "bias must be a contiguous vector of 384"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_unsupported_inputs_are_one_line_errors(case):
    args, msg = _bad_cases()[case]
    with pytest.raises(UnsupportedShapeError) as e:
        G.gemm_int8_block_gluon(*args)
    text = str(e.value)
    assert msg in text and "\n" not in text and len(text) < 200, text


def test_unsupported_options_and_out():
    a_q, a_s, w_q, w_s, b = _inputs(130, 256, 256, seed=1)
    for kw, msg in [({"out_dtype": torch.int32}, "writes bf16, fp16 or fp32"),
                    ({"block_n": 32}, "block_n 64/128"),
                    ({"rescale": 3}, "rescale 0/1"),
                    ({"out": torch.empty(130, 128, dtype=torch.bfloat16)}, "out must be a contiguous")]:
        with pytest.raises(UnsupportedShapeError, match=msg):
            G.gemm_int8_block_gluon(a_q, a_s, w_q, w_s, b, **kw)


def test_valid_cpu_input_asks_for_a_gpu():
    with pytest.raises(GPUError, match="needs CUDA tensors on a Hopper GPU"):
        G.gemm_int8_block_gluon(*_inputs(130, 256, 256, seed=2))


def test_reference_matches_per_block_definition():
    a_q, a_s, w_q, w_s, b = _inputs(130, 384, 256, seed=3)
    want = torch.zeros(130, 256, dtype=torch.float64)
    for i in range(130):
        for kb in range(3):
            blk = (a_q[i, kb * 128:(kb + 1) * 128].double() @ w_q[:, kb * 128:(kb + 1) * 128].double().t())
            want[i] += blk * a_s[i // 128, kb].double() * w_s.double()[torch.arange(256) // 128, kb]
    want += b.double()
    assert torch.allclose(G.reference(a_q, a_s, w_q, w_s, b), want, rtol=1e-12, atol=1e-9)
    assert torch.equal(G.reference(a_q, a_s, w_q, w_s, b, rows=slice(100, 130)),
                       G.reference(a_q, a_s, w_q, w_s, b)[100:130])


# --------------------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA; skipped on a GPU that is not Hopper)
# --------------------------------------------------------------------------------------------------------------
def _need_hopper():
    if not G.available():
        pytest.skip("needs a Hopper (sm_90) GPU and Triton's Gluon Hopper API")


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", [(1000, 512, 384),   # M tail, 4 K blocks (even: loop + two-block tail)
                                   (50, 256, 128),     # M smaller than one tile, 2 K blocks
                                   (130, 384, 256),    # 3 K blocks (odd tail)
                                   (7, 128, 128),      # one K block, no loop
                                   (300, 1152, 640),   # 9 K blocks: several trips round the 4 stages
                                   (4000, 384, 1280),  # 320 tiles: more programs than SMs
                                   (9000, 128, 640)])  # 355 tiles of one K block
@pytest.mark.parametrize("with_bias", [True, False])
def test_cuda_matches_reference(m, k, n, with_bias):
    _need_hopper()
    from turbocompile.kernels.gemm_int8_block import gemm_block_scaled

    a_q, a_s, w_q, w_s, b = _inputs(m, k, n, seed=m + k + n, device="cuda")
    b = b if with_bias else None
    ref = G.reference(a_q, a_s, w_q, w_s, b)
    out32 = torch.full((m, n), float("nan"), device="cuda")
    G.gemm_int8_block_gluon(a_q, a_s, w_q, w_s, b, torch.float32, out=out32)
    out16 = G.gemm_int8_block_gluon(a_q, a_s, w_q, w_s, b)
    tri = gemm_block_scaled(a_q, a_s, w_q, w_s, b, torch.float32)
    torch.cuda.synchronize()
    assert not torch.isnan(out32).any()
    assert out16.dtype == torch.bfloat16 and out16.shape == (m, n)
    assert _rel(out32, ref) < 1e-6
    assert _rel(out16.float(), ref) < 5e-3
    assert _rel(out32, tri) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [{"rescale": 1}, {"num_stages": 3}, {"block_n": 64}, {"num_stages": 2},
                                {"num_stages": 5}])
def test_cuda_variants_match_reference(kw):
    _need_hopper()
    a_q, a_s, w_q, w_s, b = _inputs(333, 1024, 256, seed=7, device="cuda")
    out = torch.full((333, 256), float("nan"), device="cuda")
    G.gemm_int8_block_gluon(a_q, a_s, w_q, w_s, b, torch.float32, out=out, **kw)
    assert not torch.isnan(out).any()
    assert _rel(out, G.reference(a_q, a_s, w_q, w_s, b)) < 1e-6
    # many programs, bf16 out, every element written
    a_q, a_s, w_q, w_s, b = _inputs(3000, 512, 1024, seed=9, device="cuda")
    out16 = torch.full((3000, 1024), float("nan"), device="cuda", dtype=torch.bfloat16)
    G.gemm_int8_block_gluon(a_q, a_s, w_q, w_s, b, torch.bfloat16, out=out16, **kw)
    assert not torch.isnan(out16).any()
    assert _rel(out16.float(), G.reference(a_q, a_s, w_q, w_s, b)) < 5e-3


@pytest.mark.gpu
def test_cuda_empty_m():
    _need_hopper()
    a_q, a_s, w_q, w_s, _ = _inputs(0, 256, 128, seed=8, device="cuda")
    assert G.gemm_int8_block_gluon(a_q, a_s, w_q, w_s).shape == (0, 128)
