"""Gluon Sage attention kernel: the V key order it relies on (CPU, Triton interpreter) and its accuracy on Hopper.

The kernel reads P straight from the score registers as the FP8 P·V operand, which is only right if V's keys are
stored in the matching order; the CPU tests pin that order (a permutation inside each 32-key group, written by the
V quantizer). The GPU tests compare the kernel with the Triton kernel and the Sage-emulating PyTorch reference,
dense and block-sparse with the SLA linear branch, at lengths that are not multiples of any tile, with outputs
poisoned with NaN so an unwritten element fails.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from turbocompile.errors import UnsupportedShapeError
from turbocompile.kernels import load_ops
from turbocompile.kernels import sage_attention_gluon as G
from turbocompile.kernels.sage_attention import (
    attention_fp32_reference,
    block_attention_reference,
    block_attention_triton,
    structured_qkv,
)

sys.path.insert(0, os.path.dirname(__file__))
from cubin_tools import cuobjdump  # noqa: E402

load_ops()
ON_HOPPER = G.available()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def _run_interpreted(script: str) -> tuple[object, str]:
    """Run ``script`` in a fresh interpreter under TRITON_INTERPRET=1 (set before Triton is imported); returns the
    JSON it printed after ``RESULT`` and its stderr."""
    pytest.importorskip("triton", reason="Triton is not installed")
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):]), proc.stderr


# --------------------------------------------------------------------------------------------------------- CPU
def test_wgmma_key_order_is_a_permutation_inside_each_32_key_group():
    pos = G.wgmma_key_order(128)
    assert sorted(pos.tolist()) == list(range(128))
    assert torch.equal(pos // 32, torch.arange(128) // 32)  # no key leaves its group
    # the four keys thread q holds in one group (2q, 2q+1, 2q+8, 2q+9) land on its operand bytes 4q .. 4q+3
    for q in range(4):
        assert pos[[2 * q, 2 * q + 1, 2 * q + 8, 2 * q + 9]].tolist() == [4 * q, 4 * q + 1, 4 * q + 2, 4 * q + 3]
        assert pos[[16 + 2 * q, 17 + 2 * q, 24 + 2 * q, 25 + 2 * q]].tolist() == [16 + 4 * q + i for i in range(4)]


_QUANT_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from turbocompile.kernels.sage_attention import sage_quantize_triton, structured_qkv
    from turbocompile.kernels.sage_attention_gluon import wgmma_key_order
    out = []
    for n in (1, 45, 200):
        q, k, v = structured_qkv(1, 2, n, 64, torch.bfloat16, seed=n)
        nat = sage_quantize_triton(q, k, v, 64, 128)
        wg = sage_quantize_triton(q, k, v, 64, 128, v_order="wgmma")
        pos = wgmma_key_order(nat["v"].shape[-1])
        moved = torch.empty_like(nat["v"].view(torch.uint8))
        moved[..., pos] = nat["v"].view(torch.uint8)
        out.append({"n": n, "flags": [nat["v_wgmma_order"], wg["v_wgmma_order"]],
                    "same_bytes": bool(torch.equal(moved, wg["v"].view(torch.uint8))),
                    "changed": bool(not torch.equal(nat["v"].view(torch.uint8), wg["v"].view(torch.uint8))),
                    "q_same": bool(torch.equal(nat["q"], wg["q"]) and torch.equal(nat["k"], wg["k"]))})
    print("RESULT" + json.dumps(out))
""")


def test_v_quantizer_writes_the_wgmma_key_order_interpreted():
    res, _ = _run_interpreted(_QUANT_SCRIPT)
    for r in res:
        assert r["flags"] == [False, True] and r["same_bytes"] and r["q_same"], r
        if r["n"] > 1:
            assert r["changed"], r  # the permutation really moved bytes (one token leaves only zeros to move)


