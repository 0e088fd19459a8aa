"""Gluon block-scaled int8 GEMM: input checks (CPU, no GPU touched) and accuracy on a Hopper GPU.

The GPU tests compare against an fp64 reference and the Triton ``gemm_block_scaled`` at shapes that exercise the
M tail (TMA zero-fill + masked store), M smaller than one tile, and odd/even/single K-block counts (the kernel's
loop is unrolled by two and has separate tails).
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

from turbocompile.errors import GPUError, UnsupportedShapeError
from turbocompile.kernels import gemm_int8_block_gluon as G

sys.path.insert(0, str(Path(__file__).parent))
from cubin_tools import cuobjdump  # noqa: E402


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
                    ({"rescale": 5}, "rescale 0-4"),
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


def _sass_main_loop(sass: str) -> list[str]:
    """The instructions of the K loop in a ``cuobjdump -sass`` listing: the shortest backward branch whose span
    holds a wgmma (the mbarrier retry branches jump back from the end of the kernel, over the whole loop)."""
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    best = None
    for addr, text in ins:
        m = re.search(r"\bBRA\s+0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
            if any("GMMA" in t for t in body) and (best is None or len(body) < len(best)):
                best = body
    return best or []


@pytest.mark.parametrize("rescale,block_n", [(2, 128), (3, 128), (4, 128), (2, 64)])
def test_split_rescale_compiles_for_sm90a_without_spills_or_moves(rescale, block_n):
    """The split conversions (:func:`_fold_split`) compiled for sm_90a on the CPU: no stack frame (spills), the
    wgmma kept asynchronous (one group in flight: only ``DEPBAR.LE gsb0, 0x1`` in the loop), and both paths in
    the loop (``I2FP`` and the magic-number integer add + FADD) with no shuffles or byte permutes (the halves are
    registers of the accumulator layout, not moved data)."""
    if G.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    kernel = G.compile_for_sm90(rescale=rescale, block_n=block_n)
    assert kernel.asm["ptx"].count("wgmma.wait_group.sync.aligned 1;") == 8
    dumps = cuobjdump(kernel, "--dump-resource-usage", "-sass")
    if dumps is None:
        pytest.skip("Triton ships no cuobjdump here to read the SASS with")
    usage, sass = dumps
    assert int(re.search(r"STACK:(\d+)", usage).group(1)) == 0, usage
    loop = _sass_main_loop(sass)
    warpgroups = 2 if block_n == 128 else 1  # 8 or 4 warps; the 128 rows are m64 wgmmas, 4 k32 steps per K block
    assert sum("GMMA" in t for t in loop) == 2 * 4 * 2 // warpgroups  # two K blocks per loop trip
    assert {re.search(r"DEPBAR\S*\s+\S+\s+(\S+)", t).group(1) for t in loop if "DEPBAR" in t} == {"0x1"}
    i2f = sum(t.startswith("I2FP.F32.S32") for t in loop)
    magic = sum(bool(re.match(r"(IADD3|VIADD|IMAD\.IADD)\b.*0x4b400000", t)) for t in loop)
    fadd = sum(bool(re.match(r"FADD\b.*-12582912", t)) for t in loop)
    per_trip = 2 * 128 * block_n // (128 * warpgroups)  # values a thread converts per trip (64 per K block)
    magic_quarters = {2: 2, 3: 3, 4: 1}[rescale]
    assert i2f == per_trip * (4 - magic_quarters) // 4
    assert magic == fadd == per_trip - i2f
    assert not any(t.split()[0] in ("PRMT", "SHFL.IDX", "SHFL.BFLY", "STS", "LDS") for t in loop)


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
                                   (1, 256, 128),      # M = 1 (Triton compiles a kernel specialized to a 1)
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
@pytest.mark.parametrize("kw", [{"rescale": 1}, {"rescale": 2}, {"rescale": 3}, {"rescale": 4}, {"num_stages": 3},
                                {"block_n": 64}, {"num_stages": 2}, {"num_stages": 5}, {"rescale": 2, "block_n": 64}])
def test_cuda_variants_match_reference(kw):
    _need_hopper()
    a_q, a_s, w_q, w_s, b = _inputs(333, 1024, 256, seed=7, device="cuda")
    out = torch.full((333, 256), float("nan"), device="cuda")
    G.gemm_int8_block_gluon(a_q, a_s, w_q, w_s, b, torch.float32, out=out, **kw)
    assert not torch.isnan(out).any()
    assert _rel(out, G.reference(a_q, a_s, w_q, w_s, b)) < 1e-6
    if "rescale" in kw:  # every int -> float conversion is exact: the same bits as the I2FP-only default
        kw0 = {key: v for key, v in kw.items() if key != "rescale"}
        assert torch.equal(out, G.gemm_int8_block_gluon(a_q, a_s, w_q, w_s, b, torch.float32, **kw0))
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
