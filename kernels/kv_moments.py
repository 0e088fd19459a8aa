"""The dense Sage prologue's two moments in one pass over K and V: the token mean of K (K is smoothed by it before
its int8 quantization) and FP8 V's per-channel scale ``max(max |V|, 1e-6) / 448``.

PyTorch needs two reductions and five small element-wise launches for them (``k.mean``, ``torch.aminmax`` and the
scale arithmetic: 0.12 ms at 1.3B@480p on an H200); here one launch reads each token chunk of K and V once and
writes per-chunk partials, and a second one sums the chunks in a fixed order (deterministic, no atomics) and writes
the mean and the scale. ``sage_sla`` gets the same moments from its linear-statistics pass (:mod:`.sla`), which
reads K and V anyway; this kernel is for the dense ``sage_attention`` op.

Layout: K and V are (B, H, L, D) with any strides whose last one is 1; outputs [B, H, D] fp32.
Benchmark: ``python -m turbocompile.kernels.kv_moments`` (GPU; against the PyTorch reductions)."""

from __future__ import annotations

import os

import torch

from .sage_attention import _SCALE_FLOOR, FP8_MAX, HAS_TRITON, _sm_count

if HAS_TRITON:
    import triton
    import triton.language as tl

#: (tokens per step, warps, programs per SM) of the partial pass. Swept on an H200 (2026-11-27 18:30 UTC, ms at
#: 1.3B@480p / 14B@720p; PyTorch 0.125 / 0.470): (128, 8, 2) 0.062 / 0.381 (3.2 / 4.1 TB/s); (64, 8, 4) 0.106 /
#: 0.648; (32, 4, 8) 0.097 / 0.545; (32, 8, 8) 0.090 / 0.427; (16, 4, 16) 0.102 / 0.429; (256, 8, 1) 0.086 / 0.610
CONFIG: tuple[int, int, int] = (128, 8, 2)
#: what the benchmark sweeps (the first is the default)
SWEEP = [CONFIG, (64, 8, 4), (32, 8, 8), (128, 8, 3), (128, 4, 2), (256, 16, 1)]

if HAS_TRITON:

    @triton.jit
    def _kv_moments_partial_kernel(K, V, KSUM, VMAX, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh,
                                   stride_vl, H, L, CHUNK, HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr):
        """Σ K and max |V| per channel over one token chunk of one head, as element-wise running sums/maxima
        (no cross-thread reduction until after the loop)."""
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        cols = tl.arange(0, HEAD_DIM)
        ksum = tl.zeros([BLOCK_L, HEAD_DIM], dtype=tl.float32)
        vmax = tl.zeros([BLOCK_L, HEAD_DIM], dtype=V.dtype.element_ty)
        lo = pid * CHUNK
        hi = tl.minimum(lo + CHUNK, L)
        for start in range(lo, hi, BLOCK_L):
            rows = start + tl.arange(0, BLOCK_L)
            ok = (rows < hi)[:, None]
            k = tl.load(K + b * stride_kb + h * stride_kh + rows[:, None] * stride_kl + cols[None, :], mask=ok,
                        other=0.0)
            v = tl.load(V + b * stride_vb + h * stride_vh + rows[:, None] * stride_vl + cols[None, :], mask=ok,
                        other=0.0)
            ksum += k.to(tl.float32)
            vmax = tl.maximum(vmax, tl.abs(v)).to(V.dtype.element_ty)  # exact in the input dtype
        out = (pid * tl.num_programs(1) + bh) * HEAD_DIM + cols
        tl.store(KSUM + out, tl.sum(ksum, 0))
        tl.store(VMAX + out, tl.max(vmax.to(tl.float32), 0))

    @triton.jit
    def _kv_moments_finish_kernel(KSUM, VMAX, KMEAN, VSCALE, n_chunks, BH, n_tokens, HEAD_DIM: tl.constexpr,
                                  CH: tl.constexpr):
        """One head: the chunks' partials summed, ``CH`` chunks a step (a fixed order: deterministic), then
        ``Σ K / L`` and ``max(max |V|, 1e-6) / 448`` (IEEE division)."""
        bh = tl.program_id(0)
        c = tl.arange(0, HEAD_DIM)
        ksum = tl.zeros([CH, HEAD_DIM], dtype=tl.float32)
        vmax = tl.zeros([CH, HEAD_DIM], dtype=tl.float32)
        for i0 in range(0, n_chunks, CH):
            i = i0 + tl.arange(0, CH)
            part = (i[:, None] * BH + bh) * HEAD_DIM + c[None, :]
            ok = (i < n_chunks)[:, None]
            ksum += tl.load(KSUM + part, mask=ok, other=0.0)
            vmax = tl.maximum(vmax, tl.load(VMAX + part, mask=ok, other=0.0))
        tl.store(KMEAN + bh * HEAD_DIM + c, tl.math.div_rn(tl.sum(ksum, 0), n_tokens))
        tl.store(VSCALE + bh * HEAD_DIM + c, tl.math.div_rn(tl.maximum(tl.max(vmax, 0), 1e-6), 448.0))


