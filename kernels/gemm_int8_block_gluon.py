"""Block-scaled int8 GEMM for Hopper written in Gluon: the rescale of one K block overlaps the next block's wgmma.

Same function as :func:`turbocompile.kernels.gemm_int8_block.gemm_block_scaled` for 128x128-block int8 operands:
``out = sum_kb (A_kb @ W_kb^T) * a_scale[m/128, kb] * w_scale[n/128, kb] (+ bias)``. Because the scales change
every 128 channels of K, each 128-deep block's int32 product must be turned into fp32 and scaled before it joins the
running sum. The Triton kernel does that fold right after each ``tl.dot`` and the compiler waits for the tensor cores
to finish first, so they sit idle during the fold (~800 TOP/s against ~1250 without the rescale). Gluon lets us own
the asynchronous wgmma: every K block goes into a fresh int32 accumulator, we wait only until the *previous* block's
wgmma is done (one group left in flight), fold that one into the fp32 sum on the CUDA cores while the current block
runs on the tensor cores, and refill the shared-memory stage it released with a TMA load. Two int32 accumulators
alternate roles in a loop unrolled by two, so an in-flight accumulator is never copied (a copy would force a wait).

Needs sm_90 (wgmma, TMA) and Triton's Gluon as of 3.6. Run ``python -m turbocompile.kernels.gemm_int8_block_gluon``
on a Hopper GPU to check it against an fp64 reference and time it against the Triton kernel and cuBLAS bf16.
"""
from __future__ import annotations

import math

import torch

from turbocompile.errors import GPUError, UnsupportedShapeError

from .gluon_guard import GluonGuard
from .gluon_hopper import (
    TensorDescriptor,
    compile_for_sm90a,
    fence_async_shared,
    gl,
    gluon,
    mbarrier,
    on_hopper,
    tma_load,
    warpgroup_mma,
    warpgroup_mma_wait,
)

try:
    import triton
except ImportError:  # pragma: no cover - no Triton (gluon is None then too)
    triton = None

BLOCK = 128

#: Launch parameters: tile 128 x 128 x 128, two warpgroups (each wgmma is m64 x n128), 4 stages of 32 KiB.
NUM_STAGES = 4
NUM_WARPS = 8
GROUP_M = 8


