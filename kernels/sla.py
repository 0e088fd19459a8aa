"""SLA (sparse-linear attention) in the input precision, as ``torch.ops.turbocompile.sla``; also the linear branch
that ``sage_sla`` shares.

``o = o_sparse + (o_l @ proj_weight.T + proj_bias)`` (TurboDiffusion's released form, linear branch over ALL tokens):

* ``o_sparse``: exact softmax attention of each ``blk_q`` query block over only the key blocks the SLA block map
  keeps (:mod:`.block_map`), padded tail keys masked;
* ``o_l = φ(q) (φ(k)ᵀ v) / (φ(q) · Σ_j φ(k_j) + 1e-5)`` with φ = softmax over head_dim, over all tokens.

With zero ``proj_weight`` / ``proj_bias`` (SLA's zero-initialised ``proj_l``) it is plain block-sparse attention.

On the GPU: the block map in PyTorch, one Triton pass over K and V for ``φ(K)ᵀV`` and ``Σφ(K)`` (split over token
chunks), one small Triton launch that sums the chunks and folds ``M = (φ(K)ᵀV)·Wᵀ``, and the sparse attention
kernel of :mod:`.sage_attention` in bf16/fp16 with ``φ(q)·M / den + b`` fused into its epilogue. The CPU
implementation is the fp32 reference :func:`sla_reference`.

``python -m turbocompile.kernels.sla --bench`` benchmarks it (see :mod:`.sage_sla`).
"""
from __future__ import annotations

import logging

import torch

from turbocompile.errors import UnsupportedShapeError

from .block_map import sla_block_map
from .sage_attention import (
    HAS_TRITON,
    _interpreting,
    block_attention_reference,
    block_attention_triton,
    check_qkv,
    triton_supported,
)

log = logging.getLogger(__name__)

