"""The Sage prologue's int8 quantizer (Q, and K minus its mean) for Hopper in Gluon: a TMA ring in, one program
per SM slot walking many token blocks.

Same function and bytes as the Triton ``_quant_int8_kernel`` of :mod:`.sage_attention` (which stays the kernel of
every other GPU, of the CPU interpreter and of layouts this one does not take): per ``BLK``-token block of one head
the pooled mean (for the SLA block map), one int8 scale of ``x·mul``, the int8 values rounded half away from zero,
and for ``sage_sla``'s Q the linear branch's ``φ(x)/(φ(x)·z + 1e-5)`` in bf16.

Why a second kernel: the Triton one loads with plain global loads, prefetched one block ahead in registers by
hand, and ran at 2.5-2.7 TB/s at 1.3B@480p against the card's ~3.8 TB/s copy bandwidth; here the blocks arrive by
TMA ``NUM_STAGES`` ahead into shared memory, so the loads never wait on this block's arithmetic or reductions.

Layouts taken: (B, H, L, D) contiguous, or the (B, L, H, D) memory order seen as (B, H, L, D), bf16/fp16, head_dim
64 or 128, sm_90. ``python -m turbocompile.kernels.sla --prologue`` times it against the Triton kernel.
"""
from __future__ import annotations

import os

import torch

from .gluon_guard import GluonGuard
from .gluon_hopper import TensorDescriptor, fence_async_shared, gl, gluon, mbarrier, thread_barrier, tma_load
from .linear_stats_gluon import _token_matrix

#: (warps, stages, programs per SM) per token-block size; the stages are BLK x D x 2 bytes each.
CONFIGS: dict[int, tuple[int, int, int]] = {64: (4, 4, 3), 128: (8, 3, 2)}


