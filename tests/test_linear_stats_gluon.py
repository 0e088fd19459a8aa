"""The Gluon linear-statistics kernel (SLA's φ(K)ᵀV, Σφ(K), Σ K, max |V| per token chunk).

CPU: how chunks and the two memory orders map to TMA rows (checked against indexing the tensor), the reasons it
declines, and its sm_90a compile (both wgmmas take φ transposed from shared memory; one wgmma wait per tile, no
serialization warning, no spills). Hopper: its sums against the Triton kernel's and the fp32 definitions, at
lengths that are not multiples of a tile, in both memory orders, bf16 and fp16, head_dim 64 and 128.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from turbocompile.kernels import linear_stats_gluon as LG
from turbocompile.kernels.sage_attention_gluon import available as gluon_available

ON_HOPPER = gluon_available()


# --------------------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("lk,heads,sms", [(1, 12, 132), (63, 1, 132), (65, 2, 8), (32760, 12, 132),
                                          (75600, 40, 132), (5000, 200, 132), (4097, 3, 16)])
def test_chunking_covers_every_token_once_in_whole_tiles(lk, heads, sms):
    n_chunks, chunk = LG.chunking(lk, heads, LG.PROGRAMS_PER_SM * sms, LG.BLOCK_L)
    assert chunk % LG.BLOCK_L == 0 and chunk > 0
    assert (n_chunks - 1) * chunk < lk <= n_chunks * chunk  # every chunk holds a token, together all of them
    assert n_chunks * heads <= max(heads, LG.PROGRAMS_PER_SM * sms)  # never a partial extra wave


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_token_matrix_rows_are_the_tokens_of_each_head(layout):
    b, h, n, d = 2, 3, 5, 8
    x = torch.randn(b, h, n, d) if layout == "bhld" else torch.randn(b, n, h, d).transpose(1, 2)
    view, rows_b, rows_h, cols_h = LG._token_matrix(x)
    assert view.data_ptr() == x.data_ptr()  # a view: the kernel reads the caller's memory
    for bi in range(b):
        for hi in range(h):
            for li in range(n):
                row = bi * rows_b + hi * rows_h + li
                assert torch.equal(view[row, hi * cols_h: hi * cols_h + d], x[bi, hi, li])


def test_token_matrix_declines_other_orders():
    assert LG._token_matrix(torch.randn(2, 3, 5, 8).permute(0, 2, 1, 3).contiguous().permute(2, 0, 1, 3)) is None
    assert LG._token_matrix(torch.randn(1, 2, 6, 8)[:, :, ::2]) is None


def test_supported_says_why_not(monkeypatch):
    k = torch.empty(1, 2, 64, 128, dtype=torch.bfloat16)
    assert LG.supported(k, k) == "needs an sm_90 GPU and Triton's Gluon (not the interpreter)"
    monkeypatch.setenv("TURBOCOMPILE_LINEAR_STATS_KERNEL", "triton")
    assert LG.supported(k, k) == "TURBOCOMPILE_LINEAR_STATS_KERNEL=triton"


@pytest.mark.parametrize("head_dim,dtype", [(128, "bf16"), (64, "fp16")])
def test_kernel_compiles_for_sm90a_with_async_wgmmas_and_no_spills(head_dim, dtype):
    """Both products read φ transposed from shared memory, the tile loop waits for the wgmmas once (after the next
    tile's φ is computed, not after each wgmma), and ptxas neither serializes them (warnings C7514/C7515) nor
    spills."""
    pytest.importorskip("triton", reason="Triton is not installed")
    if LG.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    kernel = LG.compile_for_sm90(head_dim=head_dim, dtype=dtype)
    ptx = kernel.asm["ptx"]
    assert ".target sm_90a" in ptx
    ty = "bf16" if dtype == "bf16" else "f16"
    assert f"wgmma.mma_async.sync.aligned.m64n{head_dim}k16.f32.{ty}.{ty}" in ptx  # φᵀ·V
    assert f"wgmma.mma_async.sync.aligned.m64n16k16.f32.{ty}.{ty}" in ptx  # φᵀ·1
    # the full-tile loop, the masked last tile, after the loop: three waits in all, none between products
    assert len(re.findall(r"wgmma\.wait_group\.sync\.aligned 0;", ptx)) == 3
    assert not re.search(r"wgmma\.wait_group\.sync\.aligned [1-9]", ptx)
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path  # the ptxas Triton compiled with (3.9 ships two; the older rejects its PTX)
    if not os.path.exists(ptxas):
        pytest.skip("Triton ships no ptxas here to read warnings, registers and spills with")
    src = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"linear_stats_{os.getpid()}_{head_dim}.ptx")
    with open(src, "w") as f:
        f.write(ptx)
    try:
        res = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", src, "-o", os.devnull], capture_output=True,
                             text=True, timeout=300)
    finally:
        os.unlink(src)
    report = res.stdout + res.stderr
    assert res.returncode == 0, report
    assert "C7514" not in report and "C7515" not in report, report  # serialized wgmmas
    assert re.search(r"0 bytes spill stores, 0 bytes spill loads", report), report


_FALLBACK_SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from turbocompile.kernels import linear_stats_gluon as LG
    from turbocompile.kernels.sage_attention import structured_qkv
    from turbocompile.kernels.sla import linear_branch_stats

    def broken(*args, **kwargs):  # what an incompatible Triton does at the first launch
        raise AttributeError("async_copy_global_to_shared has been removed; call async_load instead")

    LG.supported = lambda k, v: None if LG.GUARD.disabled is None else "off"  # as on a Hopper GPU
    LG.linear_stats_partials = broken
    _, k, v = structured_qkv(1, 2, 100, 64, torch.bfloat16, seed=5)
    w, b = torch.randn(64, 64) * 0.05, torch.randn(64) * 0.05
    (m, z, _), mom = linear_branch_stats(k, v, w, b)
    phi = torch.softmax(k.float(), dim=-1)
    ref_m = (torch.matmul(phi.transpose(-1, -2), v.float()) @ w.t()).reshape(m.shape)
    r = {"m_rel": float((m.float() - ref_m).norm() / ref_m.norm()),
         "z_rel": float((z - phi.sum(2).reshape(z.shape)).norm() / z.norm()),
         "disabled": LG.GUARD.disabled}
    LG.GUARD.disabled, LG.GUARD.launched = None, True  # once a launch has worked, a failure is a real error
    try:
        linear_branch_stats(k, v, w, b)
        r["after_success"] = "no error"
    except AttributeError:
        r["after_success"] = "raised"
    print("RESULT" + json.dumps(r))
""")


