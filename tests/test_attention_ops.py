"""Attention ops: sage_attention, sage_sla, sla (references on CPU, Triton kernels under TRITON_INTERPRET=1 in a
subprocess, fake impls under FakeTensorMode / torch.export, and the CUDA path where a GPU exists)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from turbocompile.errors import InputError, UnsupportedShapeError
from turbocompile.kernels import load_ops
from turbocompile.kernels import sage_attention as sa_mod
from turbocompile.kernels.block_map import block_mean, num_kept_blocks, sla_block_map
from turbocompile.kernels.sage_attention import (
    attention_fp32_reference,
    block_attention_reference,
    sage_attention,
    sage_attention_reference,
    structured_qkv,
)
from turbocompile.kernels.sage_sla import sage_sla, sage_sla_reference
from turbocompile.kernels.sla import linear_branch_reference, sla, sla_reference

load_ops()
HAS_CUDA = torch.cuda.is_available()


def metrics(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(cosine, relative L1, relative L2) of x against ref, flattened."""
    x, ref = x.double().flatten(), ref.double().flatten()
    cos = float(torch.nn.functional.cosine_similarity(x, ref, dim=0))
    return cos, float((x - ref).abs().sum() / ref.abs().sum()), float((x - ref).norm() / ref.norm())


def proj(d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, d, generator=g) * 0.05, torch.randn(d, generator=g) * 0.05