_FALLBACK_SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from turbocompile.kernels import sage_attention_gluon as G
    from turbocompile.kernels.sage_attention import (block_attention_reference, block_attention_triton,
                                                     sage_kernel_for, sage_quantize_triton, structured_qkv)

    def broken(*args, **kwargs):  # what an incompatible Triton does at the first launch
        raise AttributeError("async_copy_global_to_shared has been removed; call async_load instead")

    G.supported = lambda q, blk_q, blk_k: None if G.GUARD.disabled is None else "off"  # as on a Hopper GPU
    G.sage_attention_gluon = broken
    q, k, v = structured_qkv(1, 2, 100, 64, torch.bfloat16, seed=3)
    r = {"choice_before": sage_kernel_for(q, 64, 128)}
    # sage_sla: the pass over Q has written the linear branch into out before the Gluon launch fails; the Triton
    # kernel must still give the whole result
    from turbocompile.kernels.sage_sla import sage_sla_reference, sage_sla_triton
    w, b = torch.randn(64, 64) * 0.05, torch.randn(64) * 0.05
    o = sage_sla_triton(q, k, v, w, b, 0.5, 64, 128, out=torch.full_like(q, float("nan")))
    ref = sage_sla_reference(q, k, v, w, b, 0.5, 64, 128)
    r["sla_rel"] = float((o.double() - ref.double()).norm() / ref.double().norm())
    r["sla_nan"] = bool(o.isnan().any())
    r["sla_disabled"] = G.GUARD.disabled
    G.GUARD.disabled = None
    quant = sage_quantize_triton(q, k, v, 64, 128, v_order="wgmma")
    o = block_attention_triton(q, k, v, None, 64, 128, sage=True, quant=quant, out=torch.full_like(q, float("nan")))
    ref = block_attention_reference(q, k, v, None, 64, 128, sage=True)
    r["rel"] = float((o.double() - ref.double()).norm() / ref.double().norm())
    r["nan"] = bool(o.isnan().any())
    r["disabled"] = G.GUARD.disabled
    r["choice_after"] = sage_kernel_for(q, 64, 128)
    G.GUARD.disabled, G.GUARD.launched = None, True  # once a launch has worked, a failure is a real error
    try:
        block_attention_triton(q, k, v, None, 64, 128, sage=True, quant=quant)
        r["after_success"] = "no error"
    except AttributeError as exc:
        r["after_success"] = "raised"
    print("RESULT" + json.dumps(r))
""")


def test_failed_first_gluon_launch_falls_back_to_triton_interpreted():
    """An incompatible Triton (Gluon is experimental) must not break attention: the first failed launch switches
    the Gluon kernel off for the process, V is re-laid out, the Triton kernel gives the result. After a launch
    has succeeded, a failure propagates."""
    r, stderr = _run_interpreted(_FALLBACK_SCRIPT)
    assert r["choice_before"] == "gluon" and r["choice_after"] == "triton", r  # (supported() faked to say yes)
    assert not r["nan"] and r["rel"] <= 1e-2, r
    assert not r["sla_nan"] and r["sla_rel"] <= 1e-2, r  # linear branch already in out, then the fallback
    assert r["sla_disabled"].startswith("AttributeError: async_copy_global_to_shared"), r
    assert r["disabled"].startswith("AttributeError: async_copy_global_to_shared has been removed"), r
    assert r["after_success"] == "raised", r
    assert "using the Triton kernel from now on" in stderr


def test_gluon_guard_switches_off_only_before_a_success(caplog):
    from turbocompile.kernels.gluon_guard import GluonGuard

    g = GluonGuard("demo", "set X=1")
    with caplog.at_level("WARNING"):
        assert g.launch_failed(RuntimeError("PassManager::run failed\nloc: error: bad op"))
    assert g.disabled == "RuntimeError: loc: error: bad op"
    assert "Gluon demo kernel failed to run on this Triton" in caplog.text and "(set X=1)" in caplog.text
    assert "using the Triton kernel from now on" in caplog.text
    g3 = GluonGuard("demo3", fallback="the Gluon attention kernel")
    with caplog.at_level("WARNING"):
        assert g3.launch_failed(RuntimeError("bad op"))
    assert "Gluon demo3 kernel failed to run on this Triton (RuntimeError: bad op); using the Gluon attention kernel" \
        in caplog.text
    g2 = GluonGuard("demo")
    assert not g2.launch_failed(torch.cuda.OutOfMemoryError("out of memory")) and g2.disabled is None
    g2.succeeded()
    assert not g2.launch_failed(RuntimeError("illegal memory access")) and g2.disabled is None


_LINEAR_FALLBACK_SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from turbocompile.kernels import gemm_int8_block_gluon as GG
    from turbocompile.kernels import linear_w8a8 as L

    def broken(*args, **kwargs):
        raise TypeError("warpgroup_mma() got an unexpected keyword argument 'is_async'")

    GG.available = lambda: GG.GUARD.disabled is None  # as on a Hopper GPU, until switched off
    GG.check_inputs = lambda *args, **kwargs: None
    GG.gemm_int8_block_gluon = broken
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 256, generator=g).to(torch.bfloat16)
    w = torch.randn(128, 256, generator=g)
    wq = L.quantize_weight(w, "int8-block")
    b = torch.randn(128, generator=g)
    out = L.cuda_linear(x, wq["w_q"], wq["w_scale"], b, "int8-block", backend="gluon")
    ref = L.reference_linear(x, wq["w_q"], wq["w_scale"], b, "int8-block")
    r = {"rel": float((out.double() - ref.double()).norm() / ref.double().norm()), "disabled": GG.GUARD.disabled}
    print("RESULT" + json.dumps(r))
""")