if gluon is not None:

    @gluon.jit
    def _tile_coords(pid, M, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
        """Program id -> (tile row, tile column), sweeping GROUP_M tile rows per column so weights stay in L2."""
        rows = gl.cdiv(M, BLOCK_M)
        cols = gl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * cols
        first = (pid // per_group) * GROUP_M
        height = gl.minimum(rows - first, GROUP_M)
        return first + (pid % per_group) % height, (pid % per_group) // height

    @gluon.jit
    def _load_stage(a_desc, b_desc, a_bufs, b_bufs, ready, kb, off_m, off_n, pred, NUM_STAGES: gl.constexpr):
        """TMA K block ``kb`` of A and W into stage ``kb % NUM_STAGES``; its barrier flips when both land."""
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        s = kb % NUM_STAGES
        bar = ready.index(s)
        mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=pred)
        tma_load(a_desc, [off_m, kb * BLOCK_K], bar, a_bufs.index(s), pred=pred)
        tma_load(b_desc, [off_n, kb * BLOCK_K], bar, b_bufs.index(s), pred=pred)

    @gluon.jit
    def _start_block(a_bufs, b_bufs, ready, kb, init, sa_ptr, sb_ptr, stride_sak, stride_sbk,
                     NUM_STAGES: gl.constexpr, RESCALE: gl.constexpr):
        """Wait for K block ``kb`` in shared memory and issue its wgmma into a fresh int32 accumulator.

        Returns the in-flight accumulator and the block's scale ``sa * sb`` (loaded now, used one block later,
        so the scalar loads' latency hides behind the wait)."""
        s = kb % NUM_STAGES
        mbarrier.wait(ready.index(s), (kb // NUM_STAGES) & 1)
        # W is stored [N, K] (K contiguous): the transposed view is the K-major B operand that int8 wgmma wants.
        # use_acc=False: the hardware starts from zero (``init`` only supplies the type and layout, ptxas reads RZ).
        acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), init, use_acc=False, is_async=True)
        scale = gl.load(sa_ptr + kb * stride_sak) * gl.load(sb_ptr + kb * stride_sbk)
        return acc, scale

    @gluon.jit
    def _to_float(done, MAGIC: gl.constexpr):
        """Exact int32 -> fp32 of a block product: the convert instruction (``I2FP.F32.S32``, a quarter-rate pipe
        on Hopper), or the magic-number trick (an integer add and an FADD, on the INT and FP32 pipes)."""
        if MAGIC:
            # 0x4B400000 is the bit pattern of 1.5 * 2**23, and adding any |d| < 2**22 to it gives the float
            # 12582912 + d (one 128-deep int8 block stays under 2**21).
            return (done + 0x4B400000).to(gl.float32, bitcast=True) - 12582912.0
        else:
            return done.to(gl.float32)

    @gluon.jit
    def _halves(x):
        """The left and right column halves of a [R, C] tensor in the wgmma accumulator layout (or a half of it).

        The top column bit is a register bit there (each thread holds 2 adjacent columns of every 8-column group),
        so reshape + permute + split only relabel a thread's registers: no data moves."""
        R: gl.constexpr = x.shape[0]
        C: gl.constexpr = x.shape[1]
        return gl.split(gl.permute(gl.reshape(x, [R, 2, C // 2]), (0, 2, 1)))

    @gluon.jit
    def _unhalves(left, right, like):
        """Inverse of :func:`_halves`, back in the layout of ``like`` (asserted to be the same registers)."""
        R: gl.constexpr = left.shape[0]
        C: gl.constexpr = left.shape[1]
        x = gl.reshape(gl.permute(gl.join(left, right), (0, 2, 1)), [R, 2 * C])
        return gl.convert_layout(x, like.type.layout, assert_trivial=True)

    @gluon.jit
    def _fma(acc, done, scale, MAGIC: gl.constexpr):
        """acc + float(done) * scale in one fused multiply-add."""
        return gl.fma(_to_float(done, MAGIC), scale, acc)

    @gluon.jit
    def _fold_split(acc, done, scale, MAGIC_QUARTERS: gl.constexpr):
        """acc + float(done) * scale with ``MAGIC_QUARTERS`` of the 4 column quarters converted by the magic-number
        trick and the rest by I2FP. I2FP alone throttles its quarter-rate pipe (the tensor cores wait on it), the
        magic trick alone costs more issue slots (IADD + FADD); split, each pipe takes a share of the work at once
        (as FA4 splits its exp2 between MUFU and FMA). Both are exact: the sum has the same bits either way."""
        a_l, a_r = _halves(acc)
        d_l, d_r = _halves(done)
        a_ll, a_lr = _halves(a_l)
        d_ll, d_lr = _halves(d_l)
        a_rl, a_rr = _halves(a_r)
        d_rl, d_rr = _halves(d_r)
        Q: gl.constexpr = MAGIC_QUARTERS
        a_l = _unhalves(_fma(a_ll, d_ll, scale, Q >= 4), _fma(a_lr, d_lr, scale, Q >= 3), a_l)
        a_r = _unhalves(_fma(a_rl, d_rl, scale, Q >= 2), _fma(a_rr, d_rr, scale, Q >= 1), a_r)
        return _unhalves(a_l, a_r, acc)

    @gluon.jit
    def _fold(acc, done, scale, RESCALE: gl.constexpr):
        """acc += float(done) * scale, ``done`` being a completed int32 block product; RESCALE picks the exact
        int -> float conversion: 0 all I2FP, 1 all magic-number; 2, 3, 4 magic-number for 1/2, 3/4, 1/4 of the
        columns and I2FP for the rest (:func:`_fold_split`).

        The sum goes through a wgmma wait that leaves one group in flight (a no-op for the tensor cores): that pins
        the fold before the next wgmma issue. Otherwise LLVM sinks the fold below it, the finished accumulator
        outlives the start of the next one, and the loop-carried copy of an in-flight accumulator makes ptxas
        serialize every wgmma (warning C7514)."""
        if RESCALE >= 2:
            acc = _fold_split(acc, done, scale, 1 if RESCALE == 4 else RESCALE)
        else:
            acc = _fma(acc, done, scale, RESCALE == 1)
        return warpgroup_mma_wait(num_outstanding=1, deps=[acc])

    @gluon.jit
    def _gemm_int8_block_kernel(
        a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, bias_ptr,
        M, N, K, stride_cm, stride_sam, stride_sak, stride_sbn, stride_sbk,
        HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, NUM_STAGES: gl.constexpr, RESCALE: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        gl.static_assert(BLOCK_M == 128 and BLOCK_K == 128, "one 128x128 scale block per A tile and K step")
        gl.static_assert(BLOCK_N <= 128 and 128 % BLOCK_N == 0, "the W tile must sit inside one scale block")

        pid_m, pid_n = _tile_coords(gl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        sa_ptr += pid_m * stride_sam
        sb_ptr += (off_n // 128) * stride_sbn
        n_kb = K // BLOCK_K

        # wgmma accumulator layout: warps stacked along M (16 rows per warp, m64 per warpgroup), one n=BLOCK_N,
        # k=32 instruction shape for 8-bit operands.
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BLOCK_N, 32])

        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [NUM_STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [NUM_STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=1)
        fence_async_shared()  # barrier initialisation visible to the TMA unit before the first copy

        # Fill every stage (copies past the last K block are predicated off).
        for i in gl.static_range(NUM_STAGES):
            _load_stage(a_desc, b_desc, a_bufs, b_bufs, ready, i, off_m, off_n, i < n_kb, NUM_STAGES)

        init = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, acc_layout)
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)

        # Two int32 accumulators x and y alternate: while one block's wgmma runs, the previous block is folded.
        # Invariant at the top of each iteration: block kb - 1 is in flight in x, everything before it is folded.
        x, sx = _start_block(a_bufs, b_bufs, ready, 0, init, sa_ptr, sb_ptr, stride_sak, stride_sbk,
                             NUM_STAGES, RESCALE)
        for kb in range(1, n_kb - 1, 2):
            y, sy = _start_block(a_bufs, b_bufs, ready, kb, init, sa_ptr, sb_ptr, stride_sak, stride_sbk,
                                 NUM_STAGES, RESCALE)
            xd = warpgroup_mma_wait(num_outstanding=1, deps=[x])  # block kb - 1 done, its stage is free
            _load_stage(a_desc, b_desc, a_bufs, b_bufs, ready, kb - 1 + NUM_STAGES, off_m, off_n,
                        kb - 1 + NUM_STAGES < n_kb, NUM_STAGES)
            acc = _fold(acc, xd, sx, RESCALE)

            x, sx = _start_block(a_bufs, b_bufs, ready, kb + 1, init, sa_ptr, sb_ptr, stride_sak, stride_sbk,
                                 NUM_STAGES, RESCALE)
            yd = warpgroup_mma_wait(num_outstanding=1, deps=[y])  # block kb done
            _load_stage(a_desc, b_desc, a_bufs, b_bufs, ready, kb + NUM_STAGES, off_m, off_n,
                        kb + NUM_STAGES < n_kb, NUM_STAGES)
            acc = _fold(acc, yd, sy, RESCALE)

        # The loop leaves block n_kb - 1 (odd count) or n_kb - 2 (even count) in flight in x.
        if n_kb % 2 == 0:
            y, sy = _start_block(a_bufs, b_bufs, ready, n_kb - 1, init, sa_ptr, sb_ptr, stride_sak, stride_sbk,
                                 NUM_STAGES, RESCALE)
            xd = warpgroup_mma_wait(num_outstanding=1, deps=[x])
            acc = _fold(acc, xd, sx, RESCALE)
            yd = warpgroup_mma_wait(num_outstanding=0, deps=[y])
            acc = _fold(acc, yd, sy, RESCALE)
        else:
            xd = warpgroup_mma_wait(num_outstanding=0, deps=[x])
            acc = _fold(acc, xd, sx, RESCALE)

        for i in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(ready.index(i))

        # Epilogue: bias in the accumulator layout, then 16-byte row-contiguous stores (tail rows masked).
        if HAS_BIAS:
            offs_bn = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
            bias = gl.load(bias_ptr + offs_bn, mask=offs_bn < N, other=0.0).to(gl.float32)
            acc = acc + gl.expand_dims(bias, 0)
        TN: gl.constexpr = BLOCK_N // 8 if BLOCK_N // 8 < 32 else 32
        out_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // TN, TN],
                                                    warps_per_cta=[num_warps, 1], order=[1, 0])
        out = gl.convert_layout(acc.to(c_ptr.dtype.element_ty), out_layout)
        offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out_layout))
        ptrs = c_ptr + gl.expand_dims(offs_m.to(gl.int64) * stride_cm, 1) + gl.expand_dims(offs_n, 0)
        mask = gl.expand_dims(offs_m < M, 1) & gl.expand_dims(offs_n < N, 0)
        gl.store(ptrs, out, mask=mask)


#: Off for the rest of the process once a first launch fails (an incompatible Triton); see :mod:`.gluon_guard`.
GUARD = GluonGuard("int8-block GEMM")


def available() -> bool:
    """True when the Gluon kernel can run here: Gluon's Hopper API imports, the current GPU is sm_90 (not the CPU
    interpreter), and it has not been switched off by a failed first launch."""
    return GUARD.disabled is None and on_hopper()


#: ``rescale`` values: how the fold converts int32 to fp32 (0 I2FP, 1 magic number; 2, 3, 4 magic number for 1/2,
#: 3/4, 1/4 of the columns and I2FP for the rest).
RESCALE_MODES = (0, 1, 2, 3, 4)
#: Output dtypes the epilogue writes.
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: The last compiled kernel launched (the self-check reads registers, spills and shared memory from it).
LAST_COMPILED = None


def check_inputs(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None, out_dtype: torch.dtype, out: torch.Tensor | None = None,
                 rescale: int = 0, num_stages: int = NUM_STAGES, block_n: int = 128) -> None:
    """Raise :class:`UnsupportedShapeError` (one line) for anything the kernel does not take. Touches no GPU."""
    if a_q.dtype != torch.int8 or w_q.dtype != torch.int8:
        raise UnsupportedShapeError(f"gluon int8 GEMM needs int8 A and W, got {a_q.dtype} and {w_q.dtype}")
    if a_q.dim() != 2 or w_q.dim() != 2:
        raise UnsupportedShapeError(f"gluon int8 GEMM needs 2-D A [M, K] and W [N, K], got "
                                    f"{tuple(a_q.shape)} and {tuple(w_q.shape)}")
    m, k = a_q.shape
    n = w_q.shape[0]
    if w_q.shape[1] != k:
        raise UnsupportedShapeError(f"gluon int8 GEMM: A {tuple(a_q.shape)} and W {tuple(w_q.shape)} differ in K")
    if k % BLOCK or n % BLOCK or k == 0 or n == 0:
        raise UnsupportedShapeError(f"gluon int8 GEMM needs K and N positive multiples of {BLOCK}, got K={k} N={n}")
    if not (a_q.is_contiguous() and w_q.is_contiguous()):
        raise UnsupportedShapeError("gluon int8 GEMM needs contiguous row-major A and W (they are read as TMA tiles)")
    want_a, want_w = (math.ceil(m / BLOCK), k // BLOCK), (n // BLOCK, k // BLOCK)
    if tuple(a_scale.shape) != want_a or a_scale.dtype != torch.float32:
        raise UnsupportedShapeError(f"activation scale must be float32 {want_a}, got "
                                    f"{a_scale.dtype} {tuple(a_scale.shape)}")
    if tuple(w_scale.shape) != want_w or w_scale.dtype != torch.float32:
        raise UnsupportedShapeError(f"weight scale must be float32 {want_w}, got "
                                    f"{w_scale.dtype} {tuple(w_scale.shape)}")
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.is_contiguous()):
        raise UnsupportedShapeError(f"bias must be a contiguous vector of {n}, got {tuple(bias.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise UnsupportedShapeError(f"gluon int8 GEMM writes bf16, fp16 or fp32, not {out_dtype}")
    if out is not None and (tuple(out.shape) != (m, n) or out.dtype != out_dtype or not out.is_contiguous()):
        raise UnsupportedShapeError(f"out must be a contiguous {out_dtype} ({m}, {n}) tensor, got "
                                    f"{out.dtype} {tuple(out.shape)}")
    if block_n not in (64, 128) or rescale not in RESCALE_MODES or not 2 <= num_stages <= 6:
        raise UnsupportedShapeError(f"gluon int8 GEMM takes block_n 64/128, rescale 0-4 and 2-6 stages, got "
                                    f"{block_n}/{rescale}/{num_stages}")


def gemm_int8_block_gluon(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                          bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *,
                          out: torch.Tensor | None = None, rescale: int = 0, num_stages: int = NUM_STAGES,
                          block_n: int = 128) -> torch.Tensor:
    """Block-scaled int8 GEMM ``[M, K] x [N, K]^T -> [M, N]`` in ``out_dtype`` (scales as in ``gemm_block_scaled``).

    ``a_scale`` is float32 ``[ceil(M/128), K/128]``, ``w_scale`` float32 ``[N/128, K/128]``; K and N must be
    multiples of 128 (M is free: TMA zero-fills the tail rows and the store masks them). ``out`` is written in
    place when given. Tuning knobs: ``rescale`` 0 converts each block's int32 result with the convert instruction,
    1 with the exact magic-number trick (integer add, float subtract), 2, 3, 4 with the trick for 1/2, 3/4, 1/4 of
    the columns and the convert for the rest (all give the same bits); ``block_n`` 64 runs 4 warps on
    128 x 64 tiles; ``num_stages`` shared-memory stages of 16 KiB per 64 columns of the tile plus 16 KiB.
    """
    check_inputs(a_q, a_scale, w_q, w_scale, bias, out_dtype, out, rescale, num_stages, block_n)
    if gluon is None or not a_q.is_cuda:
        raise GPUError("the Gluon int8 GEMM needs CUDA tensors on a Hopper GPU and Triton with Gluon")
    devs = {t.device for t in (a_q, a_scale, w_q, w_scale, bias, out) if t is not None}
    if len(devs) != 1:
        raise UnsupportedShapeError(f"gluon int8 GEMM operands are on several devices: {sorted(map(str, devs))}")
    m, k = a_q.shape
    n = w_q.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=a_q.device)
    if m == 0:
        return out
    a_layout = gl.NVMMASharedLayout.get_default_for([BLOCK, BLOCK], gl.int8)
    b_layout = gl.NVMMASharedLayout.get_default_for([block_n, BLOCK], gl.int8)
    a_desc = TensorDescriptor.from_tensor(a_q, [BLOCK, BLOCK], a_layout)
    b_desc = TensorDescriptor.from_tensor(w_q, [block_n, BLOCK], b_layout)
    grid = (triton.cdiv(m, BLOCK) * (n // block_n),)
    global LAST_COMPILED
    LAST_COMPILED = _gemm_int8_block_kernel[grid](
        a_desc, b_desc, out, a_scale, w_scale, bias if bias is not None else out,
        m, n, k, out.stride(0), a_scale.stride(0), a_scale.stride(1), w_scale.stride(0), w_scale.stride(1),
        HAS_BIAS=bias is not None, GROUP_M=GROUP_M, NUM_STAGES=num_stages, RESCALE=rescale,
        num_warps=NUM_WARPS if block_n == 128 else 4)
    GUARD.succeeded()
    return out


def compile_for_sm90(rescale: int = 0, block_n: int = 128, num_stages: int = NUM_STAGES, has_bias: bool = True):
    """The kernel compiled for sm_90a without a GPU (:func:`.gluon_hopper.compile_for_sm90a`), specialized as a
    launch from :func:`gemm_int8_block_gluon` with bf16 out and contiguous scales would be (K-strides of 1)."""
    lay = gl.NVMMASharedLayout.get_default_for
    ptrs = {"c_ptr": "*bf16", "sa_ptr": "*fp32", "sb_ptr": "*fp32", "bias_ptr": "*fp32"}
    sig = {"a_desc": f"tensordesc<i8[{BLOCK}, {BLOCK}],{lay([BLOCK, BLOCK], gl.int8)!r}>",
           "b_desc": f"tensordesc<i8[{block_n}, {BLOCK}],{lay([block_n, BLOCK], gl.int8)!r}>", **ptrs}
    consts = {"stride_sak": 1, "stride_sbk": 1, "HAS_BIAS": has_bias, "GROUP_M": GROUP_M, "NUM_STAGES": num_stages,
              "RESCALE": rescale, "num_warps": NUM_WARPS if block_n == 128 else 4}
    return compile_for_sm90a(_gemm_int8_block_kernel, sig, consts, [*ptrs, "N", "K", "stride_cm"])


def reference(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, rows: slice | None = None) -> torch.Tensor:
    """float64 ``[M, N]`` (or the ``rows`` slice of it) on the inputs' device: exact block products, fp64 scaling."""
    rows = rows or slice(0, a_q.shape[0])
    a = a_q[rows]
    m0 = rows.start or 0
    k = a_q.shape[1]
    n = w_q.shape[0]
    dev = a_q.device
    out = torch.zeros((a.shape[0], n), dtype=torch.float64, device=dev)
    block_a = (torch.arange(a.shape[0], device=dev) + m0) // BLOCK
    block_w = torch.arange(n, device=dev) // BLOCK
    for kb in range(k // BLOCK):
        sl = slice(kb * BLOCK, (kb + 1) * BLOCK)
        prod = a[:, sl].double() @ w_q[:, sl].double().t()  # |entries| < 2**21: exact in fp64
        prod *= a_scale[block_a, kb].double()[:, None]
        prod *= w_scale[block_w, kb].double()[None, :]
        out += prod
    if bias is not None:
        out += bias.double()[None, :]
    return out


#: Benchmark shapes: Wan 1.3B (dim 1536, FFN 8960) at M = 32760 tokens, Wan 14B (dim 5120, FFN 13824) at 75600.
BENCH_SHAPES = [(32760, 1536, 1536), (32760, 1536, 8960), (32760, 8960, 1536),
                (75600, 5120, 5120), (75600, 5120, 13824), (75600, 13824, 5120)]
#: Gluon variants timed beside the default (name -> wrapper keywords).
BENCH_VARIANTS = {"gluon": {}, "gluon_s3": {"num_stages": 3}, "gluon_magic": {"rescale": 1},
                  "gluon_split2": {"rescale": 2}, "gluon_split4": {"rescale": 3}, "gluon_split4b": {"rescale": 4},
                  "gluon_n64": {"block_n": 64}}  # split2/4/4b: magic number for 1/2, 3/4, 1/4 of the columns


def _random_inputs(m: int, k: int, n: int, gen: torch.Generator, dev: torch.device):
    """Fresh random int8 operands (full range, no zeros-only blocks) and positive scales, fp32 bias."""
    a_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev, generator=gen)
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev, generator=gen)
    a_scale = torch.rand((math.ceil(m / BLOCK), k // BLOCK), device=dev, generator=gen) * 2e-2 + 1e-3
    w_scale = torch.rand((n // BLOCK, k // BLOCK), device=dev, generator=gen) * 2e-3 + 1e-4
    bias = torch.randn(n, device=dev, generator=gen)
    return a_q, a_scale, w_q, w_scale, bias


def _check(m: int, k: int, n: int, gen: torch.Generator, dev: torch.device, variants: dict) -> dict:
    """Gluon (fp32 and bf16 out, every variant) against the fp64 reference and the Triton kernel; NaN-poisoned."""
    from turbocompile.kernels.gemm_int8_block import gemm_block_scaled

    a_q, a_scale, w_q, w_scale, bias = _random_inputs(m, k, n, gen, dev)
    res: dict = {}
    outs = {}
    for name, kw in variants.items():
        o32 = torch.full((m, n), float("nan"), dtype=torch.float32, device=dev)
        gemm_int8_block_gluon(a_q, a_scale, w_q, w_scale, bias, torch.float32, out=o32, **kw)
        outs[name] = o32
    o16 = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=dev)
    gemm_int8_block_gluon(a_q, a_scale, w_q, w_scale, bias, torch.bfloat16, out=o16)
    tri = gemm_block_scaled(a_q, a_scale, w_q, w_scale, bias, torch.float32)
    torch.cuda.synchronize()
    num = {name: 0.0 for name in outs}
    max_err = {name: 0.0 for name in outs}
    num16 = num_tri = den = ref_max = 0.0
    step = 8192
    for r0 in range(0, m, step):  # fp64 reference in row chunks (keeps memory under ~2 x 8192 x N x 8 bytes)
        rows = slice(r0, min(m, r0 + step))
        ref = reference(a_q, a_scale, w_q, w_scale, bias, rows)
        den += ref.square().sum().item()
        ref_max = max(ref_max, ref.abs().max().item())
        for name, o in outs.items():
            d = o[rows].double() - ref
            num[name] += d.square().sum().item()
            max_err[name] = max(max_err[name], d.abs().max().item())
        num16 += (o16[rows].double() - ref).square().sum().item()
        num_tri += (tri[rows].double() - ref).square().sum().item()
        del ref
    for name, o in outs.items():
        if "rescale" in variants[name] and "gluon" in outs:  # the conversions are exact: the same bits as I2FP
            res[f"{name}/same_bits"] = bool(torch.equal(o, outs["gluon"]))
        res[f"{name}/rel_fp32"] = math.sqrt(num[name] / den)
        res[f"{name}/maxerr_over_maxref"] = max_err[name] / ref_max
        res[f"{name}/nan"] = bool(torch.isnan(o).any().item())
    res["gluon/rel_bf16"] = math.sqrt(num16 / den)
    res["gluon/nan_bf16"] = bool(torch.isnan(o16).any().item())
    res["triton/rel_fp32"] = math.sqrt(num_tri / den)
    return res


def _bench(out_dir: str | None, check_only: bool = False, variants: bool = True,
           only: list[str] | None = None) -> dict:  # pragma: no cover
    import datetime
    from triton.testing import do_bench

    from turbocompile.kernels.benchlog import BenchLog
    from turbocompile.kernels.gemm_int8_block import gemm_block_scaled

    if not available():
        raise GPUError("the Gluon int8 GEMM self-check needs a Hopper (sm_90) GPU and Triton's Gluon Hopper API")
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1234)
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "check": {}, "time": []}
    log = BenchLog(out_dir, "bench_gluon_int8", res)
    say, dump = log.say, log.dump

    vs = BENCH_VARIANTS if variants else {"gluon": {}}
    if only:  # the default ("gluon") always runs: the summary compares against it
        unknown = sorted(set(only) - set(BENCH_VARIANTS))
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; known: {', '.join(BENCH_VARIANTS)}")
        vs = {name: kw for name, kw in BENCH_VARIANTS.items() if name == "gluon" or name in only}
    say(f"# {res['device']}  torch {res['torch']}  triton {res['triton']}  {res['date']}")

    # ---- compiled-kernel facts (registers, spills, shared memory, wgmma waits in the PTX) ---------------------
    for name, kw in vs.items():
        a_q, a_scale, w_q, w_scale, bias = _random_inputs(256, 512, 256, gen, dev)
        gemm_int8_block_gluon(a_q, a_scale, w_q, w_scale, bias, **kw)
        k_ = LAST_COMPILED
        ptx = k_.asm["ptx"]
        facts = {"n_regs": k_.n_regs, "n_spills": k_.n_spills, "shared": k_.metadata.shared,
                 "wgmma_s32_s8_s8": "wgmma.mma_async" in ptx and ".s32.s8.s8" in ptx,
                 "wait_group_1": ptx.count("wgmma.wait_group.sync.aligned 1;"),
                 "wait_group_0": ptx.count("wgmma.wait_group.sync.aligned 0;")}
        res.setdefault("compiled", {})[name] = facts
        say(f"{name:>12}: regs {facts['n_regs']} spills {facts['n_spills']} smem {facts['shared']} B, "
            f"int8 wgmma {facts['wgmma_s32_s8_s8']}, "
            f"wait_group 1 x{facts['wait_group_1']} / 0 x{facts['wait_group_0']}")

    # ---- correctness: small odd shapes, then every benchmark shape ------------------------------------------
    ok = True
    for m, k, n in [(1000, 512, 384), (77, 384, 256), (129, 128, 128)] + BENCH_SHAPES:
        r = _check(m, k, n, gen, dev, vs)
        res["check"][f"{m}x{k}x{n}"] = r
        bad = [key for key, v in r.items() if (key.endswith("nan") and v) or (key.endswith("same_bits") and not v) or
               (key.endswith("rel_fp32") and v > 1e-5) or (key.endswith("rel_bf16") and v > 5e-3)]
        ok &= not bad
        say(f"check M={m:>6} K={k:>5} N={n:>5}: gluon rel(fp32) {r['gluon/rel_fp32']:.2e} "
            f"max|err|/max|ref| {r['gluon/maxerr_over_maxref']:.2e}  rel(bf16) {r['gluon/rel_bf16']:.2e}  "
            f"triton rel(fp32) {r['triton/rel_fp32']:.2e}  " +
            " ".join(f"{nm} {r[f'{nm}/rel_fp32']:.1e}" for nm in vs if nm != "gluon") +
            ("  OK" if not bad else f"  FAIL {bad}"))
        dump()
    res["check_ok"] = ok
    if check_only or not ok:
        dump()
        if not ok:
            raise SystemExit("gluon int8 GEMM self-check FAILED")
        return res

    # ---- timing ---------------------------------------------------------------------------------------------
    def t(fn) -> float:
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    names = list(vs) + ["triton"]
    for m, k, n in BENCH_SHAPES:
        a_q, a_scale, w_q, w_scale, bias = _random_inputs(m, k, n, gen, dev)
        x16 = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=gen)
        w16 = torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=gen)
        b16 = bias.to(torch.bfloat16)
        row = {"M": m, "K": k, "N": n}
        row["bf16"] = t(lambda: torch.nn.functional.linear(x16, w16, b16))
        for name, kw in vs.items():
            row[name] = t(lambda kw=kw: gemm_int8_block_gluon(a_q, a_scale, w_q, w_scale, bias, **kw))
        row["triton"] = t(lambda: gemm_block_scaled(a_q, a_scale, w_q, w_scale, bias, torch.bfloat16))
        row["bf16_again"] = t(lambda: torch.nn.functional.linear(x16, w16, b16))  # noise check on the baseline
        res["time"].append(row)
        del a_q, w_q, x16, w16
        dump()

    say("")
    say("## ms (TOP/s) and speedup vs cuBLAS bf16 F.linear; gluon* = this kernel, triton = gemm_block_scaled")
    say(f"{'M':>6} {'K':>6} {'N':>6} {'bf16':>14} " + " ".join(f"{nm:>24}" for nm in names))
    for r in res["time"]:
        ops = 2.0 * r["M"] * r["K"] * r["N"]
        cells = [f"{r[nm]:6.3f} ({ops / r[nm] / 1e9:5.0f}) {r['bf16'] / r[nm]:.2f}x" for nm in names]
        say(f"{r['M']:>6} {r['K']:>6} {r['N']:>6} {r['bf16']:6.3f} ({ops / r['bf16'] / 1e9:5.0f}) " +
            " ".join(f"{c:>24}" for c in cells))
    geo = {nm: math.exp(sum(math.log(r["bf16"] / r[nm]) for r in res["time"]) / len(res["time"])) for nm in names}
    geo["gluon_vs_triton"] = math.exp(sum(math.log(r["triton"] / r["gluon"]) for r in res["time"])
                                      / len(res["time"]))
    res["geomean_speedup_vs_bf16"] = geo
    say("geomean speedup vs bf16: " + "  ".join(f"{kk} {v:.3f}x" for kk, v in geo.items()))
    dump()
    return res


if __name__ == "__main__":  # pragma: no cover
    import argparse

    p = argparse.ArgumentParser(description="check the Gluon block-scaled int8 GEMM against fp64 and time it")
    p.add_argument("--out", default=None, help="folder for bench_gluon_int8.json / .log")
    p.add_argument("--check-only", action="store_true", help="correctness only, no timing")
    p.add_argument("--no-variants", action="store_true", help="only the default Gluon configuration")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated subset of {','.join(BENCH_VARIANTS)} (the default 'gluon' always runs)")
    args = p.parse_args()
    _bench(args.out, check_only=args.check_only, variants=not args.no_variants,
           only=args.variants.split(",") if args.variants else None)
