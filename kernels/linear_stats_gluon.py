"""The SLA linear branch's statistics pass over K and V for Hopper in Gluon: TMA ring in, asynchronous wgmmas.

Per token chunk of one head it computes what :func:`turbocompile.kernels.sla.linear_branch_stats` sums afterwards:
``φ(K)ᵀV`` [D, D] and ``Σ φ(K)`` [D] (φ = softmax over head_dim), and, while K and V pass by, ``Σ K`` and
``max |V|`` per channel (the Sage prologue's moments). Same outputs as the Triton ``_linear_stats_kernel`` of
:mod:`.sla`, which stays the kernel of every other GPU, of the CPU interpreter and of layouts this one does not take.

Why a second kernel: Triton 3.6 serializes the Triton kernel's wgmmas (``ptxas`` warning C7515: the SASS waits
after each of the 8 ``HGMMA`` of a 64-token step), so the MMA latency adds to the loads' instead of hiding behind
them, and the pass ran at 1.8-2.0 TB/s against the card's ~3.9 TB/s copy bandwidth. Here:

* K and V tiles arrive by TMA into a ring of ``NUM_STAGES`` stages, issued as soon as a stage is free;
* φ of tile t is computed in registers (from K read back out of shared memory) while the wgmmas of tile t - 1 run;
  φ goes to shared memory once, where it is the (transposed) A operand of both ``φᵀ·V`` and ``φᵀ·1``;
* ``Σ K`` is an elementwise running sum in fp32 registers and ``max |V|`` a running max in the input dtype
  (exact), both reduced across threads once, after the loop.

Measured on an H200 (docs/kernels-attention.md): 0.069 against 0.101 ms at 1.3B@480p, 0.52 against 0.77 ms at
14B@720p (2.9-2.95 TB/s).

Layouts taken: (B, H, L, D) contiguous, or the (B, L, H, D) memory order seen as (B, H, L, D) (what a Wan
attention passes): either is a 2-D row-major matrix whose rows are tokens, which one 2-D TMA descriptor reads.
bf16/fp16, head_dim 64 or 128, sm_90. ``python -m turbocompile.kernels.sla --prologue`` times it against the
Triton kernel on the same inputs.
"""
from __future__ import annotations

import os

import torch

from .gluon_guard import GluonGuard
from .gluon_hopper import (
    TensorDescriptor,
    compile_for_sm90a,
    fence_async_shared,
    gl,
    gluon,
    mbarrier,
    on_hopper,
    thread_barrier,
    tma_load,
    warpgroup_mma,
    warpgroup_mma_wait,
)

BLOCK_L = 64  # tokens per tile: K and V tiles of 16 KiB each at head_dim 128 (bf16)
NUM_STAGES = 4  # K/V stages in flight per program: 128 KiB at head_dim 128, plus 16 KiB for φ
PROGRAMS_PER_SM = 1  # the registers (~240 per thread at 8 warps) and shared memory of one program fill an SM