if gluon is not None:

    @gluon.jit
    def _load_block(x_desc, x_s, ready, i, row, col, pred, NUM_STAGES: gl.constexpr):
        """TMA the program's ``i``-th block (rows ``row + i·BLK`` on) into stage ``i % NUM_STAGES``."""
        BLK: gl.constexpr = x_desc.block_type.shape[0]
        s = i % NUM_STAGES
        mbarrier.expect(ready.index(s), x_desc.block_type.nbytes, pred=pred)
        tma_load(x_desc, [row + i * BLK, col], ready.index(s), x_s.index(s), pred=pred)

    @gluon.jit
    def _quant_int8_gluon_kernel(x_desc, MEAN, OUT, SCALE, POOL, LIN_Z, PHI, H, L, L_PAD, NBLK, BPP, mul,
                                 rows_b, rows_h, cols_h, HAS_MEAN: gl.constexpr, LINEAR: gl.constexpr,
                                 NUM_STAGES: gl.constexpr, num_warps: gl.constexpr):
        """``BPP`` consecutive ``BLK``-token blocks of one (batch, head); token l of head (b, h) is row
        ``b·rows_b + h·rows_h + l``, columns ``h·cols_h`` .. +D of the input's 2-D view. Blocks past L (padding)
        are written as zeros, like the Triton kernel's."""
        BLK: gl.constexpr = x_desc.block_type.shape[0]
        D: gl.constexpr = x_desc.block_type.shape[1]
        blk: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // (D // 8), D // 8],
                                             warps_per_cta=[num_warps, 1], order=[1, 0])
        col_l: gl.constexpr = gl.SliceLayout(0, blk)
        row_l: gl.constexpr = gl.SliceLayout(1, blk)

        pid = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // H
        h = bh % H
        first = pid * BPP
        n_blocks = gl.minimum(first + BPP, L_PAD // BLK) - first
        row0 = b * rows_b + h * rows_h + first * BLK
        col0 = h * cols_h
        cols = gl.arange(0, D, layout=col_l)
        r = gl.arange(0, BLK, layout=row_l)
        if HAS_MEAN:
            mean = gl.expand_dims(gl.load(MEAN + bh * D + cols), 0)
        if LINEAR:
            lin_z = gl.expand_dims(gl.load(LIN_Z + bh * D + cols), 0)

        x_s = gl.allocate_shared_memory(x_desc.dtype, [NUM_STAGES, BLK, D], x_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=1)
        fence_async_shared()
        # blocks wholly past L are not loaded: they are zeros (padding), written from registers
        n_loaded = gl.minimum(n_blocks, gl.maximum(gl.cdiv(L - first * BLK, BLK), 0))
        for i in gl.static_range(NUM_STAGES):
            _load_block(x_desc, x_s, ready, i, row0, col0, i < n_loaded, NUM_STAGES)

        for i in range(n_blocks):
            blk_i = first + i
            rows = blk_i * BLK + r
            ok = gl.expand_dims(rows < L, 1)
            if i < n_loaded:
                s = i % NUM_STAGES
                mbarrier.wait(ready.index(s), (i // NUM_STAGES) & 1)
                x = x_s.index(s).load(blk).to(gl.float32)
                thread_barrier()  # every warp holds its rows of stage s: refill it
                fence_async_shared()
                _load_block(x_desc, x_s, ready, i + NUM_STAGES, row0, col0, i + NUM_STAGES < n_loaded, NUM_STAGES)
                x = gl.where(ok, x, 0.0)  # rows past L: the next head's tokens or TMA's zero fill
            else:
                x = gl.zeros([BLK, D], gl.float32, blk)
            out_off = (bh * L_PAD + gl.expand_dims(rows, 1)) * D + gl.expand_dims(cols, 0)
            if LINEAR:  # φ/den = e / (Σ e·z + 1e-5·Σ e), e = exp(x - max x): one reciprocal per row
                e = gl.exp2((x - gl.expand_dims(gl.max(x, axis=1), 1)) * 1.4426950408889634)
                inv = 1.0 / (gl.sum(e * lin_z, axis=1) + 1e-5 * gl.sum(e, axis=1))
                gl.store(PHI + out_off, (e * gl.expand_dims(inv, 1)).to(gl.bfloat16))
            if HAS_MEAN:
                x = gl.where(ok, x - mean, 0.0)
            scale = gl.maximum(gl.max(gl.max(gl.abs(x), axis=1), axis=0) * mul, 1e-6) / 127.0
            y = x * (mul / scale)
            # round half away from zero: trunc(y ± 0.5), the sign copied by a bit operation (|y| <= 127)
            half = ((y.to(gl.int32, bitcast=True) & -2147483648) | 0x3F000000).to(gl.float32, bitcast=True)
            gl.store(OUT + out_off, (y + half).to(gl.int8))
            if blk_i < NBLK:
                n_valid = gl.minimum(L - blk_i * BLK, BLK).to(gl.float32)
                gl.store(POOL + (bh * NBLK + blk_i) * D + cols, gl.sum(x, axis=0) / n_valid)
                gl.store(SCALE + bh * NBLK + blk_i, scale)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(ready.index(i))


#: Off for the rest of the process once a first launch fails (an incompatible Triton); see :mod:`.gluon_guard`.
GUARD = GluonGuard("int8 quantizer", "set TURBOCOMPILE_QUANT_KERNEL=triton to skip the attempt")


def supported(x: torch.Tensor, blk: int) -> str | None:
    """None if this kernel takes ``x`` with ``blk``-token blocks, else why not (the caller runs the Triton one)."""
    if GUARD.disabled is not None:
        return f"switched off after its first launch failed ({GUARD.disabled})"
    if os.environ.get("TURBOCOMPILE_QUANT_KERNEL", "").lower() == "triton":
        return "TURBOCOMPILE_QUANT_KERNEL=triton"
    if gluon is None or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "needs Triton's Gluon and a GPU (not the interpreter)"
    if not x.is_cuda or torch.cuda.get_device_capability(x.device) != (9, 0):
        return "needs an sm_90 GPU"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {x.dtype} is not bf16 or fp16"
    if x.shape[-1] not in (64, 128) or blk not in CONFIGS:
        return f"head_dim {x.shape[-1]} / block {blk} not 64 or 128"
    if _token_matrix(x) is None:
        return "neither (B, H, L, D) nor (B, L, H, D) in memory"
    if x.data_ptr() % 16:
        return "not 16-byte aligned (TMA)"
    return None


def blocks_per_program(n_blocks: int, heads: int, sms: int, per_sm: int) -> int:
    """Token blocks per program: each head gets ``per_sm · sms // heads`` programs (at least one), so all of them
    run in one wave; a few programs past it would double the pass's time."""
    return -(-n_blocks // max(1, per_sm * sms // heads))


def quantize_int8_into(x: torch.Tensor, mean: torch.Tensor | None, xq: torch.Tensor, scale: torch.Tensor,
                       pool: torch.Tensor, blk: int, mul: float, linear_z: torch.Tensor | None = None,
                       phi: torch.Tensor | None = None) -> None:
    """Same contract as ``sage_attention._quantize_int8_into``; call only where :func:`supported` is None."""
    b, h, n, d = x.shape
    n_pad = xq.shape[2]
    warps, stages, per_sm = CONFIGS[blk]
    bpp = blocks_per_program(n_pad // blk, b * h, torch.cuda.get_device_properties(x.device).multi_processor_count,
                             per_sm)
    x2, rows_b, rows_h, cols_h = _token_matrix(x)
    layout = gl.NVMMASharedLayout.get_default_for([blk, d], gl.bfloat16 if x.dtype == torch.bfloat16
                                                  else gl.float16)
    x_desc = TensorDescriptor.from_tensor(x2, [blk, d], layout)
    _quant_int8_gluon_kernel[(-(-(n_pad // blk) // bpp), b * h)](
        x_desc, mean if mean is not None else scale, xq, scale, pool,
        linear_z if linear_z is not None else scale, phi if phi is not None else xq,
        h, n, n_pad, scale.shape[-1], bpp, mul, rows_b, rows_h, cols_h,
        HAS_MEAN=mean is not None, LINEAR=linear_z is not None, NUM_STAGES=stages, num_warps=warps)
    GUARD.succeeded()


def compile_for_sm90(blk: int = 128, head_dim: int = 128, has_mean: bool = True, linear: bool = False,
                     config: tuple[int, int, int] | None = None):
    """Compile the kernel for sm_90a without a GPU (the tests read its PTX and resource use)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    warps, stages, _ = config or CONFIGS[blk]
    lay = gl.NVMMASharedLayout.get_default_for([blk, head_dim], gl.bfloat16)
    consts = {"HAS_MEAN": has_mean, "LINEAR": linear, "NUM_STAGES": stages, "num_warps": warps}
    ptrs = {"MEAN": "*fp32", "OUT": "*i8", "SCALE": "*fp32", "POOL": "*fp32", "LIN_Z": "*fp32", "PHI": "*bf16"}
    names = _quant_int8_gluon_kernel.arg_names
    sig = {"x_desc": f"tensordesc<bf16[{blk}, {head_dim}],{lay!r}>", "mul": "fp32"}
    for name in names:
        sig.setdefault(name, "constexpr" if name in consts else ptrs.get(name, "i32"))
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ptrs}
    src = GluonASTSource(_quant_int8_gluon_kernel, sig, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