def masked_sparse_attention(q, k, v, lut, blk_q, blk_k):
    """Brute force: dense fp32 attention with a token mask expanded from the block LUT."""
    lq, lk = q.shape[2], k.shape[2]
    nk = -(-lk // blk_k)
    blk = torch.zeros(lut.shape[:3] + (nk,), dtype=torch.bool).scatter_(-1, lut.long(), True)
    mask = blk.repeat_interleave(blk_q, dim=2)[:, :, :lq].repeat_interleave(blk_k, dim=3)[..., :lk]
    s = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v.double()


# ------------------------------------------------------------------------------------------------ block map
@pytest.mark.parametrize("lq,lk,blk_q,blk_k,topk", [(300, 300, 64, 128, 0.1), (1000, 1000, 128, 64, 0.15),
                                                     (257, 700, 64, 64, 0.3), (5, 5, 64, 128, 0.1)])
def test_block_map_matches_brute_force_topk(lq, lk, blk_q, blk_k, topk):
    q, k, _ = structured_qkv(2, 3, lq, 64, seed=lq, nk=lk)
    lut = sla_block_map(q, k, topk, blk_q, blk_k)
    mq, nk = -(-lq // blk_q), -(-lk // blk_k)
    t = max(1, min(nk, int(topk * nk)))
    assert lut.dtype == torch.int32 and tuple(lut.shape) == (2, 3, mq, t)
    assert bool((lut >= 0).all()) and bool((lut < nk).all())
    assert bool((lut[..., 1:] > lut[..., :-1]).all()), "LUT must be strictly ascending (sorted, no repeats)"
    # brute force: pool token by token, score, and check the kept set holds the T best blocks of every row
    km = k.double().mean(dim=2)
    for b in range(2):
        for h in range(3):
            pq = torch.stack([q[b, h, i * blk_q:(i + 1) * blk_q].double().mean(0) for i in range(mq)])
            pk = torch.stack([(k[b, h, j * blk_k:(j + 1) * blk_k].double() - km[b, h]).mean(0) for j in range(nk)])
            score = pq @ pk.T
            for i in range(mq):
                kept = score[i, lut[b, h, i].long()]
                dropped = torch.ones(nk, dtype=torch.bool)
                dropped[lut[b, h, i].long()] = False
                if dropped.any():
                    assert float(kept.min()) >= float(score[i, dropped].max()) - 1e-9


@pytest.mark.parametrize("topk,nk,expect", [(0.1, 5, 1), (0.001, 1000, 1), (0.1, 256, 25), (1.0, 7, 7), (0.5, 1, 1)])
def test_kept_blocks_never_zero(topk, nk, expect):
    assert num_kept_blocks(topk, nk) == expect


@pytest.mark.parametrize("topk", [0.0, -0.1, 1.5, float("nan")])
def test_bad_topk_is_rejected(topk):
    with pytest.raises(InputError, match="topk"):
        num_kept_blocks(topk, 10)


def test_block_mean_tail_uses_valid_tokens_only():
    x = torch.randn(1, 2, 130, 8)
    pooled = block_mean(x, 64)
    assert pooled.shape == (1, 2, 3, 8)
    torch.testing.assert_close(pooled[:, :, 2], x[:, :, 128:].mean(2))
    torch.testing.assert_close(pooled[:, :, 0], x[:, :, :64].mean(2))


# ------------------------------------------------------------------------------------------------ references
@pytest.mark.parametrize("lq,lk,d", [(300, 300, 128), (1000, 1000, 64), (257, 512, 128), (7, 7, 64), (1, 33, 128)])
def test_sage_reference_accuracy_vs_exact(lq, lk, d):
    q, k, v = structured_qkv(1, 2, lq, d, seed=lq + d, nk=lk)
    cos, l1, _ = metrics(sage_attention_reference(q, k, v), attention_fp32_reference(q, k, v))
    assert cos >= 0.999 and l1 <= 0.03, (cos, l1)


def test_sage_reference_is_realistic_not_trivial():
    """The structured inputs give peaked attention; plain unquantized bf16 would be far tighter than Sage."""
    q, k, v = structured_qkv(1, 1, 512, 128, seed=3)
    p = torch.softmax(q[0, 0] @ k[0, 0].T / 128 ** 0.5, -1)
    assert float(p.max(-1).values.mean()) > 0.05  # far above uniform 1/512
    _, l1, _ = metrics(sage_attention_reference(q, k, v), attention_fp32_reference(q, k, v))
    assert l1 > 1e-4  # the quantization is really emulated


def test_dense_block_reference_equals_exact_and_chunks(monkeypatch):
    q, k, v = structured_qkv(2, 2, 200, 64, seed=5, nk=150)
    exact = attention_fp32_reference(q, k, v)
    torch.testing.assert_close(block_attention_reference(q, k, v, None, 64, 64, sage=False), exact,
                               rtol=1e-4, atol=1e-5)
    full = sage_attention_reference(q, k, v)
    monkeypatch.setattr(sa_mod, "_REF_BUDGET", 1000)  # forces one query block and one head per chunk
    torch.testing.assert_close(block_attention_reference(q, k, v, None, 64, 64, sage=False), exact,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sage_attention_reference(q, k, v), full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention_fp32_reference(q, k, v), exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lq,blk_q,blk_k", [(300, 64, 128), (129, 128, 64), (65, 64, 64)])
def test_sla_with_zero_proj_is_block_sparse_attention(lq, blk_q, blk_k):
    q, k, v = structured_qkv(1, 2, lq, 64, seed=lq)
    zw, zb = torch.zeros(64, 64), torch.zeros(64)
    lut = sla_block_map(q, k, 0.3, blk_q, blk_k)
    out = sla_reference(q, k, v, zw, zb, 0.3, blk_q, blk_k)
    torch.testing.assert_close(out.double(), masked_sparse_attention(q, k, v, lut, blk_q, blk_k),
                               rtol=1e-4, atol=1e-5)


def test_sla_keeping_every_block_is_dense_plus_linear():
    q, k, v = structured_qkv(1, 2, 200, 64, seed=9)
    w, b = proj(64)
    out = sla_reference(q, k, v, w, b, 1.0, 64, 64)
    ref = attention_fp32_reference(q, k, v) + linear_branch_reference(q, k, v, w, b)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_linear_branch_matches_per_token_formula():
    q, k, v = structured_qkv(1, 1, 40, 64, seed=2)
    w, b = proj(64, seed=4)
    out = linear_branch_reference(q, k, v, w, b)
    fq, fk = torch.softmax(q.double(), -1)[0, 0], torch.softmax(k.double(), -1)[0, 0]
    for i in (0, 17, 39):
        weights = fk @ fq[i]  # φ(q_i)·φ(k_j) for every j
        o_l = (weights[:, None] * v[0, 0].double()).sum(0) / (weights.sum() + 1e-5)
        torch.testing.assert_close(out[0, 0, i].double(), o_l @ w.double().T + b.double(), rtol=1e-5, atol=1e-6)


def test_sage_sla_reference_close_to_sla_reference():
    q, k, v = structured_qkv(1, 2, 600, 128, seed=11)
    w, b = proj(128)
    cos, _, l2 = metrics(sage_sla_reference(q, k, v, w, b), sla_reference(q, k, v, w, b))
    assert cos >= 0.999 and l2 <= 0.03, (cos, l2)


# ------------------------------------------------------------------------------------------------ ops on CPU
@pytest.mark.parametrize("n", [1, 7, 63, 64, 65, 129, 300, 1000])
def test_ops_any_length_cpu(n):
    q, k, v = structured_qkv(1, 2, n, 64, dtype=torch.bfloat16, seed=n)
    w, b = proj(64)
    for out in (sage_attention(q, k, v), sage_sla(q, k, v, w, b), sla(q, k, v, w, b, 0.1, 64, 64)):
        assert out.shape == q.shape and out.dtype == torch.bfloat16
        assert bool(torch.isfinite(out).all())
    ref = attention_fp32_reference(q, k, v)
    cos, l1, _ = metrics(sage_attention(q, k, v), ref)
    assert cos >= 0.999 and l1 <= 0.03


def test_cross_attention_lengths_cpu():
    q, k, v = structured_qkv(2, 2, 100, 128, dtype=torch.float32, seed=1, nk=512)
    out = sage_attention(q, k, v)
    assert out.shape == (2, 2, 100, 128)
    cos, l1, _ = metrics(out, attention_fp32_reference(q, k, v))
    assert cos >= 0.999 and l1 <= 0.03


@pytest.mark.parametrize("bad", ["rank", "heads", "kv", "dtype", "blk", "proj"])
def test_bad_inputs_raise_one_line_errors(bad):
    q, k, v = structured_qkv(1, 2, 10, 64)
    w, b = proj(64)
    blk = 64
    if bad == "rank":
        q = q[0]
    elif bad == "heads":
        k = k.expand(1, 2, 10, 64)[:, :1]
    elif bad == "kv":
        v = v[:, :, :5]
    elif bad == "dtype":
        v = v.double()
    elif bad == "blk":
        blk = 48
    elif bad == "proj":
        w = w[:32]
    err = InputError if bad == "dtype" else UnsupportedShapeError
    with pytest.raises(err) as info:
        sla(q, k, v, w, b, 0.1, blk, 64)
    assert "\n" not in str(info.value)


def test_fake_impls_and_export():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 12, 32760, 128, dtype=torch.bfloat16)
        kx = torch.empty(2, 12, 512, 128, dtype=torch.bfloat16)
        w, b = torch.empty(128, 128), torch.empty(128)
        assert sage_attention(q, kx, kx).shape == q.shape
        for op in (sage_sla, sla):
            out = op(q, q, q, w, b, 0.1, 64, 128)
            assert out.shape == q.shape and out.dtype == torch.bfloat16

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = (torch.nn.Parameter(t) for t in proj(64))

        def forward(self, q, k, v):
            x = torch.ops.turbocompile.sage_sla(q, k, v, self.w, self.b, 0.1, 64, 128)
            x = x + torch.ops.turbocompile.sla(q, k, v, self.w, self.b, 0.15, 128, 64)
            return x + torch.ops.turbocompile.sage_attention(q, k, v, 128, 64)

    q, k, v = structured_qkv(1, 2, 70, 64)
    model = Tiny()
    ep = torch.export.export(model, (q, k, v))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"turbocompile.sage_sla.default", "turbocompile.sla.default",
            "turbocompile.sage_attention.default"} <= targets
    torch.testing.assert_close(ep.module()(q, k, v), model(q, k, v))


# ------------------------------------------------------------------------------------------------ Triton, interpreted
_INTERP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from turbocompile.kernels.block_map import block_mean, sla_block_map
    from turbocompile.kernels.sage_attention import (block_attention_reference, block_attention_triton,
                                                     sage_quantize_reference, sage_quantize_triton, structured_qkv)
    from turbocompile.kernels.sage_sla import sage_sla_reference, sage_sla_triton
    from turbocompile.kernels.sla import linear_branch_stats, sla_reference, sla_triton

    import turbocompile.kernels.sage_attention as sa
    sa._sm_count = lambda device: 1  # as if on a small GPU: several token blocks per quantizer program

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    out = []
    for n, d, nk, dtype in json.loads(sys.argv[1]):
        dt = getattr(torch, dtype)
        q, k, v = structured_qkv(1, 2, n, d, dt, seed=n + d, nk=nk)
        g = torch.Generator().manual_seed(n)
        w, b = torch.randn(d, d, generator=g) * 0.05, torch.randn(d, generator=g) * 0.05
        nan = lambda: torch.full_like(q, float("nan"))
        r = {"n": n, "d": d, "nk": nk, "dtype": dtype}
        o = block_attention_triton(q, k, v, None, 128, 64, sage=True, out=nan())
        r["dense"] = rel(o, block_attention_reference(q, k, v, None, 128, 64, sage=True))
        r["dense_nan"] = bool(o.isnan().any())
        if n == nk:
            lut = sla_block_map(q, k, 0.2, 64, 128)
            o = sage_sla_triton(q, k, v, w, b, 0.2, 64, 128, lut=lut, out=nan())
            r["sage_sla"] = rel(o, sage_sla_reference(q, k, v, w, b, 0.2, 64, 128, lut=lut))
            o2 = sla_triton(q, k, v, w, b, 0.2, 64, 128, lut=lut, out=nan())
            r["sla"] = rel(o2, sla_reference(q, k, v, w, b, 0.2, 64, 128, lut=lut))
            r["sparse_nan"] = bool(o.isnan().any() or o2.isnan().any())
            # the linear statistics alone against their fp32 definitions
            (m, z, _), mom = linear_branch_stats(k, v, w, b)
            phi = torch.softmax(k.float(), dim=-1)
            r["stats"] = max(rel(m.float(), (torch.matmul(phi.transpose(-1, -2), v.float()) @ w.t()).reshape(m.shape)),
                             rel(z, phi.sum(2).reshape(z.shape)), rel(mom["k_mean"], k.float().mean(2)),
                             rel(mom["v_amax"], v.float().abs().amax(2)),
                             rel(mom["v_scale"], v.float().abs().amax(2).clamp_min(1e-6) / 448))
            # the quantizers against the PyTorch quantization (same math; ties may round apart: x·(mul/scale) is
            # one multiply where the reference divides), and φ(q)/den, which the pass over Q writes for the
            # linear branch
            qt = sage_quantize_triton(q, k, v, 64, 128, **mom, linear_z=z)
            qr = sage_quantize_reference(q, k, v, 64, 128)
            diffs = [(qt[x][:, :, :n].int() - qr[x].int()).abs() for x in ("q", "k")]
            r["int8_max_off"] = max(int(t.max()) for t in diffs)
            r["int8_frac_off"] = [float((t > 0).float().mean()) for t in diffs]
            r["pad_zero"] = bool((qt["q"][:, :, n:] == 0).all() and (qt["k"][:, :, n:] == 0).all())
            r["scales"] = max(rel(qt["q_scale"], qr["q_scale"]), rel(qt["k_scale"], qr["k_scale"]))
            # pooled means of Q and of smoothed K (near 0 where one block holds every token): max error over max |x|
            amax_err = lambda a, ref, x: float((a - ref).abs().max() / x.float().abs().max())
            r["pools"] = max(amax_err(qt["q_pool"], block_mean(q.float(), 64), q),
                             amax_err(qt["k_pool"], block_mean(k.float() - k.float().mean(2, keepdim=True), 128), k))
            phi = torch.softmax(q.float(), dim=-1)
            phi = phi / (phi @ z.view(1, 2, d, 1) + 1e-5)
            r["phi"] = rel(qt["lin_phi"][:, :, :n], phi)
            r["phi_nan"] = bool(qt["lin_phi"].isnan().any())
            # other program shapes give the same bytes: 2 blocks per program (several programs per head), prefetch
            # on and off, one block per program; the two-pass kernel in 16-row chunks (loop unrolled by 2) and
            # 32-row chunks; pooled means up to the fp32 summation order, which the chunking sets; strided inputs
            keep, same = dict(sa.QUANT_CONFIGS), []
            for stages, bpp, pf in ((1, 2, True), (1, 2, False), (1, 1, False), (2, 16, sa.TWO_PASS),
                                    (1, 32, sa.TWO_PASS)):
                sa.QUANT_CONFIGS.update({key: (cfg[0], stages, bpp, pf) for key, cfg in keep.items()})
                qt2 = sage_quantize_triton(q, k, v, 64, 128, **mom, linear_z=z)
                same.append(all(torch.equal(qt[x], qt2[x]) for x in ("q", "k", "q_scale", "k_scale", "lin_phi"))
                            and all(torch.allclose(qt[x], qt2[x], rtol=0.0, atol=1e-6 * float(t.abs().max()))
                                    for x, t in (("q_pool", q), ("k_pool", k))))
            sa.QUANT_CONFIGS.update(keep)
            # (B, H, L, D) views of (B, L, H, D) tensors, as the exported Wan graph passes them: same bytes
            view = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)
            qt3 = sage_quantize_triton(view(q), view(k), view(v), 64, 128, **mom, linear_z=z)
            same.append(all(torch.equal(qt[x], qt3[x]) for x in ("q", "k", "v", "q_scale", "k_scale", "q_pool",
                                                                 "k_pool", "lin_phi")))
            r["program_shapes_agree"] = same
        out.append(r)
    print("RESULT" + json.dumps(out))