def test_failed_first_gluon_gemm_launch_falls_back_to_triton_interpreted():
    r, _ = _run_interpreted(_LINEAR_FALLBACK_SCRIPT)
    assert r["rel"] <= 1e-2, r
    assert r["disabled"].startswith("TypeError: warpgroup_mma() got an unexpected keyword"), r


def test_bad_v_order_is_rejected():
    from turbocompile.kernels.sage_attention import sage_quantize_triton

    q, k, v = structured_qkv(1, 1, 8, 64)
    with pytest.raises(ValueError, match="v_order must be 'natural' or 'wgmma'"):
        sage_quantize_triton(q, k, v, 64, 128, v_order="transposed")


def test_gluon_kernel_refuses_natural_order_v():
    quant = {"v_wgmma_order": False}
    with pytest.raises(UnsupportedShapeError, match="needs V quantized in wgmma key order"):
        G.sage_attention_gluon(quant, 8, 8, torch.empty(1), None, 64, 128)


def test_kernel_choice_env_config_and_refusals(monkeypatch):
    from turbocompile.errors import InputError
    from turbocompile.kernels.sage_attention import sage_kernel_for

    q, k, v = structured_qkv(1, 1, 8, 128)
    assert sage_kernel_for(q, 64, 128) == "triton"  # CPU tensors (interpreter or reference), on any machine
    assert sage_kernel_for(q, 64, 128, config=(64, 128, 4, 3)) == "triton"  # an explicit Triton config wins
    monkeypatch.setenv("TURBOCOMPILE_SAGE_KERNEL", "triton")
    assert sage_kernel_for(q, 64, 128) == "triton"
    with pytest.raises(InputError, match="unknown Sage attention kernel 'cuda'"):
        block_attention_triton(q, k, v, None, 64, 128, sage=True, kernel="cuda")
    with pytest.raises(UnsupportedShapeError, match="cannot read V quantized in wgmma key order"):
        block_attention_triton(q, k, v, None, 64, 128, sage=True, quant={"v_wgmma_order": True}, kernel="triton")
    with pytest.raises(UnsupportedShapeError, match="Gluon attention kernel cannot run this call"):
        block_attention_triton(q, k, v, None, 64, 128, sage=True, kernel="gluon")


def test_kernel_is_not_specialized_on_its_lengths():
    """Lq, Lk and T (tiles per LUT row) must not be specialized: the kernel Triton compiled for Lk == 1 wrote NaN
    into random rows on an H200 (docs/kernels-attention.md); a launch with a length of 1 must run the generic
    kernel, which the GPU test at Lk = 1 checks."""
    if G.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    params = {p.name: p for p in G._sage_attn_fwd_gluon.params}
    assert all(params[name].do_not_specialize for name in ("Lq", "Lk", "T"))
    assert not params["H"].do_not_specialize  # the others keep Triton's specialization


def test_supported_says_why_not():
    q = torch.empty(1, 1, 8, 128)
    why = G.supported(q, 64, 128)
    assert why == ("tensors are on cpu" if ON_HOPPER else "Gluon's Hopper kernel needs an sm_90 GPU")


@pytest.mark.parametrize("sparse,linear,block_m,phi_pre", [(True, True, 64, False), (True, True, 64, True),
                                                           (False, False, 64, False), (False, False, 128, False)])