def kv_moments_reference(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token mean of K, FP8 V's per-channel scale), [B, H, D] fp32, by the PyTorch reductions this pass replaces
    (no fp32 copy of K or V)."""
    k_mean = k.mean(dim=2, dtype=torch.float32)
    vmin, vmax = torch.aminmax(v, dim=2)
    return k_mean, torch.maximum(vmax.float(), -vmin.float()).clamp_min(_SCALE_FLOOR) / FP8_MAX


def supported(k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why :func:`kv_moments` can't take these tensors, or None."""
    if not HAS_TRITON:
        return "Triton is not installed"
    if k.shape != v.shape or k.dim() != 4:
        return f"K {tuple(k.shape)} and V {tuple(v.shape)} must both be (B, H, L, D)"
    d = k.shape[-1]
    if d & (d - 1) or not 16 <= d <= 256:
        return f"head_dim {d} must be a power of two from 16 to 256"
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        return "K and V need a contiguous last (head_dim) axis"
    if k.shape[2] == 0:
        return "no tokens"
    if not (k.is_cuda and v.is_cuda) and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "K and V must be CUDA tensors (or the Triton interpreter on: TRITON_INTERPRET=1)"
    return None


def kv_moments(k: torch.Tensor, v: torch.Tensor,
               config: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token mean of K, FP8 V's per-channel scale), [B, H, D] fp32: two launches (call where :func:`supported`
    is None). ``config``: (tokens per step, warps, programs per SM) of the partial pass, default :data:`CONFIG`."""
    from .linear_stats_gluon import chunking

    b, h, lk, d = k.shape
    block_l, warps, per_sm = config or CONFIG
    n_chunks, chunk = chunking(lk, b * h, per_sm * _sm_count(k.device), block_l)
    f32 = dict(dtype=torch.float32, device=k.device)
    ksum, vmax = (torch.empty((n_chunks, b * h, d), **f32) for _ in range(2))
    _kv_moments_partial_kernel[(n_chunks, b * h)](
        k, v, ksum, vmax, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), h, lk, chunk,
        HEAD_DIM=d, BLOCK_L=block_l, num_warps=warps)
    k_mean, v_scale = (torch.empty((b, h, d), **f32) for _ in range(2))
    _kv_moments_finish_kernel[(b * h,)](ksum, vmax, k_mean, v_scale, n_chunks, b * h, float(lk), HEAD_DIM=d,
                                        CH=16, num_warps=4)
    return k_mean, v_scale


def bench_main() -> None:  # pragma: no cover - needs a GPU
    """This pass against the PyTorch reductions it replaces, at the Wan attention shapes (CUDA-graph replays)."""
    from .sage_attention import ATTENTION_BENCH_SHAPES, bench_meta, bench_ms_graph, structured_qkv

    print(bench_meta(), flush=True)
    for shape, (b, h, n, d) in ATTENTION_BENCH_SHAPES.items():
        _, k, v = structured_qkv(b, h, n, d, torch.bfloat16, torch.device("cuda"), seed=3)

        t_torch = bench_ms_graph(lambda: kv_moments_reference(k, v))  # noqa: B023
        gb = 2 * k.numel() * k.element_size() / 1e9
        rk, rv = kv_moments_reference(k, v)
        print(f"{shape}: PyTorch {t_torch:.4f} ms ({gb / t_torch:.2f} TB/s)", flush=True)
        for config in SWEEP:
            t_ours = bench_ms_graph(lambda: kv_moments(k, v, config))  # noqa: B023
            km, vs = kv_moments(k, v, config)
            print(f"{shape}: kv_moments {config} {t_ours:.4f} ms ({gb / t_ours:.2f} TB/s, x{t_torch / t_ours:.2f}), "
                  f"k_mean max |diff| {float((km - rk).abs().max()):.2e}, v_scale max rel diff "
                  f"{float(((vs - rv).abs() / rv).max()):.1e}", flush=True)
        del k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":  # pragma: no cover
    bench_main()
