"""RMSNorm over the whole hidden dim followed by Wan's rotary embedding, in one kernel (pass ``fuse_norm_rope``).

A Wan self-attention normalizes q and k over all heads (``norm_q``/``norm_k``, one ``rms_norm`` op each) and then
rotates every (even, odd) pair of each head by the RoPE tables: diffusers writes that as ``unflatten``, ``unbind``,
four multiplies in fp32 and two strided ``copy_`` into an ``empty_like``. Compiled, the rotation is one Inductor
kernel that reads the norm's output and writes it again (4.46 ms per 1.3B@480p forward on an H200, 2026-11-27).
Here the norm's row is rotated before it is written: one read of x and one write, the norm's own traffic.

Op (``torch.ops.turbocompile.rms_norm_rope``)::

    rms_norm_rope(x [B, L, C], weight [C], eps, cos, sin) -> [B, L, C] in x.dtype

with ``cos``/``sin`` fp32 of shape [L, D/2] or [1, L, 1, D/2] (the folded tables of the graph) and C = H·D. The
math is the unfused pair's: the normalized row is rounded to x.dtype (what ``rms_norm`` returns), then
``o[2i] = r[2i]·cos[l, i mod D/2] − r[2i+1]·sin[..]`` and ``o[2i+1] = r[2i]·sin[..] + r[2i+1]·cos[..]`` in fp32,
rounded to x.dtype (the ``copy_`` into the bf16 ``empty_like``).

``python -m turbocompile.kernels.rms_norm_rope --bench`` times it against the two ops it replaces (the
``rms_norm`` kernel plus the rotation eager and compiled by Inductor) and the card's copy bandwidth.
"""
from __future__ import annotations

import torch

from turbocompile.errors import InputError, UnsupportedShapeError
from turbocompile.kernels.norms import rms_norm_ref
from turbocompile.kernels.quantize_activations import interp_round_bits

try:
    import triton
    import triton.language as tl

    from turbocompile.kernels.quantize_activations import round_bits
except ImportError:  # pragma: no cover
    triton = None
    tl = None

MAX_C = 16384  # one row is held in registers