def test_kernel_compiles_for_sm90a_with_p_in_registers_and_no_spills(sparse, linear, block_m, phi_pre):
    """Compiled for sm_90a on the CPU: the FP8 P·V wgmma takes P from registers (no byte stores of P to shared
    memory, the Triton kernel's bottleneck), and the registers suffice (no stack frame, i.e. no spills, for the
    default 64-row tiles)."""
    import re

    pytest.importorskip("triton", reason="Triton is not installed")
    if G.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    kernel = G.compile_for_sm90(sparse=sparse, linear=linear, block_m=block_m, phi_pre=phi_pre)
    ptx = kernel.asm["ptx"]
    if phi_pre:  # the linear branch's φ(q)/den·M: one bf16 wgmma with both operands in shared memory
        assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n128k16\.f32\.bf16\.bf16 \{[^}]*\}, %rd", ptx), \
            "the φ·M wgmma does not read φ from shared memory"
    assert ".target sm_90a" in ptx
    pv = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n128k32\.f32\.e4m3\.e4m3 \{[^}]*\}, \{", ptx)
    assert pv, "the FP8 P·V wgmma does not read its A operand from registers"
    assert "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8" in ptx  # the INT8 scores
    assert not re.search(r"st\.shared(\.v\d)?\.(u8|b8|s8)", ptx), "P goes through shared memory byte by byte"
    dumps = cuobjdump(kernel, "--dump-resource-usage")
    if dumps is None:
        pytest.skip("Triton ships no cuobjdump here to read registers and spills with")
    res = dumps[0]
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    stack = int(re.search(r"STACK:(\d+)", res).group(1))
    assert regs <= 255, res
    import triton

    # a stack frame means spills. None with the GPU image's Triton 3.6; with 3.9 the 128-row variant spills 8 bytes,
    # and so do the sparse + linear-branch ones since the row maximum on int32 scores (INT_MAX)
    if triton.__version__.startswith("3.6") or (block_m == 64 and not linear):
        assert stack == 0, res
    elif block_m == 64:
        assert stack <= 8, res


# --------------------------------------------------------------------------------------------------------- GPU
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="needs an sm_90 GPU (Hopper) and Triton's Gluon")


@pytest.mark.parametrize("lq,lk,d,blk_q,blk_k,dtype", [
    (1, 1, 128, 64, 128, torch.bfloat16), (63, 63, 128, 64, 128, torch.bfloat16),
    (65, 200, 64, 128, 64, torch.float16), (1000, 1000, 128, 64, 128, torch.bfloat16),
    (4097, 4097, 128, 128, 64, torch.bfloat16), (300, 77, 128, 64, 128, torch.bfloat16)])
@pytest.mark.gpu
@needs_hopper
def test_gluon_dense_matches_triton_and_reference(lq, lk, d, blk_q, blk_k, dtype):
    dev = torch.device("cuda")
    q, k, v = structured_qkv(2, 3, lq, d, dtype, dev, seed=lq + lk, nk=lk)
    o_g = block_attention_triton(q, k, v, None, blk_q, blk_k, sage=True, kernel="gluon",
                                 out=torch.full_like(q, float("nan")))
    o_t = block_attention_triton(q, k, v, None, blk_q, blk_k, sage=True, kernel="triton")
    assert not o_g.isnan().any()
    ref = block_attention_reference(q, k, v, None, blk_q, blk_k, sage=True)
    exact = attention_fp32_reference(q, k, v)
    # 64-key tiles (the reference emulates blk_k-wide running maxima) change P's FP8 rounding, nothing else
    assert _rel(o_g, ref) <= 1e-2, _rel(o_g, ref)
    assert _cos(o_g, exact) >= 0.999
    assert _rel(o_g, o_t) <= 1e-2


