"""The FA3-layout attention kernels (kernels/sage_attention_ws.py): compiled for
sm_90a on the CPU (registers, spills, the partitions), and on a Hopper GPU against today's Gluon kernel."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from turbocompile.kernels import sage_attention_gluon as G
from turbocompile.kernels import sage_attention_ws as WS

sys.path.insert(0, str(Path(__file__).parent))
from cubin_tools import cuobjdump  # noqa: E402


def _assert_no_spills_with_triton_36(kernel, why_36: str = "") -> None:
    """No stack frame in ``kernel``'s cubin; checked with the GPU image's Triton 3.6 only (skips elsewhere)."""
    import triton

    if not triton.__version__.startswith("3.6"):
        pytest.skip(f"spills are checked with the GPU image's Triton 3.6{why_36}; this is {triton.__version__}")
    dumps = cuobjdump(kernel, "--dump-resource-usage")
    if dumps is None:
        pytest.skip("Triton ships no cuobjdump here to read registers and spills with")
    assert int(re.search(r"STACK:(\d+)", dumps[0]).group(1)) == 0, dumps[0]


def _count_calls(monkeypatch, name: str) -> list:
    """Wrap ``sage_attention_ws.<name>`` so that each call appends to the returned list (and still runs)."""
    calls: list = []
    real = getattr(WS, name)
    monkeypatch.setattr(WS, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("head_dim,linear", [(128, True), (128, False), (64, True)])
def test_sparse_kernel_compiles_for_sm90a_without_spills_in_shared_memory(head_dim, linear):
    """The persistent one-ring kernel: three partitions, the producer at its register floor, the linear branch's
    wgmma split in two K halves (one k16 step after the other, as the one-wgmma form runs them), within 227 KiB."""
    pytest.importorskip("triton", reason="Triton is not installed")
    if WS.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    kernel = WS.compile_sparse_for_sm90(head_dim=head_dim, linear=linear)
    ptx = kernel.asm["ptx"]
    assert ".reqntid 384" in ptx
    assert re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+24;", ptx)
    assert (f"m64n{head_dim}k16.f32.bf16.bf16" in ptx) == linear
    assert kernel.metadata.shared <= 232448  # an H100/H200's 227 KiB per block
    _assert_no_spills_with_triton_36(kernel)


@pytest.mark.parametrize("head_dim,stages,pipeline,splits", [(128, 4, 0, 1), (128, 5, 0, 1), (64, 3, 0, 1),
                                                             (128, 3, 2, 1), (128, 4, 2, 1), (64, 3, 2, 1),
                                                             (128, 2, 3, 1), (128, 3, 3, 1), (128, 4, 3, 1),
                                                             (64, 4, 3, 1), (128, 4, 3, 3), (64, 4, 3, 2)])
def test_compiles_for_sm90a_with_three_partitions_and_no_spills(head_dim, stages, pipeline, splits):
    pytest.importorskip("triton", reason="Triton is not installed")
    if WS.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    kernel = WS.compile_for_sm90(head_dim=head_dim, num_stages=stages, pipeline=pipeline, splits=splits)
    ptx = kernel.asm["ptx"]
    assert ".reqntid 384" in ptx  # two consumer warpgroups and the producer warp padded to a warpgroup
    assert re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+24;", ptx)  # the producer gives its registers back
    assert re.search(rf"wgmma\.mma_async\.sync\.aligned\.m64n{head_dim}k32\.f32\.e4m3\.e4m3 \{{[^}}]*\}}, \{{", ptx)
    _assert_no_spills_with_triton_36(kernel, " (3.9 spills 200 bytes here)")


needs_hopper = pytest.mark.skipif(not G.available(), reason="needs an sm_90 GPU (Hopper) and Triton's Gluon")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("lq,lk,d", [(1, 1, 128), (64, 129, 128), (200, 333, 64), (1000, 70, 128),
                                     (4097, 4097, 128), (32760, 32760, 128)])
def test_matches_todays_gluon_kernel_bit_for_bit(lq, lk, d):
    from turbocompile.kernels.sage_attention import sage_quantize_triton, structured_qkv

    dev = torch.device("cuda")
    q, _, _ = structured_qkv(1, 2, lq, d, torch.bfloat16, dev, seed=lq)
    _, k, v = structured_qkv(1, 2, lk, d, torch.bfloat16, dev, seed=lk + 1)
    quant = sage_quantize_triton(q, k, v, 64, 128, v_order="wgmma")
    ref = G.sage_attention_gluon(quant, lq, lk, torch.empty_like(q), None, 64, 128)
    for stages, pipeline in ((2, 0), (4, 0), (2, 2), (3, 2), (4, 2), (2, 3), (3, 3), (4, 3)):
        out = WS.sage_attention_ws(quant, lq, lk, torch.full_like(q, float("nan")), 64, 128, stages, pipeline,
                                   split_tail=False)
        assert not out.isnan().any(), (stages, pipeline)
        assert torch.equal(out, ref), (stages, pipeline, float((out.float() - ref.float()).norm() / ref.float().norm()))


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("lq,lk", [(1000, 70), (4097, 4097)])
def test_partial_row_sums_keep_the_kernels_bit_equal_and_move_the_output_by_rounding_only(lq, lk, monkeypatch):
    """``sage_attention_gluon.L_PARTIAL`` (each thread's partial row sums over the loop, the quad's shuffles once at
    the end) switches the Gluon kernel and the FA3-layout dense and sparse kernels together: with it off or on they
    give each other's bits, and on against off moves the output by fp32 summation order only (rel. L2 <= 1e-4)."""
    from turbocompile.kernels.block_map import lut_from_pooled
    from turbocompile.kernels.sage_attention import sage_quantize_triton, structured_qkv

    dev = torch.device("cuda")
    q, _, _ = structured_qkv(1, 2, lq, 128, torch.bfloat16, dev, seed=lq)
    _, k, v = structured_qkv(1, 2, lk, 128, torch.bfloat16, dev, seed=lk + 1)
    quant = sage_quantize_triton(q, k, v, 64, 128, v_order="wgmma")
    lut = lut_from_pooled(quant["q_pool"], quant["k_pool"], 0.3)
    outs = {}
    for on in (False, True):
        monkeypatch.setattr(G, "L_PARTIAL", on)
        dense = WS.sage_attention_ws(quant, lq, lk, torch.full_like(q, float("nan")), 64, 128, split_tail=False)
        sparse = WS.sage_sla_ws(quant, lq, lk, torch.full_like(q, float("nan")), lut, 64, 128)
        for name, out, ref_lut in (("dense", dense, None), ("sparse", sparse, lut)):
            ref = G.sage_attention_gluon(quant, lq, lk, torch.full_like(q, float("nan")), ref_lut, 64, 128)
            assert not out.isnan().any() and torch.equal(out, ref), (name, on)
        outs[on] = (dense.float(), sparse.float())
    for off, on in zip(outs[False], outs[True]):
        assert float((on - off).norm() / off.norm()) <= 1e-4


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("lq,lk", [(300, 700), (4097, 1000)])
def test_dense_sage_attention_calls_take_it_with_the_gluon_kernels_bits(lq, lk, monkeypatch):
    """The dense op path (``block_attention_triton``, what ``sage_attention`` runs) takes this kernel where it can
    and gives the Gluon kernel's bits; 64-key K blocks (not its tiles) stay on the Gluon kernel."""
    from turbocompile.kernels.sage_attention import block_attention_triton, sage_quantize_triton, structured_qkv

    dev = torch.device("cuda")
    q, _, _ = structured_qkv(1, 3, lq, 128, torch.bfloat16, dev, seed=lq)
    _, k, v = structured_qkv(1, 3, lk, 128, torch.bfloat16, dev, seed=lk + 1)
    quant = sage_quantize_triton(q, k, v, 64, 128, v_order="wgmma")
    calls = _count_calls(monkeypatch, "sage_attention_ws")
    out = block_attention_triton(q, k, v, None, 64, 128, sage=True, quant=quant, kernel="gluon",
                                 out=torch.full_like(q, float("nan")))
    assert calls, "the dense call did not take the FA3-layout kernel"
    ref = G.sage_attention_gluon(quant, lq, lk, torch.full_like(q, float("nan")), None, 64, 128)
    assert torch.equal(out, ref)
    quant64 = sage_quantize_triton(q, k, v, 64, 64, v_order="wgmma")
    calls.clear()
    block_attention_triton(q, k, v, None, 64, 64, sage=True, quant=quant64, kernel="gluon")
    assert not calls


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("n,topk,linear,sms", [
    (4096, 0.25, True, None), (3000, 0.1, True, 7), (1000, 0.5, False, 5), (70, 1.0, True, None),
    (32760, 0.1, True, None), (300, 0.01, True, 2), (1000, 0.5, True, 1)])