""")

_INTERP_CASES = [(1, 64, 1, "bfloat16"), (7, 64, 7, "bfloat16"), (63, 64, 63, "bfloat16"),
                 (64, 64, 64, "bfloat16"), (65, 128, 65, "bfloat16"), (129, 64, 129, "bfloat16"),
                 (300, 64, 300, "float16"), (70, 128, 512, "bfloat16")]


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton", reason="Triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _INTERP_SCRIPT, json.dumps(_INTERP_CASES)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("case", range(len(_INTERP_CASES)))
def test_triton_kernels_match_references_interpreted(interpreted, case):
    r = interpreted[case]
    # bf16 outputs round to 2^-9 (the interpreter truncates, doubling it); fp16 shows how tight the emulation is
    tol = 2e-3 if r["dtype"] == "float16" else 1e-2
    assert not r["dense_nan"] and r["dense"] <= tol, r
    if "sage_sla" in r:
        assert not r["sparse_nan"], r
        assert r["sage_sla"] <= tol and r["sla"] <= 1e-2, r
        assert r["stats"] <= 1e-2, r  # φ goes to bf16 before its dots (M, and z through a dot with ones)
        assert r["int8_max_off"] <= 1 and max(r["int8_frac_off"]) <= 1e-2 and r["pad_zero"], r
        assert r["scales"] <= 1e-6 and r["pools"] <= 1e-5, r
        assert not r["phi_nan"] and r["phi"] <= 8e-3, r  # bf16 rounding of φ(q)/den (2^-9, the interpreter 2^-8)
        assert all(r["program_shapes_agree"]), r


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n", [1, 65, 1000, 4097])
def test_cuda_ops_match_references(n):
    dev = torch.device("cuda")
    q, k, v = structured_qkv(1, 2, n, 128, torch.bfloat16, dev, seed=n)
    w, b = (t.to(dev) for t in proj(128))
    cos, l1, _ = metrics(sage_attention(q, k, v), attention_fp32_reference(q, k, v))
    assert cos >= 0.999 and l1 <= 0.03
    lut = sla_block_map(q, k, 0.1, 64, 128)
    _, _, l2 = metrics(sage_sla(q, k, v, w, b, 0.1, 64, 128), sage_sla_reference(q, k, v, w, b, 0.1, 64, 128,
                                                                                   lut=lut))
    assert l2 <= 1e-2
    _, _, l2 = metrics(sla(q, k, v, w, b, 0.1, 64, 128), sla_reference(q, k, v, w, b, 0.1, 64, 128, lut=lut))
    assert l2 <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n", [4097, 32760])
def test_sage_sla_lut_on_a_side_stream_is_the_same_eager_and_in_a_cuda_graph(n, monkeypatch):
    """The top-k LUT on a second stream beside V's quantizer (fork/join) gives the one-stream result bit for bit,
    eagerly and captured into a CUDA graph, whose replays follow new inputs."""
    from turbocompile.kernels import sage_sla as S

    dev = torch.device("cuda")
    q, k, v = structured_qkv(1, 12, n, 128, torch.bfloat16, dev, seed=n)
    q2, k2, v2 = structured_qkv(1, 12, n, 128, torch.bfloat16, dev, seed=n + 1)
    w, b = (t.to(dev) for t in proj(128))
    monkeypatch.setattr(S, "LUT_BESIDE_V", False)
    ref, ref2 = S.sage_sla_triton(q, k, v, w, b, 0.1), S.sage_sla_triton(q2, k2, v2, w, b, 0.1)
    monkeypatch.setattr(S, "LUT_BESIDE_V", True)
    assert torch.equal(S.sage_sla_triton(q, k, v, w, b, 0.1), ref)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graphs advises
        S.sage_sla_triton(q, k, v, w, b, 0.1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = S.sage_sla_triton(q, k, v, w, b, 0.1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref)
    for x, x2 in ((q, q2), (k, k2), (v, v2)):
        x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref2)