@pytest.mark.parametrize("lq,lk,blk_q", [(1, 1, 64), (200, 333, 64), (4097, 4097, 128), (1000, 70, 64)])
@pytest.mark.gpu
@needs_hopper
def test_gluon_dense_128_row_tiles_match_64_row_tiles(lq, lk, blk_q):
    """Two warpgroups per program (128 query rows, one scale per row when the tile spans two Q blocks)."""
    from turbocompile.kernels.sage_attention import sage_quantize_triton

    dev = torch.device("cuda")
    q, k, v = structured_qkv(1, 3, lq, 128, torch.bfloat16, dev, seed=lq, nk=lk)
    quant = sage_quantize_triton(q, k, v, blk_q, 128, v_order="wgmma")
    o64 = G.sage_attention_gluon(quant, lq, lk, torch.full_like(q, float("nan")), None, blk_q, 128, block_m=64)
    o128 = G.sage_attention_gluon(quant, lq, lk, torch.full_like(q, float("nan")), None, blk_q, 128, block_m=128)
    assert not o128.isnan().any()
    assert _rel(o128, o64) <= 1e-3  # same tiles along the keys, same online maxima: rounding only
    with pytest.raises(UnsupportedShapeError, match="query tile 128"):
        G.sage_attention_gluon(quant, lq, lk, torch.empty_like(q), torch.zeros(1, 3, 1, 1, dtype=torch.int32,
                                                                                  device=dev), 64, 128, block_m=128)


@pytest.mark.parametrize("n,d,blk_q,blk_k,topk", [(1, 128, 64, 128, 0.1), (129, 128, 64, 128, 0.2),
                                                  (1000, 64, 64, 128, 0.1), (4097, 128, 64, 128, 0.1),
                                                  (3000, 128, 128, 64, 0.15)])
@pytest.mark.gpu
@needs_hopper
def test_gluon_sparse_with_linear_branch_matches_reference(n, d, blk_q, blk_k, topk, monkeypatch):
    from turbocompile.kernels.block_map import sla_block_map
    from turbocompile.kernels.sage_sla import sage_sla_reference, sage_sla_triton

    dev = torch.device("cuda")
    q, k, v = structured_qkv(1, 4, n, d, torch.bfloat16, dev, seed=n)
    g = torch.Generator().manual_seed(n)
    w, b = (torch.randn(d, d, generator=g) * 0.05).to(dev), (torch.randn(d, generator=g) * 0.05).to(dev)
    lut = sla_block_map(q, k, topk, blk_q, blk_k)
    assert G.supported(q, blk_q, blk_k) is None
    o_g = sage_sla_triton(q, k, v, w, b, topk, blk_q, blk_k, lut=lut, out=torch.full_like(q, float("nan")))
    monkeypatch.setenv("TURBOCOMPILE_SAGE_KERNEL", "triton")
    o_t = sage_sla_triton(q, k, v, w, b, topk, blk_q, blk_k, lut=lut)
    assert not o_g.isnan().any()
    ref = sage_sla_reference(q, k, v, w, b, topk, blk_q, blk_k, lut=lut)
    assert _rel(o_g, ref) <= 1e-2, _rel(o_g, ref)
    assert _rel(o_g, o_t) <= 1e-2


def test_lin_phi_is_requested_only_where_the_kernel_takes_it():
    """sage_sla asks the Q quantizer for φ(q)/den only where the kernel's K stages hold it and M (128-key tiles);
    with 64-key tiles the epilogue computes φ itself and that work would be wasted."""
    assert G.uses_lin_phi(128, 128) and G.uses_lin_phi(128, 64) and G.uses_lin_phi(256, 128)
    assert not G.uses_lin_phi(64, 128) and not G.uses_lin_phi(64, 64)
    assert not G._phi_fits(128, 128, num_stages=2)  # M alone fills both stages


def test_preload_tiles_sizes_the_shared_memory_table_or_declines():
    """The per-program table of first keys and K scales: a power of two at least the tile count, within 4 KiB
    (8 bytes a tile sparse, 4 dense), else 1 (the loop loads from global memory as before)."""
    assert G.preload_tiles(26, sparse=True) == 32 and G.preload_tiles(32, sparse=True) == 32
    assert G.preload_tiles(33, sparse=True) == 64 and G.preload_tiles(1, sparse=True) == 2
    assert G.preload_tiles(512, sparse=True) == 512 and G.preload_tiles(513, sparse=True) == 1
    assert G.preload_tiles(591, sparse=False) == 1024 and G.preload_tiles(1025, sparse=False) == 1
    for n in (1, 7, 26, 59, 256, 591):
        rows = G.preload_tiles(n, sparse=False)
        assert rows >= n and rows & (rows - 1) == 0