def test_sparse_kernel_matches_the_gluon_kernel_bit_for_bit(n, topk, linear, sms, paired, monkeypatch):
    """Block-sparse with and without SLA's linear branch (``sms`` programs where given, so that programs take
    several items, items of other heads, one key tile per item; "paired": both kernels on the LUT with each row
    pair's shared blocks aligned, where the one-ring kernel copies them once): the Gluon kernel's bits on the same
    LUT, an odd number of LUT rows (the second consumer of the last item past Lq), a partial last key block, one
    key block."""
    from turbocompile.kernels.lut_pairing import pair_lut_rows

    monkeypatch.setattr(WS, "SMS", sms)
    from turbocompile.kernels.block_map import lut_from_pooled
    from turbocompile.kernels.sage_attention import sage_quantize_triton, structured_qkv
    from turbocompile.kernels.sla import linear_branch_stats

    dev = torch.device("cuda")
    q, k, v = structured_qkv(1, 3, n, 128, torch.bfloat16, dev, seed=n)
    g = torch.Generator().manual_seed(n)
    w, b = (torch.randn(128, 128, generator=g) * 0.05).to(dev), (torch.randn(128, generator=g) * 0.05).to(dev)
    lin, moments = linear_branch_stats(k, v, w, b)
    quant = sage_quantize_triton(q, k, v, 64, 128, **moments, v_order="wgmma", linear_z=lin[1])
    lut = lut_from_pooled(quant["q_pool"], quant["k_pool"], topk)
    if paired:
        lut = pair_lut_rows(lut)
    kw = dict(q_raw=q, linear=lin, lin_phi=quant["lin_phi"]) if linear else {}
    ref = G.sage_attention_gluon(quant, n, n, torch.full_like(q, float("nan")), lut, 64, 128, **kw)
    out = WS.sage_sla_ws(quant, n, n, torch.full_like(q, float("nan")), lut, 64, 128,
                         lin if linear else None, quant["lin_phi"] if linear else None)
    assert not out.isnan().any()
    assert torch.equal(out, ref), float((out.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("lut_beside_v", [True, False])
def test_sage_sla_takes_the_one_ring_kernel_on_a_paired_lut(lut_beside_v, monkeypatch):
    """By default (``SPARSE_OPS``) the op ``sage_sla`` pairs its LUT and runs its block-sparse attention through
    the one-ring kernel: the Gluon kernel's result on the paired LUT bit for bit, and on the sorted LUT up to the
    order of the online softmax over the same key blocks."""
    import turbocompile.kernels.sage_sla as S
    from turbocompile.kernels.sage_attention import structured_qkv
    from turbocompile.kernels.sage_sla import sage_sla

    dev = torch.device("cuda")
    q, k, v = structured_qkv(1, 4, 5000, 128, torch.bfloat16, dev, seed=3)
    w, b = torch.randn(128, 128, device=dev) * 0.05, torch.randn(128, device=dev) * 0.05
    monkeypatch.setattr(S, "LUT_BESIDE_V", lut_beside_v)
    monkeypatch.setattr(WS, "SPARSE_OPS", True)
    calls = _count_calls(monkeypatch, "sage_sla_ws")
    luts: list = []
    real_pair = S.pair_lut_rows
    monkeypatch.setattr(S, "pair_lut_rows", lambda *a, **kw: luts.append(real_pair(*a, **kw)) or luts[-1])
    out = sage_sla(q, k, v, w, b, 0.1, 64, 128)
    assert calls and luts, "sage_sla did not pair its LUT for the one-ring sparse kernel"
    monkeypatch.setattr(WS, "SPARSE_OPS", False)
    assert torch.equal(out, S.sage_sla_triton(q, k, v, w, b, 0.1, 64, 128, lut=luts[0]))
    gluon_out = sage_sla(q, k, v, w, b, 0.1, 64, 128)
    assert not out.isnan().any() and not torch.equal(out, gluon_out)
    assert float((out.float() - gluon_out.float()).norm() / gluon_out.float().norm()) <= 5e-3


def test_a_failed_first_launch_switches_the_kernel_off_and_the_caller_falls_back(monkeypatch):
    """``dense_ws``/``sparse_ws`` answer None (the caller then runs the Gluon kernel) when the first launch fails,
    and stop trying for the rest of the process; calls they do not take never launch."""
    import turbocompile.kernels.sage_attention_gluon as gluon_mod
    from turbocompile.kernels.gluon_guard import GluonGuard

    if WS.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    monkeypatch.setattr(gluon_mod, "available", lambda: True)
    monkeypatch.setattr(WS, "GUARD", GluonGuard("FA3-layout attention"))
    monkeypatch.setattr(WS, "SPARSE_OPS", True)
    launches = []

    def failing(*args, **kwargs):
        launches.append(1)
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(WS, "sage_attention_ws", failing)
    monkeypatch.setattr(WS, "sage_sla_ws", failing)
    quant = {"v_wgmma_order": True, "q": torch.empty(1, 1, 256, 128, dtype=torch.int8)}
    out = torch.empty(1, 1, 200, 128)
    assert WS.dense_ws(quant, 200, 200, out, 64, 64) is None and not launches  # 64-key K blocks: not its tiles
    assert WS.dense_ws(quant, 200, 200, out, 64, 128) is None and launches == [1]
    assert WS.GUARD.disabled is not None and "PassManager" in WS.GUARD.disabled
    lut = torch.zeros(1, 1, 4, 2, dtype=torch.int32)
    assert WS.sparse_ws(quant, 200, 200, out, lut, 64, 128, None, None) is None and launches == [1]
    assert WS.dense_ws(quant, 200, 200, out, 64, 128) is None and launches == [1]


def test_a_failure_after_a_successful_launch_propagates(monkeypatch):
    """Once the kernel has run in this process a failure is a real error, not a reason to fall back."""
    import turbocompile.kernels.sage_attention_gluon as gluon_mod
    from turbocompile.kernels.gluon_guard import GluonGuard

    if WS.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    monkeypatch.setattr(gluon_mod, "available", lambda: True)
    monkeypatch.setattr(WS, "GUARD", GluonGuard("FA3-layout attention"))
    calls = []
    monkeypatch.setattr(WS, "sage_attention_ws", lambda *a, **kw: calls.append(1))
    quant = {"v_wgmma_order": True, "q": torch.empty(1, 1, 256, 128, dtype=torch.int8)}
    out = torch.empty(1, 1, 200, 128)
    assert WS.dense_ws(quant, 200, 200, out, 64, 128) is out and WS.GUARD.launched

    def failing(*args, **kwargs):
        raise RuntimeError("an illegal memory access was encountered")

    monkeypatch.setattr(WS, "sage_attention_ws", failing)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        WS.dense_ws(quant, 200, 200, out, 64, 128)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("b,h,n,d", [(2, 3, 1000, 128), (2, 2, 4097, 64), (1, 2, 1, 128)])
def test_dense_op_through_it_meets_the_accuracy_bar_with_batches(b, h, n, d, monkeypatch):
    """``sage_attention`` at the Hopper blocks (64x128), which this kernel runs: cosine >= 0.999 and relative L1
    <= 0.03 against exact fp32 attention (issue 4's bar), batch 2, head_dim 64 and 128, L = 1; every element
    written."""
    from turbocompile.kernels.sage_attention import attention_fp32_reference, sage_attention, structured_qkv

    dev = torch.device("cuda")
    q, k, v = structured_qkv(b, h, n, d, torch.bfloat16, dev, seed=n + d)
    calls = _count_calls(monkeypatch, "sage_attention_ws")
    out = sage_attention(q, k, v, 64, 128).float()
    assert calls, "the op did not run the FA3-layout kernel"
    ref = attention_fp32_reference(q, k, v)
    assert out.isfinite().all()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    l1 = (out - ref).abs().sum() / ref.abs().sum()
    assert cos >= 0.999 and l1 <= 0.03, (float(cos), float(l1))



def test_tail_splits_fill_the_last_wave_only_where_it_pays(monkeypatch):
    """The last partial wave of row blocks is cut into key ranges: 1.3B@480p (3072 row blocks of 256 key tiles on
    132 SMs) into 3 parts of its 36 blocks, 14B@720p (23 640 of 591) 4 parts of 12; nothing without a partial wave,
    under one wave, with parts of under 8 tiles, or switched off."""
    assert WS.tail_splits(3072, 256, 132) == (3, 3036)
    assert WS.tail_splits(23640, 591, 132) == (4, 23628)
    assert WS.tail_splits(264, 256, 132) == (1, 264)  # whole waves
    assert WS.tail_splits(99, 256, 132) == (1, 99)  # under one wave
    assert WS.tail_splits(200, 10, 132) == (1, 200)  # parts would have under 8 tiles
    assert WS.tail_splits(3072, 16, 132) == (2, 3036)
    monkeypatch.setattr(WS, "SPLIT_TAIL", False)
    assert WS.tail_splits(3072, 256, 132) == (1, 3072)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("lq,lk,h,d,sms", [(4097, 4097, 3, 128, 32), (1000, 3000, 4, 128, 10), (2000, 2000, 5, 64, 36)])
def test_split_tail_rows_match_the_unsplit_kernel(lq, lk, h, d, sms, monkeypatch):
    """With the SM count set small the last partial wave runs as key-range parts plus the merge: the whole-wave
    rows keep their bits, the split rows agree with the unsplit kernel to the FP8 rounding of P (each part scales
    P to its own running maximum), no NaN or unwritten element (NaN-poisoned output), and the accuracy bar holds."""
    from turbocompile.kernels.sage_attention import attention_fp32_reference, sage_quantize_triton, structured_qkv

    dev = torch.device("cuda")
    q, _, _ = structured_qkv(1, h, lq, d, torch.bfloat16, dev, seed=lq)
    _, k, v = structured_qkv(1, h, lk, d, torch.bfloat16, dev, seed=lk + 1)
    quant = sage_quantize_triton(q, k, v, 64, 128, v_order="wgmma")
    ref = WS.sage_attention_ws(quant, lq, lk, torch.full_like(q, float("nan")), 64, 128, 4, 3, split_tail=False)
    monkeypatch.setattr(WS, "SMS", sms)
    n_m = -(-lq // 128)
    splits, full = WS.tail_splits(n_m * h, -(-lk // 128), sms)
    assert splits > 1, "the case does not split"
    out = WS.sage_attention_ws(quant, lq, lk, torch.full_like(q, float("nan")), 64, 128, 4, 3)
    assert not out.isnan().any()
    whole = torch.zeros(h, n_m * 128, dtype=torch.bool, device=dev).view(-1)
    whole[: full * 128] = True  # row blocks in launch order: head-major, 128 rows each
    whole = whole.view(h, n_m * 128)[:, :lq]
    assert torch.equal(out[0][whole], ref[0][whole])
    split_rows = out[0][~whole].float()
    assert split_rows.numel() > 0
    rel = float((split_rows - ref[0][~whole].float()).norm() / ref[0][~whole].float().norm())
    assert rel <= 3e-3, rel
    exact = attention_fp32_reference(q, k, v)
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), exact.flatten(), dim=0)
    assert cos >= 0.999