def test_failed_first_gluon_launch_falls_back_to_triton_interpreted():
    """An incompatible Triton (Gluon is experimental) must not break the statistics: the first failed launch
    switches the Gluon kernel off for the process with one warning and the Triton kernel gives the result; after a
    launch has succeeded, a failure propagates."""
    pytest.importorskip("triton", reason="Triton is not installed")
    proc = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1][len("RESULT"):])
    assert r["m_rel"] <= 5e-3 and r["z_rel"] <= 5e-3, r
    assert r["disabled"].startswith("AttributeError: async_copy_global_to_shared has been removed"), r
    assert r["after_success"] == "raised", r
    assert "using the Triton kernel from now on" in proc.stderr


# --------------------------------------------------------------------------------------------------------- GPU
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="needs an sm_90 GPU (Hopper) and Triton's Gluon")


def _sums(parts):
    kv, z, ksum, vmax = parts
    return kv.sum(0), z.sum(0), ksum.sum(0), vmax.amax(0)


@pytest.mark.parametrize("n,d,dtype,layout", [(1, 128, torch.bfloat16, "bhld"), (63, 128, torch.bfloat16, "blhd"),
                                              (64, 64, torch.float16, "bhld"), (65, 128, torch.float16, "blhd"),
                                              (1000, 64, torch.bfloat16, "blhd"),
                                              (4097, 128, torch.bfloat16, "bhld"),
                                              (700, 128, torch.bfloat16, "mixed"),
                                              (32760, 128, torch.bfloat16, "blhd")])
@pytest.mark.gpu
@needs_hopper
def test_partials_match_triton_kernel_and_fp32(n, d, dtype, layout, monkeypatch):
    from turbocompile.kernels.sage_attention import structured_qkv
    from turbocompile.kernels.sla import _stats_partials

    dev = torch.device("cuda")
    b, h = 2, 3
    _, k, v = structured_qkv(b, h, n, d, dtype, dev, seed=n + d)
    k = k + 0.5 * torch.randn(1, 1, 1, d, device=dev, dtype=dtype)  # a channel offset: Σ K is not ~0
    if layout == "blhd":  # (B, L, H, D) in memory, as a Wan attention passes it
        k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (k, v))
    elif layout == "mixed":  # K (B, H, L, D), V (B, L, H, D): each tensor has its own rows and columns
        v = v.transpose(1, 2).contiguous().transpose(1, 2)
    assert LG.supported(k, v) is None
    parts = LG.linear_stats_partials(k, v)
    assert all(torch.isfinite(p).all() for p in parts)  # every element written (torch.empty holds garbage)
    kv, z, ksum, vmax = _sums(parts)
    monkeypatch.setenv("TURBOCOMPILE_LINEAR_STATS_KERNEL", "triton")
    kv_t, z_t, ksum_t, vmax_t = _sums(_stats_partials(k, v))

    phi = torch.softmax(k.float(), dim=-1)
    ref_kv = torch.matmul(phi.transpose(-1, -2), v.float()).reshape(b * h, d, d)
    rel = lambda a, r: float((a.double() - r.double()).norm() / r.double().norm())
    assert rel(kv, ref_kv) <= 5e-3, rel(kv, ref_kv)  # φ rounded to the input dtype before the product
    assert rel(kv, kv_t) <= 5e-3
    assert rel(z, phi.sum(2).reshape(b * h, d)) <= 5e-3  # the same rounded φ, summed in fp32
    assert rel(ksum, k.float().sum(2).reshape(b * h, d)) <= 1e-5
    assert rel(ksum, ksum_t) <= 1e-5
    assert torch.equal(vmax, v.float().abs().amax(2).reshape(b * h, d))  # exact
    assert torch.equal(vmax, vmax_t)