def _gluon_call(n: int, sparse: bool, blk_k: int, seed: int) -> tuple:
    """(q, quantized q/k/v, LUT or None, keyword arguments) of a Gluon kernel call on 3 heads of n tokens
    (head_dim 128): dense, or block-sparse at top-k 0.25 with SLA's linear branch from random proj_l weights."""
    from turbocompile.kernels.block_map import lut_from_pooled
    from turbocompile.kernels.sage_attention import sage_quantize_triton
    from turbocompile.kernels.sla import linear_branch_stats

    dev = torch.device("cuda")
    q, k, v = structured_qkv(1, 3, n, 128, torch.bfloat16, dev, seed=seed)
    g = torch.Generator().manual_seed(n)
    w, b = (torch.randn(128, 128, generator=g) * 0.05).to(dev), (torch.randn(128, generator=g) * 0.05).to(dev)
    lin, moments = linear_branch_stats(k, v, w, b)
    quant = sage_quantize_triton(q, k, v, 64, blk_k, **moments, v_order="wgmma", linear_z=lin[1])
    lut = lut_from_pooled(quant["q_pool"], quant["k_pool"], 0.25) if sparse else None
    kw = dict(q_raw=q, linear=lin, lin_phi=quant["lin_phi"]) if sparse else {}
    return q, quant, lut, kw


@pytest.mark.parametrize("n,sparse,blk_k", [(4096, True, 128), (3000, True, 128), (700, True, 64),
                                            (4096, False, 128), (1000, False, 128), (63, False, 128)])
@pytest.mark.gpu
@needs_hopper
def test_preloaded_tile_table_gives_the_same_bits_as_loads_in_the_loop(n, sparse, blk_k):
    """The table changes where the loop reads each tile's first key and K scale, not the arithmetic: bit-equal
    outputs, tile counts at and off a power of two, 64- and 128-key blocks, dense and sparse + linear branch."""
    q, quant, lut, kw = _gluon_call(n, sparse, blk_k, seed=n + blk_k)
    outs = [G.sage_attention_gluon(quant, n, n, torch.full_like(q, float("nan")), lut, 64, blk_k, preload=p, **kw)
            for p in (True, False)]
    assert not outs[0].isnan().any()
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("n,sparse,blk_k,block_m", [(4096, True, 128, 64), (3000, True, 128, 64),
                                                    (700, True, 64, 64), (1000, False, 128, 64),
                                                    (1000, False, 128, 128), (63, False, 128, 64), (1, False, 128, 64)])
@pytest.mark.gpu
@needs_hopper
def test_row_maximum_on_int32_scores_gives_the_same_bits(n, sparse, blk_k, block_m, monkeypatch):
    """INT_MAX takes the softmax row maximum on the int32 scores (masked tiles keep the float path): the same
    value, so bit-equal outputs, with partial last tiles (L not a multiple of 128), L = 1, sparse + linear."""
    q, quant, lut, kw = _gluon_call(n, sparse, blk_k, seed=n + 7)
    outs = []
    for int_max in (True, False):
        monkeypatch.setattr(G, "INT_MAX", int_max)
        outs.append(G.sage_attention_gluon(quant, n, n, torch.full_like(q, float("nan")), lut, 64, blk_k,
                                           block_m=block_m, **kw))
    assert not outs[0].isnan().any()
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("lq,block_m", [(300, 64), (129, 64), (300, 128), (1, 128)])
@pytest.mark.gpu
@needs_hopper
def test_gluon_dense_one_key_is_finite_and_matches_triton(lq, block_m):
    """Lk = 1: Triton would compile a kernel specialized to it (an integer argument equal to 1), whose partly
    constant-folded P wrote NaN into random rows on an H200; the kernel declines that specialization. Three calls,
    since the failure was not the same from run to run."""
    from turbocompile.kernels.sage_attention import block_attention_triton, sage_quantize_triton

    dev = torch.device("cuda")
    q, k, v = structured_qkv(1, 3, lq, 128, torch.bfloat16, dev, seed=lq, nk=1)
    quant = sage_quantize_triton(q, k, v, 64, 128, v_order="wgmma")
    ref = block_attention_triton(q, k, v, None, 64, 128, sage=True, quant=sage_quantize_triton(q, k, v, 64, 128),
                                 out=torch.full_like(q, float("nan")))
    for _ in range(3):
        o = G.sage_attention_gluon(quant, lq, 1, torch.full_like(q, float("nan")), None, 64, 128, block_m=block_m)
        assert not o.isnan().any()
        assert _rel(o, ref) <= 1e-2, _rel(o, ref)