# ----------------------------------------------------------------------------------------------------------------
# Reference (CPU implementation and test oracle): the unfused graph's math
# ----------------------------------------------------------------------------------------------------------------
def rope_ref(r: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotation of r [B, L, H·D] (as diffusers' ``apply_rotary_emb``): fp32 math, result in r.dtype."""
    b, l, c = r.shape
    half = cos.shape[-1]
    pairs = r.reshape(b, l, c // (2 * half), half, 2)
    x1, x2 = pairs.unbind(-1)
    cs, sn = cos.reshape(1, l, 1, half).float(), sin.reshape(1, l, 1, half).float()
    out = torch.stack([x1.float() * cs - x2.float() * sn, x1.float() * sn + x2.float() * cs], dim=-1)
    return out.to(r.dtype).reshape(b, l, c)


def rms_norm_rope_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
    """``rms_norm`` (rounded to x.dtype) then the rotation."""
    return rope_ref(rms_norm_ref(x, weight, eps), cos, sin)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel: one row per program, the row as [heads, D/2, 2] in registers
# ----------------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _rms_norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, L, C, H, stride_x, stride_o, eps,
                              HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, OUT_ROUND: tl.constexpr):
        """Row ``r`` (token ``l = r mod L``): normalize, round to x's dtype, rotate the pairs, write once.

        The row is loaded as [BLOCK_H, HEAD_DIM] (contiguous, vector loads) and split into its even and odd
        elements in registers, so the tables are read once per row as [HEAD_DIM/2] and broadcast over the heads."""
        HALF: tl.constexpr = HEAD_DIM // 2
        row = tl.program_id(0).to(tl.int64)
        heads = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, HEAD_DIM)
        offs = heads[:, None] * HEAD_DIM + dims[None, :]
        mask = (heads < H)[:, None] & (dims < HEAD_DIM)[None, :]
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / C + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = round_bits(x * rstd * w, OUT_ROUND).to(out_ptr.dtype.element_ty).to(tl.float32)  # = rms_norm's output
        y1, y2 = tl.split(tl.reshape(y, [BLOCK_H, HALF, 2]))
        t = (row % L) * HALF + tl.arange(0, HALF)
        c = tl.load(cos_ptr + t)[None, :]
        s = tl.load(sin_ptr + t)[None, :]
        o = tl.reshape(tl.join(y1 * c - y2 * s, y1 * s + y2 * c), [BLOCK_H, HEAD_DIM])
        tl.store(out_ptr + row * stride_o + offs, round_bits(o, OUT_ROUND).to(out_ptr.dtype.element_ty), mask=mask)


def _table(name: str, t: torch.Tensor, l: int, half: int) -> torch.Tensor:
    if t.dtype != torch.float32:
        raise InputError(f"rms_norm_rope: {name} must be float32 (the rotation's math), got {t.dtype}")
    if tuple(t.shape) not in ((l, half), (1, l, 1, half)):
        raise UnsupportedShapeError(f"rms_norm_rope: {name} must have shape ({l}, {half}) or (1, {l}, 1, {half}) "
                                    f"for x with {l} tokens, got {tuple(t.shape)}")
    return t.reshape(l, half)


def _check(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables as [L, D/2] views for a valid call; a clear error otherwise."""
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise InputError(f"rms_norm_rope: x must be bf16/fp16/fp32, got {x.dtype}")
    if x.ndim != 3:
        raise UnsupportedShapeError(f"rms_norm_rope: x must be [B, L, C], got shape {tuple(x.shape)}")
    c = x.shape[-1]
    if tuple(weight.shape) != (c,):
        raise UnsupportedShapeError(f"rms_norm_rope: weight must have shape ({c},), got {tuple(weight.shape)}")
    half = cos.shape[-1] if cos.ndim else 0
    if half == 0 or c % (2 * half):
        raise UnsupportedShapeError(f"rms_norm_rope: the tables' last dim ({half}) must be half a head_dim "
                                    f"dividing C = {c}")
    return _table("cos", cos, x.shape[1], half), _table("sin", sin, x.shape[1], half)


def kernel_supports(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether the Triton kernel takes this shape (a row in registers, a power-of-two head_dim)."""
    head_dim = 2 * cos.shape[-1]
    return triton is not None and x.shape[-1] <= MAX_C and head_dim & (head_dim - 1) == 0


def _launch(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos2, sin2 = _check(x, weight, cos, sin)
    l, c, head_dim = x.shape[1], x.shape[-1], 2 * cos.shape[-1]
    if not kernel_supports(x, cos):
        raise UnsupportedShapeError(f"rms_norm_rope: the kernel holds a row in registers and needs a power-of-two "
                                    f"head_dim: C={c} (max {MAX_C}), head_dim={head_dim}; use the reference")
    x2 = x.reshape(-1, c)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], c), dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return out.reshape(x.shape)
    heads = c // head_dim
    block_h = triton.next_power_of_2(heads)
    # the rms_norm kernel's measured launch shape: 2 warps for rows up to 2048 slots, 4 above (docs/kernels-linear.md)
    warps = 2 if block_h * head_dim <= 2048 else 4
    _rms_norm_rope_kernel[(x2.shape[0],)](
        x2, weight.float().contiguous(), cos2.contiguous(), sin2.contiguous(), out, l, c, heads, x2.stride(0),
        out.stride(0), float(eps),
        HEAD_DIM=head_dim, BLOCK_H=block_h, OUT_ROUND=interp_round_bits(x.dtype), num_warps=warps)
    return out.reshape(x.shape)


# ----------------------------------------------------------------------------------------------------------------
# Op
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("turbocompile::rms_norm_rope", mutates_args=())
def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
    """RMSNorm of x [B, L, C] over C (fp32 math), then Wan's RoPE with fp32 tables [L, D/2]; output x.dtype."""
    _check(x, weight, cos, sin)
    return rms_norm_rope_ref(x, weight, eps, cos, sin)


@rms_norm_rope.register_kernel("cuda")
def _rms_norm_rope_cuda(x, weight, eps, cos, sin):
    if not kernel_supports(x, cos):  # (the PyTorch reference: slower, same result; Wan's head_dim is 128)
        _check(x, weight, cos, sin)
        return rms_norm_rope_ref(x, weight, eps, cos, sin)
    return _launch(x, weight, eps, cos, sin)


@rms_norm_rope.register_fake
def _rms_norm_rope_fake(x, weight, eps, cos, sin):
    _check(x, weight, cos, sin)
    return x.new_empty(x.shape)


def launch_triton(x, weight, eps, cos, sin) -> torch.Tensor:
    """The Triton kernel on any device (CPU under TRITON_INTERPRET=1, used by the tests)."""
    return _launch(x, weight, eps, cos, sin)


# ----------------------------------------------------------------------------------------------------------------
# GPU benchmark: python -m turbocompile.kernels.rms_norm_rope --bench [--out DIR]
# ----------------------------------------------------------------------------------------------------------------
def _wan_rope(r: torch.Tensor, cos4: torch.Tensor, sin4: torch.Tensor, heads: int) -> torch.Tensor:
    """The rotation exactly as the exported graph runs it (diffusers' ``apply_rotary_emb`` on [B, L, H, D])."""
    u = r.unflatten(2, (heads, -1))
    x1, x2 = u.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(u)
    out[..., 0::2] = x1 * cos4 - x2 * sin4
    out[..., 1::2] = x1 * sin4 + x2 * cos4
    return out


def pair_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error in units of x.dtype's eps times the magnitude of the element's rotated pair (floored at 1e-3).

    The rotation preserves a pair's norm but not its elements' sizes: an element can be far smaller than the pair
    (cancellation), so one rounding step of the normalized input (the kernel's 1/sqrt and sum order differ from
    PyTorch's) is many "ulps" of that element and still ~1 step of the pair. This is the scale to judge it on."""
    w = want.float().unflatten(-1, (-1, 2))
    mag = w.norm(dim=-1, keepdim=True).expand_as(w).flatten(-2).clamp_min(1e-3)
    return ((got.float() - want.float()).abs() / (torch.finfo(want.dtype).eps * mag)).max().item()


def _bench(out_dir: str | None) -> dict:  # pragma: no cover - needs a GPU
    import time

    from turbocompile.kernels.benchlog import BenchLog
    from turbocompile.kernels.sage_attention import bench_ms_graph

    dev = torch.device("cuda")
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
                 "rows": []}
    log = BenchLog(out_dir, "bench_rms_norm_rope", res)
    ops = torch.ops.turbocompile
    rope_compiled = torch.compile(_wan_rope, dynamic=False)
    eps = 1e-6

    def host_us(fn, n: int = 200) -> float:
        """Host microseconds per call (launch path only: the GPU is left to catch up after the loop)."""
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        torch.cuda.synchronize()
        return dt / n * 1e6

    def inputs(l: int, heads: int):
        c, half = heads * 128, 64
        gen = torch.Generator(device=dev).manual_seed(heads)
        qkv = torch.randn(1, l, 3 * c, device=dev, dtype=torch.bfloat16, generator=gen) * 2 + 0.5
        x = qkv[..., c:2 * c]  # k as the model has it: a strided view of the fused q/k/v projection's output
        w = torch.randn(c, device=dev, dtype=torch.bfloat16, generator=gen)
        ang = torch.rand(l, half, device=dev, generator=gen) * 6.3
        return x, w, ang.cos().reshape(1, l, 1, half), ang.sin().reshape(1, l, 1, half)

    shapes = (("1.3B@480p", 32760, 12), ("14B@720p", 75600, 40))
    # accuracy first, for every shape, before any CUDA graph is captured (the 10:35 run compared after the
    # previous shape's captures, and its 14B "vs the unfused ops" column was wrong: the unfused output differed
    # from the reference in 99.95% of elements there, while the same ops on the same shape in a fresh process
    # matched it in 99.9992%)
    for name, l, heads in shapes:
        x, w, cos4, sin4 = inputs(l, heads)
        got = ops.rms_norm_rope(x, w, eps, cos4, sin4)
        want = rms_norm_rope_ref(x, w, eps, cos4, sin4)
        graph = _wan_rope(ops.rms_norm(x, w, eps), cos4, sin4, heads).flatten(2)
        res["rows"].append({"shape": name, "L": l, "C": heads * 128,
                            "pair_err_vs_ref": pair_error(got, want), "pair_err_vs_unfused": pair_error(got, graph),
                            "unfused_pair_err_vs_ref": pair_error(graph, want),
                            "frac_equal_to_ref": (got == want).float().mean().item(),
                            "frac_equal_unfused_to_ref": (graph == want).float().mean().item(),
                            "finite": bool(torch.isfinite(got).all())})
        del x, got, want, graph
    for row, (name, l, heads) in zip(res["rows"], shapes):
        x, w, cos4, sin4 = inputs(l, heads)
        xc, dst = x.contiguous(), torch.empty_like(x, memory_format=torch.contiguous_format)
        row["copy_TBps"] = 2 * x.numel() * 2 / bench_ms_graph(lambda: dst.copy_(xc)) / 1e9  # noqa: B023
        rope_compiled(ops.rms_norm(x, w, eps), cos4, sin4, heads)  # compile before the graph capture
        row["fused_ms"] = bench_ms_graph(lambda: ops.rms_norm_rope(x, w, eps, cos4, sin4))  # noqa: B023
        row["rms_norm_ms"] = bench_ms_graph(lambda: ops.rms_norm(x, w, eps))  # noqa: B023
        row["unfused_compiled_ms"] = bench_ms_graph(
            lambda: rope_compiled(ops.rms_norm(x, w, eps), cos4, sin4, heads))  # noqa: B023
        row["unfused_eager_ms"] = bench_ms_graph(
            lambda: _wan_rope(ops.rms_norm(x, w, eps), cos4, sin4, heads))  # noqa: B023
        row["fused_host_us"] = host_us(lambda: ops.rms_norm_rope(x, w, eps, cos4, sin4))  # noqa: B023
        row["rms_norm_host_us"] = host_us(lambda: ops.rms_norm(x, w, eps))  # noqa: B023
        nbytes = 2 * x.numel() * 2 + 2 * cos4.numel() * 4  # x read, out written, the two fp32 tables
        row["fused_TBps"] = nbytes / row["fused_ms"] / 1e9
        row["frac_copy"] = row["fused_TBps"] / row["copy_TBps"]
        log.say(f"{name}: fused {row['fused_ms'] * 1e3:.1f} us ({row['fused_TBps']:.2f} TB/s with the tables = "
                f"{row['frac_copy']:.0%} of a {row['copy_TBps']:.2f} TB/s copy of x); rms_norm alone "
                f"{row['rms_norm_ms'] * 1e3:.1f} us; rms_norm + compiled RoPE {row['unfused_compiled_ms'] * 1e3:.1f} "
                f"us; + eager RoPE {row['unfused_eager_ms'] * 1e3:.1f} us; host {row['fused_host_us']:.1f} us/call "
                f"(rms_norm {row['rms_norm_host_us']:.1f}); error (x eps of the pair) {row['pair_err_vs_ref']:.2f} "
                f"vs reference, {row['pair_err_vs_unfused']:.2f} vs the unfused ops (they: "
                f"{row['unfused_pair_err_vs_ref']:.2f}); equal to the reference {row['frac_equal_to_ref']:.4%} "
                f"(unfused {row['frac_equal_unfused_to_ref']:.4%})")
        log.dump()
    return res


if __name__ == "__main__":  # pragma: no cover
    import argparse

    p = argparse.ArgumentParser(description="check and time rms_norm + RoPE fused, against the unfused ops, on a GPU")
    p.add_argument("--bench", action="store_true", required=True)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    _bench(a.out)