__all__ = ["sla", "sla_reference", "linear_branch_reference", "linear_branch_stats", "check_proj"]

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .quantize_activations import round_bits
    from .sage_attention import _dot16

    @triton.jit
    def _linear_stats_kernel(K, V, KV, Z, KSUM, VMAX, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh,
                             stride_vl, H, L, CHUNK, HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr,
                             EMULATE: tl.constexpr):
        """Partial ``φ(K)ᵀV`` [D, D] and ``Σ φ(K)`` [D] of one token chunk of one head (φ = softmax over D), and
        while K and V pass by, the chunk's ``Σ K`` and ``max |V|`` per channel (the Sage prologue's moments).

        No cross-thread reduction inside the loop: the token sum of φ is a dot with a [BLOCK_L, 16] tile of ones on
        the tensor cores (every column the same sum; φᵀ is already in shared memory for the main dot), Σ K an
        elementwise running sum in fp32, max |V| an elementwise running max in the input dtype (exact); all three
        are reduced once after the loop. (Σ K as a dot too needed a second transpose of K through shared memory:
        2.4x slower at 1.3B@480p.)"""
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        cols = tl.arange(0, HEAD_DIM)
        acc = tl.zeros([HEAD_DIM, HEAD_DIM], dtype=tl.float32)
        zsum = tl.zeros([HEAD_DIM, 16], dtype=tl.float32)
        ksum = tl.zeros([BLOCK_L, HEAD_DIM], dtype=tl.float32)
        vmax = tl.zeros([BLOCK_L, HEAD_DIM], dtype=V.dtype.element_ty)
        ones = tl.full([BLOCK_L, 16], 1.0, V.dtype.element_ty)
        lo = pid * CHUNK
        hi = tl.minimum(lo + CHUNK, L)
        for start in range(lo, hi, BLOCK_L):
            rows = start + tl.arange(0, BLOCK_L)
            ok = rows < hi
            k = tl.load(K + b * stride_kb + h * stride_kh + rows[:, None] * stride_kl + cols[None, :],
                        mask=ok[:, None], other=0.0)
            kf = k.to(tl.float32)
            e = tl.math.exp2((kf - tl.max(kf, 1)[:, None]) * 1.4426950408889634)
            phi = tl.where(ok[:, None], e * (1.0 / tl.sum(e, 1))[:, None], 0.0).to(V.dtype.element_ty)
            v = tl.load(V + b * stride_vb + h * stride_vh + rows[:, None] * stride_vl + cols[None, :],
                        mask=ok[:, None], other=0.0)
            vmax = tl.maximum(vmax, tl.abs(v)).to(V.dtype.element_ty)
            phi_t = tl.trans(phi)
            acc += _dot16(phi_t, v, EMULATE)  # [D_phi, D_v]
            zsum += _dot16(phi_t, ones, EMULATE)
            ksum += kf
        out = pid * tl.num_programs(1) + bh
        tl.store(KV + out * HEAD_DIM * HEAD_DIM + cols[:, None] * HEAD_DIM + cols[None, :], acc)
        tl.store(Z + out * HEAD_DIM + cols, tl.sum(zsum, 1) * (1.0 / 16))
        tl.store(KSUM + out * HEAD_DIM + cols, tl.sum(ksum, 0))
        tl.store(VMAX + out * HEAD_DIM + cols, tl.max(vmax.to(tl.float32), 0))

    @triton.jit
    def _linear_stats_finish_kernel(KV, Z, KSUM, VMAX, W, BIAS, M_OUT, Z_OUT, KMEAN, VAMAX, VSCALE, BIAS_OUT,
                                    n_chunks, BH, n_tokens, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
                                    EMULATE: tl.constexpr):
        """``ROWS`` rows of one head's ``M = (Σ chunks φ(K)ᵀV)·Wᵀ`` in bf16 (3xTF32 on the tensor cores: fp32
        accuracy), and in the head's first program the moments summed over the chunks and FP8 V's scale: one launch
        where PyTorch needed eleven small ones."""
        bh = tl.program_id(0)
        r0 = tl.program_id(1) * ROWS
        rr = r0 + tl.arange(0, ROWS)
        c = tl.arange(0, HEAD_DIM)
        kv = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
        for i in range(n_chunks):
            kv += tl.load(KV + ((i * BH + bh) * HEAD_DIM + rr[:, None]) * HEAD_DIM + c[None, :])
        w_t = tl.load(W + c[None, :] * HEAD_DIM + c[:, None]).to(tl.float32)  # Wᵀ[j, o] = W[o, j]
        if EMULATE:  # the CPU interpreter: fp32 dot, pre-rounded to bf16 (its bf16 cast does not round to even)
            m = round_bits(tl.dot(kv, w_t, input_precision="ieee"), 16)
        else:
            m = tl.dot(kv, w_t, input_precision="tf32x3")
        tl.store(M_OUT + (bh * HEAD_DIM + rr[:, None]) * HEAD_DIM + c[None, :], m.to(tl.bfloat16))
        if r0 == 0:
            z = tl.zeros([HEAD_DIM], dtype=tl.float32)
            ksum = tl.zeros([HEAD_DIM], dtype=tl.float32)
            vmax = tl.zeros([HEAD_DIM], dtype=tl.float32)
            for i in range(n_chunks):
                part = (i * BH + bh) * HEAD_DIM
                z += tl.load(Z + part + c)
                ksum += tl.load(KSUM + part + c)
                vmax = tl.maximum(vmax, tl.load(VMAX + part + c))
            tl.store(Z_OUT + bh * HEAD_DIM + c, z)
            tl.store(KMEAN + bh * HEAD_DIM + c, ksum / n_tokens)
            tl.store(VAMAX + bh * HEAD_DIM + c, vmax)
            tl.store(VSCALE + bh * HEAD_DIM + c, tl.math.div_rn(tl.maximum(vmax, 1e-6), 448.0))  # FP8 V's scale
            if bh == 0:
                tl.store(BIAS_OUT + c, tl.load(BIAS + c).to(tl.float32))


def check_proj(q: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor) -> None:
    """proj_l is a [D, D] weight and a [D] bias applied per head on the last dim."""
    d = q.shape[-1]
    if tuple(proj_weight.shape) != (d, d) or tuple(proj_bias.shape) != (d,):
        raise UnsupportedShapeError(
            f"proj_weight {tuple(proj_weight.shape)} / proj_bias {tuple(proj_bias.shape)} must be ({d}, {d}) / ({d},) "
            f"for head_dim {d}: pass SLA's proj_l weight and bias")


def linear_branch_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor,
                            proj_bias: torch.Tensor) -> torch.Tensor:
    """SLA's linear branch after ``proj_l``, in fp32: ``(φ(q)(φ(k)ᵀv) / (φ(q)·Σφ(k) + 1e-5)) Wᵀ + b``."""
    phi_k = torch.softmax(k.float(), dim=-1)
    kv = torch.matmul(phi_k.transpose(-1, -2), v.float())  # [B, H, D, D]
    z = phi_k.sum(dim=2)  # [B, H, D]
    phi_q = torch.softmax(q.float(), dim=-1)
    o_l = torch.matmul(phi_q, kv) / (torch.matmul(phi_q, z[..., None]) + 1e-5)
    return torch.matmul(o_l, proj_weight.float().t()) + proj_bias.float()