if gluon is not None:

    @gluon.jit
    def _load_tile(k_desc, v_desc, k_s, v_s, ready, t, k_row, k_col, v_row, v_col, pred,
                   NUM_STAGES: gl.constexpr):
        """TMA tile ``t`` of the chunk (its rows ``t * BLOCK_L`` on from the chunk's first) of K and V into stage
        ``t % NUM_STAGES``."""
        BLOCK_L: gl.constexpr = k_desc.block_type.shape[0]
        s = t % NUM_STAGES
        bar = ready.index(s)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=pred)
        tma_load(k_desc, [k_row + t * BLOCK_L, k_col], bar, k_s.index(s), pred=pred)
        tma_load(v_desc, [v_row + t * BLOCK_L, v_col], bar, v_s.index(s), pred=pred)

    @gluon.jit
    def _tile_moments(k_s, v_s, ready, t, n_valid, ksum, vmax, NUM_STAGES: gl.constexpr, blk: gl.constexpr,
                      MASK: gl.constexpr):
        """Wait for tile ``t``; return φ of its rows and the running Σ K and max |V|. With ``MASK`` (the chunk's
        last tile) rows past ``n_valid`` tokens of the chunk count as zero: the TMA box there holds the next
        head's tokens, or zeros past the tensor."""
        BLOCK_L: gl.constexpr = k_s.shape[1]
        s = t % NUM_STAGES
        mbarrier.wait(ready.index(s), (t // NUM_STAGES) & 1)
        k = k_s.index(s).load(blk).to(gl.float32)
        v = gl.abs(v_s.index(s).load(blk))
        if MASK:
            rows = t * BLOCK_L + gl.arange(0, BLOCK_L, layout=gl.SliceLayout(1, blk))
            ok = gl.expand_dims(rows < n_valid, 1)
            k = gl.where(ok, k, 0.0)
            v = gl.where(ok, v, 0.0).to(vmax.dtype)
        ksum += k
        vmax = gl.maximum(vmax, v)
        # softmax over head_dim: exp2 with log2 e folded into one FMA per element, one reciprocal per row
        m = gl.max(k, axis=1) * 1.4426950408889634
        e = gl.exp2(gl.fma(k, 1.4426950408889634, -gl.expand_dims(m, 1)))
        phi = e * gl.expand_dims(1.0 / gl.sum(e, axis=1), 1)
        if MASK:
            phi = gl.where(ok, phi, 0.0)
        return phi.to(k_s.dtype), ksum, vmax

    @gluon.jit
    def _step(k_desc, v_desc, k_s, v_s, phi_s, ones_s, ready, t, n_valid, n_tiles, kv, z, ksum, vmax,
              k_row, k_col, v_row, v_col, NUM_STAGES: gl.constexpr, blk: gl.constexpr, MASK: gl.constexpr):
        """Tile ``t`` >= 1: its φ while the wgmmas of tile t - 1 run, then, once they are done, the next copy into
        their stage, φ into shared memory and this tile's wgmmas (left in flight)."""
        phi, ksum, vmax = _tile_moments(k_s, v_s, ready, t, n_valid, ksum, vmax, NUM_STAGES, blk, MASK)
        kv, z = warpgroup_mma_wait(num_outstanding=0, deps=[kv, z])
        thread_barrier()  # both warpgroups are past tile t - 1: φ's buffer and its K/V stage are free
        fence_async_shared()
        _load_tile(k_desc, v_desc, k_s, v_s, ready, t - 1 + NUM_STAGES, k_row, k_col, v_row, v_col,
                   t - 1 + NUM_STAGES < n_tiles, NUM_STAGES)
        phi_s.store(phi)
        fence_async_shared()
        thread_barrier()
        kv = warpgroup_mma(phi_s.permute((1, 0)), v_s.index(t % NUM_STAGES), kv, is_async=True)
        z = warpgroup_mma(phi_s.permute((1, 0)), ones_s.permute((1, 0)), z, is_async=True)
        return kv, z, ksum, vmax

    @gluon.jit
    def _linear_stats_gluon_kernel(k_desc, v_desc, KV, Z, KSUM, VMAX, H, L, CHUNK,
                                   k_rows_b, k_rows_h, k_cols_h, v_rows_b, v_rows_h, v_cols_h,
                                   NUM_STAGES: gl.constexpr, num_warps: gl.constexpr):
        """One program: one token chunk of one (batch, head). Token ``l`` of head (b, h) is row
        ``b·rows_b + h·rows_h + l`` and columns ``h·cols_h`` .. +D of its tensor's 2-D view."""
        BLOCK_L: gl.constexpr = k_desc.block_type.shape[0]
        D: gl.constexpr = k_desc.block_type.shape[1]
        dtype: gl.constexpr = k_desc.dtype
        # 16 rows of φᵀV per warp. (16 warps, splitting its columns too, measured slower: 0.586 against 0.528 ms
        # at 14B@720p on an H200.)
        gl.static_assert(D == 16 * num_warps, "num_warps must be D/16")

        pid = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // H
        h = bh % H
        lo = pid * CHUNK
        n_valid = gl.minimum(CHUNK, L - lo)
        n_tiles = gl.cdiv(n_valid, BLOCK_L)
        k_row = b * k_rows_b + h * k_rows_h + lo
        v_row = b * v_rows_b + h * v_rows_h + lo
        k_col = h * k_cols_h
        v_col = h * v_cols_h

        # K/V tiles are read by threads with 8 consecutive channels each (16-byte shared loads; a row's 128 channels
        # over 16 lanes, so the softmax's row reductions stay inside a warp)
        blk: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // (D // 8), D // 8],
                                             warps_per_cta=[num_warps, 1], order=[1, 0])
        kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                            instr_shape=[16, D, 16])
        z_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, 16, 16])
        ones_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

        k_s = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_L, D], k_desc.layout)
        v_s = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_L, D], v_desc.layout)
        phi_s = gl.allocate_shared_memory(dtype, [BLOCK_L, D], k_desc.layout)
        # Σφ is φᵀ times a column of ones; wgmma's smallest N is 8, 16 keeps the B tile one 128-byte swizzle row
        ones_s = gl.allocate_shared_memory(dtype, [16, BLOCK_L], ones_layout,
                                           gl.full([16, BLOCK_L], 1.0, dtype, blk))
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=1)
        fence_async_shared()  # barriers and the ones tile visible to the TMA unit and the tensor cores

        for i in gl.static_range(NUM_STAGES):
            _load_tile(k_desc, v_desc, k_s, v_s, ready, i, k_row, k_col, v_row, v_col, i < n_tiles, NUM_STAGES)

        ksum = gl.zeros([BLOCK_L, D], gl.float32, blk)
        vmax = gl.zeros([BLOCK_L, D], dtype, blk)
        phi_t = phi_s.permute((1, 0))  # [D, BLOCK_L]: the A operand, φ transposed
        ones_t = ones_s.permute((1, 0))  # [BLOCK_L, 16]

        # Tile 0, peeled (the loop carries the accumulators in flight), masked (it may be the chunk's only tile)
        phi, ksum, vmax = _tile_moments(k_s, v_s, ready, 0, n_valid, ksum, vmax, NUM_STAGES, blk, True)
        phi_s.store(phi)
        fence_async_shared()
        thread_barrier()
        kv = warpgroup_mma(phi_t, v_s.index(0), gl.zeros([D, D], gl.float32, kv_layout), use_acc=False,
                           is_async=True)
        z = warpgroup_mma(phi_t, ones_t, gl.zeros([D, 16], gl.float32, z_layout), use_acc=False, is_async=True)
        n_full = n_valid // BLOCK_L
        for t in range(1, n_full):
            kv, z, ksum, vmax = _step(k_desc, v_desc, k_s, v_s, phi_s, ones_s, ready, t, n_valid, n_tiles, kv, z,
                                      ksum, vmax, k_row, k_col, v_row, v_col, NUM_STAGES, blk, False)
        if n_tiles > n_full and n_full > 0:  # a partial last tile (not tile 0, which was masked)
            kv, z, ksum, vmax = _step(k_desc, v_desc, k_s, v_s, phi_s, ones_s, ready, n_full, n_valid, n_tiles, kv,
                                      z, ksum, vmax, k_row, k_col, v_row, v_col, NUM_STAGES, blk, True)
        kv, z = warpgroup_mma_wait(num_outstanding=0, deps=[kv, z])
        for i in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(ready.index(i))

        part = pid * gl.num_programs(1) + bh
        r = gl.arange(0, D, layout=gl.SliceLayout(1, kv_layout))
        c = gl.arange(0, D, layout=gl.SliceLayout(0, kv_layout))
        gl.store(KV + part * D * D + gl.expand_dims(r, 1) * D + gl.expand_dims(c, 0), kv)
        zr = gl.arange(0, D, layout=gl.SliceLayout(1, z_layout))
        zc = gl.arange(0, 16, layout=gl.SliceLayout(0, z_layout))
        # every column of φᵀ·1 is Σφ: keep column 0 (exact; a sum of the 16 copies could round)
        gl.store(Z + part * D + zr, gl.sum(gl.where(gl.expand_dims(zc == 0, 0), z, 0.0), axis=1))
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, blk))
        gl.store(KSUM + part * D + cols, gl.sum(ksum, axis=0))
        gl.store(VMAX + part * D + cols, gl.max(vmax.to(gl.float32), axis=0))


