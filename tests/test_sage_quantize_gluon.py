"""The Gluon int8 quantizer of the Sage prologue (Q with φ(q)/den for SLA's linear branch, K minus its mean).

CPU: its sm_90a compile (no spills; registers and shared memory leave room for the programs per SM its config
counts on), how blocks are split over programs, the reasons it declines. Hopper: the same bytes as the Triton
quantizer (int8 values and scales equal, pooled means and φ/den within fp32 summation order), at lengths that are
not multiples of a block, in both memory orders, bf16 and fp16, head_dim 64 and 128, every output element written.
"""
from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch

from turbocompile.kernels import sage_quantize_gluon as QG
from turbocompile.kernels.sage_attention_gluon import available as gluon_available

ON_HOPPER = gluon_available()


# --------------------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("n_blocks,heads,sms,per_sm", [(256, 12, 132, 2), (512, 12, 132, 3), (1, 1, 132, 2),
                                                       (591, 40, 132, 2), (7, 300, 132, 3)])
def test_blocks_per_program_fit_one_wave(n_blocks, heads, sms, per_sm):
    bpp = QG.blocks_per_program(n_blocks, heads, sms, per_sm)
    programs = -(-n_blocks // bpp) * heads
    assert bpp >= 1
    assert programs <= max(heads, per_sm * sms)  # one wave (or one program per head where heads alone exceed it)


def test_supported_says_why_not(monkeypatch):
    x = torch.empty(1, 2, 64, 128, dtype=torch.bfloat16)
    assert QG.supported(x, 64) in ("needs an sm_90 GPU", "needs Triton's Gluon and a GPU (not the interpreter)")
    monkeypatch.setenv("TURBOCOMPILE_QUANT_KERNEL", "triton")
    assert QG.supported(x, 64) == "TURBOCOMPILE_QUANT_KERNEL=triton"


@pytest.mark.parametrize("blk,has_mean,linear", [(128, True, False), (64, False, True), (64, False, False)])
def test_kernel_compiles_for_sm90a_without_spills_at_its_occupancy(blk, has_mean, linear):
    if QG.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    from triton.backends.nvidia.compiler import get_ptxas

    warps, stages, per_sm = QG.CONFIGS[blk]
    kernel = QG.compile_for_sm90(blk=blk, has_mean=has_mean, linear=linear)
    ptx = kernel.asm["ptx"]
    assert ".target sm_90a" in ptx and "cp.async.bulk.tensor.2d" in ptx  # TMA loads
    assert kernel.metadata.shared * per_sm <= 228 * 1024  # the programs per SM fit its shared memory
    ptxas = get_ptxas(90).path
    if not os.path.exists(ptxas):
        pytest.skip("Triton ships no ptxas here to read registers and spills with")
    src = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"quant_gluon_{os.getpid()}_{blk}_{int(linear)}.ptx")
    with open(src, "w") as f:
        f.write(ptx)
    try:
        res = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", src, "-o", os.devnull], capture_output=True,
                             text=True, timeout=300)
    finally:
        os.unlink(src)
    report = res.stdout + res.stderr
    assert res.returncode == 0, report
    assert "0 bytes spill stores, 0 bytes spill loads" in report, report
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    assert regs * 32 * warps * per_sm <= 65536, report  # the programs per SM fit the register file


# --------------------------------------------------------------------------------------------------------- GPU
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="needs an sm_90 GPU (Hopper) and Triton's Gluon")


@pytest.mark.parametrize("n,d,dtype,layout", [(1, 128, torch.bfloat16, "bhld"), (63, 128, torch.bfloat16, "blhd"),
                                              (129, 64, torch.float16, "bhld"), (1000, 128, torch.float16, "blhd"),
                                              (4097, 128, torch.bfloat16, "bhld"),
                                              (32760, 128, torch.bfloat16, "blhd")])
@pytest.mark.gpu
@needs_hopper
def test_same_bytes_as_the_triton_quantizer(n, d, dtype, layout, monkeypatch):
    from turbocompile.kernels.sage_attention import _quantize_int8_into, structured_qkv
    from turbocompile.kernels.sla import linear_branch_stats

    dev = torch.device("cuda")
    q, k, v = structured_qkv(2, 3, n, d, dtype, dev, seed=n + d)
    k = k + 0.5 * torch.randn(1, 1, 1, d, device=dev, dtype=dtype)  # a channel offset: the mean matters
    if layout == "blhd":  # (B, L, H, D) in memory, as a Wan attention passes it
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert QG.supported(q, 64) is None and QG.supported(k, 128) is None
    g = torch.Generator().manual_seed(n)
    w, b = (torch.randn(d, d, generator=g) * 0.05).to(dev), (torch.randn(d, generator=g) * 0.05).to(dev)
    (_, z, _), mom = linear_branch_stats(k, v, w, b)
    n_pad = -(-n // 128) * 128

    def quantize(x, mean, blk, linear, fill):
        # outputs pre-filled with a different value per kernel: an element one of them leaves unwritten differs
        xq = torch.full((2, 3, n_pad, d), fill, dtype=torch.int8, device=dev)
        nb = -(-n // blk)
        sc = torch.full((2, 3, nb), float(fill), device=dev)
        pool = torch.full((2, 3, nb, d), float(fill), device=dev)
        phi = torch.full((2, 3, n_pad, d), float(fill), dtype=torch.bfloat16, device=dev) if linear else None
        _quantize_int8_into(x, mean, xq, sc, pool, blk, 0.125, z if linear else None, phi)
        return xq, sc, pool, phi

    for x, mean, blk, linear in ((q, None, 64, True), (q, None, 64, False), (k, mom["k_mean"], 128, False)):
        monkeypatch.delenv("TURBOCOMPILE_QUANT_KERNEL", raising=False)
        xq_g, sc_g, pool_g, phi_g = quantize(x, mean, blk, linear, 77)
        monkeypatch.setenv("TURBOCOMPILE_QUANT_KERNEL", "triton")
        xq_t, sc_t, pool_t, phi_t = quantize(x, mean, blk, linear, -77)
        assert torch.equal(xq_g, xq_t), (blk, linear)  # int8 values and the zero padding
        assert torch.equal(sc_g, sc_t), (blk, linear)
        assert float((pool_g - pool_t).abs().max() / pool_t.abs().max()) <= 1e-5  # fp32 sums in another order
        if linear:  # within one bf16 rounding where the fp32 row sums round apart
            assert float((phi_g.float() - phi_t.float()).abs().max() / phi_t.float().abs().max()) <= 1e-2