#: (programs per SM, tokens per step, warps) of the linear-statistics kernel (:func:`linear_branch_stats`); measured
#: on an H200 (docs/kernels-attention.md): 0.135 / 0.79 ms at 1.3B@480p / 14B@720p, against 0.25 / 1.39 for the
#: kernel with in-loop column reductions it replaced (4 warps, 4 programs per SM); 2 or 3 programs per SM (the
#: second waits: 248 registers x 8 warps fill the register file) 0.15-0.16 / 0.83 ms.
LINEAR_STATS_CONFIG: tuple[int, int, int] = (1, 64, 8)


def _stats_partials(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-chunk ``φ(K)ᵀV`` [C, B·H, D, D], ``Σφ(K)``, ``Σ K``, ``max |V|`` [C, B·H, D]: the Gluon kernel on
    sm_90 (:mod:`.linear_stats_gluon`), the Triton kernel elsewhere (and where the Gluon one declines or fails to
    run)."""
    from . import linear_stats_gluon

    if linear_stats_gluon.supported(k, v) is None:
        try:
            return linear_stats_gluon.linear_stats_partials(k, v)
        except Exception as exc:  # noqa: BLE001 - an incompatible Triton: fall back once, see gluon_guard
            if not linear_stats_gluon.GUARD.launch_failed(exc):
                raise
    b, h, lk, d = k.shape
    sms = torch.cuda.get_device_properties(k.device).multi_processor_count if k.is_cuda else 132
    per_sm, block_l, warps = LINEAR_STATS_CONFIG
    n_chunks, chunk = linear_stats_gluon.chunking(lk, b * h, per_sm * sms, block_l)
    kv = torch.empty((n_chunks, b * h, d, d), dtype=torch.float32, device=k.device)
    z, ksum, vmax = (torch.empty((n_chunks, b * h, d), dtype=torch.float32, device=k.device) for _ in range(3))
    _linear_stats_kernel[(n_chunks, b * h)](
        k, v, kv, z, ksum, vmax, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), h, lk,
        chunk, HEAD_DIM=d, BLOCK_L=block_l, EMULATE=_interpreting(), num_warps=warps)
    return kv, z, ksum, vmax


def linear_branch_stats(k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor,
                        proj_bias: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], dict]:
    """One pass over K and V (:func:`_stats_partials`), then one launch that sums its chunks. Returns what the
    fused epilogue needs, ``(M = (φ(K)ᵀV)·Wᵀ`` [B·H, D, D] bf16, ``z = Σφ(K)`` [B·H, D] fp32, bias fp32), and the
    moments ``{"k_mean", "v_amax", "v_scale"}`` [B, H, D] fp32 (``v_scale`` = FP8 V's per-channel scale,
    ``max(v_amax, 1e-6) / 448``)."""
    b, h, lk, d = k.shape
    kv, z, ksum, vmax = _stats_partials(k, v)
    n_chunks = kv.shape[0]
    f32 = dict(dtype=torch.float32, device=k.device)
    m = torch.empty((b * h, d, d), dtype=torch.bfloat16, device=k.device)
    z_sum, k_mean, v_amax, v_scale = (torch.empty((b * h, d), **f32) for _ in range(4))
    bias = torch.empty(d, **f32)
    rows = 16  # rows of M per program: 8 warps, no spills (the 3xTF32 operands of 64 rows need 192 KB of shared memory)
    _linear_stats_finish_kernel[(b * h, d // rows)](
        kv, z, ksum, vmax, proj_weight.contiguous(), proj_bias.contiguous(), m, z_sum, k_mean, v_amax, v_scale, bias,
        n_chunks, b * h, float(lk), HEAD_DIM=d, ROWS=rows, EMULATE=_interpreting(), num_warps=8)
    return (m, z_sum, bias), {"k_mean": k_mean.view(b, h, d), "v_amax": v_amax.view(b, h, d),
                              "v_scale": v_scale.view(b, h, d)}


def sparse_linear_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor,
                            proj_bias: torch.Tensor, topk: float, blk_q: int, blk_k: int, lut: torch.Tensor | None,
                            sage: bool) -> torch.Tensor:
    """The SLA family in PyTorch: block-sparse branch (exact fp32, or Sage-emulated) plus the projected linear branch."""
    check_qkv(q, k, v, blk_q, blk_k)
    check_proj(q, proj_weight, proj_bias)
    if lut is None:
        lut = sla_block_map(q, k, topk, blk_q, blk_k)
    o_s = block_attention_reference(q, k, v, lut, blk_q, blk_k, sage=sage)
    return (o_s + linear_branch_reference(q, k, v, proj_weight, proj_bias)).to(q.dtype)


def sla_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor,
                  proj_bias: torch.Tensor, topk: float = 0.1, blk_q: int = 64, blk_k: int = 128,
                  lut: torch.Tensor | None = None) -> torch.Tensor:
    """SLA in PyTorch (fp32 math): exact block-sparse softmax over the block map plus the projected linear branch."""
    return sparse_linear_reference(q, k, v, proj_weight, proj_bias, topk, blk_q, blk_k, lut, sage=False)


def dispatch_cuda(name: str, fast, reference, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  proj_weight: torch.Tensor, proj_bias: torch.Tensor, topk: float, blk_q: int, blk_k: int):
    """CUDA impl of an SLA-family op: the Triton path, or the reference with a warning where Triton can't run."""
    check_qkv(q, k, v, blk_q, blk_k)
    check_proj(q, proj_weight, proj_bias)
    why = triton_supported(q, blk_q, blk_k)
    if why is not None:
        log.warning("%s: %s; running the PyTorch reference (slow)", name, why)
        return reference(q, k, v, proj_weight, proj_bias, topk, blk_q, blk_k)
    return fast(q, k, v, proj_weight, proj_bias, topk, blk_q, blk_k)


def sla_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor,
               topk: float = 0.1, blk_q: int = 64, blk_k: int = 128, lut: torch.Tensor | None = None,
               config: tuple[int, int, int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """SLA on the Triton path (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if lut is None:
        lut = sla_block_map(q, k, topk, blk_q, blk_k)
    lin, _ = linear_branch_stats(k, v, proj_weight, proj_bias)
    return block_attention_triton(q, k, v, lut, blk_q, blk_k, sage=False, linear=lin, config=config, out=out)


@torch.library.custom_op("turbocompile::sla", mutates_args=())
def _sla_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor,
            topk: float = 0.1, blk_q: int = 64, blk_k: int = 128) -> torch.Tensor:
    return sla_reference(q, k, v, proj_weight, proj_bias, topk, blk_q, blk_k)


@_sla_op.register_kernel("cuda")
def _sla_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor,
              topk: float = 0.1, blk_q: int = 64, blk_k: int = 128) -> torch.Tensor:
    return dispatch_cuda("sla", sla_triton, sla_reference, q, k, v, proj_weight, proj_bias, topk, blk_q, blk_k)


def sla_family_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor,
                    proj_bias: torch.Tensor, topk: float = 0.1, blk_q: int = 64, blk_k: int = 128) -> torch.Tensor:
    """Fake impl of ``sla`` and ``sage_sla`` (same schema): the real impl's checks, then q's shape and dtype."""
    check_qkv(q, k, v, blk_q, blk_k)
    check_proj(q, proj_weight, proj_bias)
    return q.new_empty(q.shape)


_sla_op.register_fake(sla_family_fake)


def sla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor,
        topk: float = 0.1, blk_q: int = 64, blk_k: int = 128) -> torch.Tensor:
    """SLA of (B, H, L, D) tensors in the input precision. Same as ``torch.ops.turbocompile.sla``."""
    return torch.ops.turbocompile.sla(q, k, v, proj_weight, proj_bias, topk, blk_q, blk_k)


def bench_prologue_main(argv: list[str] | None = None) -> None:  # pragma: no cover - needs a GPU
    """Time the SLA/Sage prologue kernels one by one at the Wan shapes: the linear statistics in each
    ``--stats-configs`` (checked against the fp32 reference), and the Q, K and V quantizers."""
    import argparse
    import json
    import os

    from . import linear_stats_gluon
    from .sage_attention import (
        ATTENTION_BENCH_SHAPES,
        _quantize_v_into,
        bench_meta,
        bench_ms,
        sage_quantize_triton,
        structured_qkv,
    )

    ap = argparse.ArgumentParser(description="SLA/Sage prologue kernels, one by one")
    ap.add_argument("--shapes", default="1.3B@480p,14B@720p")
    ap.add_argument("--stats-configs", default="gluon,4;gluon,3;gluon,6;gluon-blhd,4;1,64,8",
                    help="linear statistics kernels, ';'-separated: 'gluon,STAGES' (Hopper; 'gluon-blhd' reads K, V "
                         "in (B, L, H, D) memory order) or the Triton kernel's 'programs per SM,tokens per step,warps'")
    ap.add_argument("--quant-configs", default="",
                    help="int8 quantizer configs to sweep, ';'-separated 'blk,phi:warps,stages,blocks,prefetch' "
                         "(e.g. '64,1:8,1,8,1'), each timed and checked against the default's output")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    meta = bench_meta()
    print(meta, flush=True)
    rows = []

    def say(shape, name, ms, nbytes, **extra):
        rows.append({"shape": shape, "name": name, "ms": ms, "tb_s": nbytes / ms / 1e9, **extra})
        print(f"{shape:10} {name:44} {ms:7.3f} ms  {nbytes / ms / 1e9:5.2f} TB/s "
              + " ".join(f"{k_} {v_:.2e}" for k_, v_ in extra.items()), flush=True)

    global LINEAR_STATS_CONFIG
    for shape in args.shapes.split(","):
        b, h, n, d = ATTENTION_BENCH_SHAPES[shape]
        q, k, v = structured_qkv(b, h, n, d, torch.bfloat16, torch.device("cuda"), seed=3)
        w, bias = torch.randn(d, d, device="cuda") * 0.05, torch.randn(d, device="cuda") * 0.05
        phi = torch.softmax(k.float(), dim=-1)
        ref_m = torch.matmul(torch.matmul(phi.transpose(-1, -2), v.float()), w.t()).reshape(b * h, d, d)
        ref_z = phi.sum(2).reshape(b * h, d)
        ref_kmean, ref_vamax = k.float().mean(2), v.float().abs().amax(2)
        del phi
        keep = LINEAR_STATS_CONFIG, linear_stats_gluon.NUM_STAGES
        for cfg in args.stats_configs.split(";"):
            kind, _, rest = cfg.partition(",")
            kk, vv = k, v
            if kind.startswith("gluon"):  # the Gluon kernel with this many stages
                os.environ.pop("TURBOCOMPILE_LINEAR_STATS_KERNEL", None)
                linear_stats_gluon.NUM_STAGES = int(rest)
                if kind == "gluon-blhd":
                    kk, vv = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (k, v))
                why = linear_stats_gluon.supported(kk, vv)
                if why:
                    print(f"{shape:10} linear stats {cfg}: not run ({why})", flush=True)
                    continue
            else:
                os.environ["TURBOCOMPILE_LINEAR_STATS_KERNEL"] = "triton"
                LINEAR_STATS_CONFIG = tuple(int(x) for x in cfg.split(","))
            try:
                (m, z, _), mom = linear_branch_stats(kk, vv, w, bias)
                errs = {"M": float((m.float() - ref_m).norm() / ref_m.norm()),
                        "z": float((z - ref_z).norm() / ref_z.norm()),
                        "kmean": float((mom["k_mean"] - ref_kmean).abs().max() / ref_kmean.abs().max()),
                        "vamax": float((mom["v_amax"] - ref_vamax).abs().max())}
                say(shape, f"linear stats {cfg}", bench_ms(lambda: linear_branch_stats(kk, vv, w, bias)),
                    2 * k.numel() * 2, **errs)
            except Exception as exc:  # noqa: BLE001 - a config that fails to compile or launch is reported
                print(f"{shape:10} linear stats {cfg}: failed {exc}", flush=True)
            del kk, vv
        os.environ.pop("TURBOCOMPILE_LINEAR_STATS_KERNEL", None)
        LINEAR_STATS_CONFIG, linear_stats_gluon.NUM_STAGES = keep
        mom = linear_branch_stats(k, v, w, bias)[1]
        quant = sage_quantize_triton(q, k, v, 64, 128, **mom, v_order="wgmma")
        lin = linear_branch_stats(k, v, w, bias)[0]
        _time_quantizers(shape, q, k, quant, lin, say)
        _sweep_quant_configs(args.quant_configs, shape, q, k, quant, lin, say)
        for order in ("natural", "wgmma"):
            say(shape, f"quantize V (fp8, transposed, {order} order)", bench_ms(lambda: _quantize_v_into(
                v, quant["v_scale"], quant["v"], order)), v.numel() * 3)
        say(shape, "copy of q (bf16 read + write, the bandwidth bar)", bench_ms(lambda: q.clone()), q.numel() * 4)
        del q, k, v
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "prologue_bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


def _time_quantizers(shape: str, q, k, quant: dict, lin: tuple, say) -> None:  # pragma: no cover - needs a GPU
    """Time the int8 quantizers: Q; Q with φ(q)/den (checked against fp32); K."""
    from .sage_attention import _quantize_int8_into, bench_ms

    b, h, n, d = q.shape
    phi_ref = torch.softmax(q.float(), dim=-1)
    phi_ref = phi_ref / (phi_ref @ lin[1].view(b, h, d, 1) + 1e-5)
    jobs = [("quantize Q (int8, 64-token blocks, pooled)", q, None, "q", 64, False, 3),
            ("quantize Q + φ(q)/den for the linear branch", q, None, "q", 64, True, 5),
            ("quantize K (int8, 128-token blocks, pooled)", k, quant["k_mean"], "k", 128, False, 3)]
    for title, x, mean, name, blk, linear, bytes_per in jobs:
        xq, sc, pool = (torch.empty_like(quant[name + sfx]) for sfx in ("", "_scale", "_pool"))
        phi = torch.empty(xq.shape, dtype=torch.bfloat16, device=x.device) if linear else None
        z = lin[1] if linear else None
        run = lambda: _quantize_int8_into(x, mean, xq, sc, pool, blk, 1.0, z, phi)  # noqa: E731,B023
        run()
        extra = {"phi": float((phi[:, :, :n].float() - phi_ref).norm() / phi_ref.norm())} if linear else {}
        say(shape, title, bench_ms(run), x.numel() * bytes_per, **extra)


def _sweep_quant_configs(spec: str, shape: str, q, k, quant: dict, lin: tuple, say) -> None:  # pragma: no cover
    """Time each int8 quantizer config of ``spec`` (see ``--quant-configs``); int8 and scales must equal the
    default config's bit for bit (and φ(q)/den with it)."""
    from . import sage_attention as sa

    for item in filter(None, spec.split(";")):
        key_s, cfg_s = item.split(":")
        blk, linear = (int(t) for t in key_s.split(","))
        w, st, bpp, pf = (int(t) for t in cfg_s.split(","))
        key = (blk, bool(linear))
        x, mean = (q, None) if blk == 64 else (k, quant["k_mean"])
        mul = 1.0
        outs = []
        for cfg in (sa.QUANT_CONFIGS[key], (w, st, bpp, pf if pf == sa.TWO_PASS else bool(pf))):
            keep = sa.QUANT_CONFIGS[key]
            sa.QUANT_CONFIGS[key] = cfg
            try:
                name = "q" if blk == 64 else "k"
                xq, sc, pool = (torch.empty_like(quant[name + suffix]) for suffix in ("", "_scale", "_pool"))
                phi = torch.empty(xq.shape, dtype=torch.bfloat16, device=x.device) if linear else None
                run = lambda: sa._quantize_int8_into(x, mean, xq, sc, pool, blk, mul,  # noqa: E731
                                                     lin[1] if linear else None, phi)
                run()
                outs.append((xq, sc, phi))
                if len(outs) == 2:
                    same = bool(torch.equal(outs[0][0], xq) and torch.equal(outs[0][1], sc)
                                and (not linear or torch.equal(outs[0][2], phi)))
                    say(shape, f"quantize {'Q' if blk == 64 else 'K'}{'+φ' if linear else ''} cfg {cfg}",
                        sa.bench_ms(run), x.numel() * (5 if linear else 3), same=float(same))
            except Exception as exc:  # noqa: BLE001 - a config that fails to compile or launch is reported
                print(f"{shape:10} quantize cfg {item}: failed {exc}", flush=True)
            finally:
                sa.QUANT_CONFIGS[key] = keep


if __name__ == "__main__":  # pragma: no cover - GPU benchmark entry point
    import sys

    if "--prologue" in sys.argv:
        bench_prologue_main([a for a in sys.argv[1:] if a != "--prologue"])
    else:
        from turbocompile.kernels.sage_sla import bench_main

        bench_main(only="sla")