#: Off for the rest of the process once a first launch fails (an incompatible Triton); see :mod:`.gluon_guard`.
GUARD = GluonGuard("linear statistics", "set TURBOCOMPILE_LINEAR_STATS_KERNEL=triton to skip the attempt")


def _token_matrix(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int] | None:
    """``x`` (B, H, L, D) as a 2-D row-major [rows, cols] view whose rows are tokens, and where token l of head
    (b, h) sits: (view, rows per batch, rows per head, columns per head); None for other memory orders."""
    b, h, n, d = x.shape
    if x.is_contiguous():
        return x.view(b * h * n, d), h * n, n, 0
    if x.transpose(1, 2).is_contiguous():  # (B, L, H, D) in memory
        return x.transpose(1, 2).reshape(b * n, h * d), n, 0, d
    return None


def supported(k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None if this kernel takes (k, v), else why not (the caller then runs the Triton kernel)."""
    if GUARD.disabled is not None:
        return f"switched off after its first launch failed ({GUARD.disabled})"
    if os.environ.get("TURBOCOMPILE_LINEAR_STATS_KERNEL", "").lower() == "triton":
        return "TURBOCOMPILE_LINEAR_STATS_KERNEL=triton"
    if not (k.is_cuda and v.is_cuda and on_hopper(k.device)):
        return "needs an sm_90 GPU and Triton's Gluon (not the interpreter)"
    if k.dtype not in (torch.bfloat16, torch.float16) or v.dtype != k.dtype:
        return f"dtypes {k.dtype}/{v.dtype} are not both bf16 or both fp16"
    if k.shape[-1] not in (64, 128) or k.shape != v.shape:
        return f"shapes {tuple(k.shape)}/{tuple(v.shape)} are not equal with head_dim 64 or 128"
    if _token_matrix(k) is None or _token_matrix(v) is None:
        return "K or V is neither (B, H, L, D) nor (B, L, H, D) in memory"
    if any(t.data_ptr() % 16 for t in (k, v)):
        return "K or V is not 16-byte aligned (TMA)"
    return None


def chunking(lk: int, heads: int, slots: int, block_l: int) -> tuple[int, int]:
    """(chunks per head, tokens per chunk) of a statistics pass (this kernel's and the Triton one's): all programs
    in one wave of ``slots`` (programs per SM x SMs), each chunk a whole number of ``block_l``-token steps and at
    least four of them.

    Rounded down: a few programs past the last full wave would double the pass's time (14B@720p: 560 programs for
    528 slots with the rounded-up count)."""
    n_chunks = max(1, min(-(-lk // (4 * block_l)), slots // heads))
    chunk = -(-(-(-lk // n_chunks)) // block_l) * block_l
    return -(-lk // chunk), chunk


def linear_stats_partials(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-chunk ``φ(K)ᵀV`` [C, B·H, D, D], ``Σφ(K)``, ``Σ K``, ``max |V|`` [C, B·H, D] (fp32) of (B, H, L, D) K
    and V, for :func:`turbocompile.kernels.sla.linear_branch_stats` to sum. Call only where :func:`supported` is
    None."""
    b, h, lk, d = k.shape
    sms = torch.cuda.get_device_properties(k.device).multi_processor_count
    n_chunks, chunk = chunking(lk, b * h, PROGRAMS_PER_SM * sms, BLOCK_L)
    f32 = dict(dtype=torch.float32, device=k.device)
    kv = torch.empty((n_chunks, b * h, d, d), **f32)
    z, ksum, vmax = (torch.empty((n_chunks, b * h, d), **f32) for _ in range(3))
    layout = gl.NVMMASharedLayout.get_default_for([BLOCK_L, d], gl.bfloat16 if k.dtype == torch.bfloat16
                                                  else gl.float16)
    (k2, k_rb, k_rh, k_ch), (v2, v_rb, v_rh, v_ch) = _token_matrix(k), _token_matrix(v)
    k_desc = TensorDescriptor.from_tensor(k2, [BLOCK_L, d], layout)
    v_desc = TensorDescriptor.from_tensor(v2, [BLOCK_L, d], layout)
    _linear_stats_gluon_kernel[(n_chunks, b * h)](
        k_desc, v_desc, kv, z, ksum, vmax, h, lk, chunk, k_rb, k_rh, k_ch, v_rb, v_rh, v_ch,
        NUM_STAGES=NUM_STAGES, num_warps=d // 16)
    GUARD.succeeded()
    return kv, z, ksum, vmax


def compile_for_sm90(head_dim: int = 128, dtype: str = "bf16", num_stages: int = NUM_STAGES,
                     block_l: int = BLOCK_L):
    """The kernel compiled for sm_90a without a GPU (:func:`.gluon_hopper.compile_for_sm90a`)."""
    lay = gl.NVMMASharedLayout.get_default_for([block_l, head_dim], getattr(gl, {"bf16": "bfloat16",
                                                                                "fp16": "float16"}[dtype]))
    desc = f"tensordesc<{dtype}[{block_l}, {head_dim}],{lay!r}>"
    ptrs = {"KV": "*fp32", "Z": "*fp32", "KSUM": "*fp32", "VMAX": "*fp32"}
    return compile_for_sm90a(_linear_stats_gluon_kernel, {"k_desc": desc, "v_desc": desc, **ptrs},
                             {"NUM_STAGES": num_stages, "num_warps": head_dim // 16}, ptrs)
