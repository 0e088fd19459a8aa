"""Sage attention forward for Hopper in Gluon: FP8 P goes to the P·V wgmma straight from the score registers.

Same function as the Triton ``_attn_fwd_kernel`` of :mod:`.sage_attention` on its Sage path (INT8 QKᵀ with block
scales, FP8 P·V with a per-channel V scale, a fresh fp32 accumulator per key tile), dense or block-sparse over a
LUT, with the optional SLA linear branch in the epilogue. Triton 3.6 sends P to the FP8 wgmma through shared
memory one byte per store (128 ``STS.U8`` per thread and 64x128 tile, plus barriers, in its SASS). Here:

* P never leaves the registers: the wgmma accumulator layout of the scores and the register A-operand layout of
  the FP8 P·V differ only in which of 32 keys a thread holds, so V is stored with its keys permuted inside every
  32-key group (:func:`wgmma_key_order`, applied by the V quantizer) and P is relabelled, not moved;
* K/V tiles arrive by TMA into a ring of ``NUM_STAGES`` shared-memory stages (Q once); a sparse program first
  copies its LUT row and the K scales it selects into a shared-memory table, so the loop reads no global memory
  but its K/V tiles (dense programs load each K scale one tile ahead);
* the linear branch's [D, D] M is loaded after the loop into K's idle stages (no extra shared memory); with
  ``lin_phi`` (what ``sage_sla`` passes: φ(q)/(φ(q)·z + 1e-5) written by the Q quantizer) that tile comes by TMA
  too, both are requested at the top of the last key tile, and the branch is one wgmma with both operands in
  shared memory, instead of φ(q) computed from the raw query here.

One warpgroup per program (64 query rows), 128-key tiles where the K block allows. The loop takes one tile at a
time (scores, softmax, P·V, fold); two programs share an SM and interleave. An FA3-style loop (the next tile's
scores and the previous P·V in flight during the softmax) measured slower and was removed
(docs/kernels-attention.md has the numbers and why; git history has the code).

Needs sm_90 (wgmma, TMA) and Triton's Gluon as of 3.6. ``python -m turbocompile.kernels.sage_attention_gluon``
times the variants against the Triton kernel; ``python -m turbocompile.kernels.sage_sla --bench`` against cuDNN.
"""
from __future__ import annotations

import os

import torch

from turbocompile.errors import UnsupportedShapeError

from .gluon_guard import GluonGuard

from .gluon_hopper import (
    TensorDescriptor,
    compile_for_sm90a,
    fence_async_shared,
    gl,
    gluon,
    mbarrier,
    on_hopper,
    reinterpret,
    thread_barrier,
    tma_load,
    warpgroup_mma,
    warpgroup_mma_wait,
)

BLOCK_M = 64  # query rows per program: one warpgroup, one wgmma M (dense may take 128: two warpgroups, shared K/V)
BLOCK_N = 128  # keys per tile where the K block allows (else 64)
NUM_STAGES = 3  # K/V shared-memory stages (32 KiB each with 128-key tiles at head_dim 128)
NUM_WARPS = 4
M_IN_STAGES = True  # the linear branch's M reuses K's shared-memory stages after the loop
INT_MAX = True  # the softmax row maximum on the int32 scores for unmasked tiles (_softmax_tile): sage_sla 0.9%
#: Row sums kept as each thread's partial sums over the loop, the quad's shuffles done once after it
#: (_softmax_tile's L_PARTIAL), in this kernel and the FA3-layout ones alike (so their outputs stay bit-equal):
#: 482 -> 474 instructions per trip of the dense FA3-layout loop, 1.3-4.1% faster (H200, 2026-11-27 22:50 UTC).
#: This kernel with it ran the sparse benchmark in 0.909 / 15.73 ms against 0.886-0.898 / 15.17-15.41 without on
#: other machines (not A/B'd in one run; it is the fallback, the FA3-layout kernels take the ops' calls).
L_PARTIAL = True
#: faster at 1.3B@480p (H200, 2026-11-27 18:14 UTC); False: on the converted floats, as before
PRELOAD_SPARSE = True  # sparse programs read their tile table from shared memory (preload_tiles); dense ones don't


def wgmma_key_order(n: int, device=None) -> torch.Tensor:
    """Storage position of each key of a length-``n`` block (n a multiple of 32) in the Vᵀ the kernel reads.

    In a wgmma accumulator thread q (lane % 4) holds columns 2q, 2q+1, 2q+8, 2q+9 (+16) of each 32-column group;
    an 8-bit register A operand wants k = 4q..4q+3 (+16). Key ``c = 32a + 16b + 8e + 2q + i`` is therefore stored at
    ``32a + 16b + 4q + 2e + i``, which makes the scores' registers the P·V operand's registers."""
    c = torch.arange(n, device=device)
    return (c & -16) | (((c >> 1) & 3) << 2) | (((c >> 3) & 1) << 1) | (c & 1)


if gluon is not None:
    LOG2_FP8_MAX = gl.constexpr(8.807354922057604)  # log2 448: P is computed as P·448, using e4m3's whole range
    MAGIC = gl.constexpr(12582912.0)  # 1.5·2^23: bits 0x4B400000 plus an int |s| < 2^22 are the float MAGIC + s

    @gluon.jit
    def _tile_start(lut_base, j, n_tiles, SPARSE: gl.constexpr, BLKK: gl.constexpr, BLOCK_N: gl.constexpr):
        """First key of tile ``j``: the j-th BLOCK_N-key slice of the LUT's key blocks (sparse) or j·BLOCK_N (dense).
        Tiles past the end map to 0 (their copies are predicated off, their softmax never runs)."""
        if SPARSE:
            SUB: gl.constexpr = BLKK // BLOCK_N
            kb = gl.load(lut_base + j // SUB, mask=j < n_tiles, other=0)
            return kb * BLKK + (j % SUB) * BLOCK_N
        else:
            return j * BLOCK_N

    @gluon.jit
    def _smem_scalar(buf, i, layout: gl.constexpr):
        """Element ``i`` of a [N, 1] shared-memory table as a scalar (one broadcast shared load per thread)."""
        return gl.max(buf.index(i).load(layout), axis=0)

    @gluon.jit
    def _start_at(st_s, lut_base, j, n_tiles, SPARSE: gl.constexpr, BLKK: gl.constexpr, BLOCK_N: gl.constexpr,
                  TILES: gl.constexpr, one: gl.constexpr):
        """First key of tile ``j``: from the shared-memory table when the program preloaded it, else from the LUT."""
        if TILES > 1 and SPARSE:
            return _smem_scalar(st_s, gl.minimum(j, TILES - 1), one)
        else:
            return _tile_start(lut_base, j, n_tiles, SPARSE, BLKK, BLOCK_N)

    @gluon.jit
    def _kscale_at(ks_s, ks_row, j, start, BLKK: gl.constexpr, TILES: gl.constexpr, one: gl.constexpr):
        """K scale of tile ``j`` (keys from ``start``): from the preloaded table, else a global load."""
        if TILES > 1:
            return _smem_scalar(ks_s, gl.minimum(j, TILES - 1), one)
        else:
            return gl.load(ks_row + start // BLKK)

    @gluon.jit
    def _load_kv(k_desc, v_desc, k_s, v_s, ready, t, start, k_row0, v_row0, pred, NUM_STAGES: gl.constexpr):
        """TMA tile ``t`` (keys ``start`` .. +BLOCK_N) of K and Vᵀ into stage ``t % NUM_STAGES``."""
        s = t % NUM_STAGES
        bar = ready.index(s)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=pred)
        tma_load(k_desc, [k_row0 + start, 0], bar, k_s.index(s), pred=pred)
        tma_load(v_desc, [v_row0, start], bar, v_s.index(s), pred=pred)

    @gluon.jit
    def _issue_scores(q_s, k_s, ready, t, s_init, NUM_STAGES: gl.constexpr):
        """Wait for tile ``t`` in shared memory and issue its int8 ``Q·Kᵀ`` wgmma (asynchronous)."""
        s = t % NUM_STAGES
        mbarrier.wait(ready.index(s), (t // NUM_STAGES) & 1)
        return warpgroup_mma(q_s, k_s.index(s).permute((1, 0)), s_init, use_acc=False, is_async=True)

    @gluon.constexpr_function
    def wgmma_acc_layout(num_warps, n, k):
        """Registers of an m64·nN·kK wgmma accumulator over ``num_warps`` warps (16 rows each)."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, k])

    @gluon.jit
    def _store_rows(o, O, b, h, row0, Lq, stride_ob, stride_oh, stride_ol, NW: gl.constexpr):
        """Rows ``row0`` .. +BM of ``o`` [BM, D] (fp32) into O[b, h] as O's dtype, rows past ``Lq`` left out; through
        a row-major layout so that each thread stores 16 contiguous bytes."""
        BM: gl.constexpr = o.shape[0]
        HEAD_DIM: gl.constexpr = o.shape[1]
        out_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // (HEAD_DIM // 8),
                                                    HEAD_DIM // 8], warps_per_cta=[NW, 1], order=[1, 0])
        out = gl.convert_layout(o.to(O.dtype.element_ty), out_layout)
        rows = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, out_layout))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, out_layout))
        ptrs = O + b * stride_ob + h * stride_oh + gl.expand_dims(rows, 1) * stride_ol + gl.expand_dims(cols, 0)
        gl.store(ptrs, out, mask=gl.expand_dims(rows < Lq, 1))

    @gluon.jit
    def _int_row_max(s_int, BLOCK_N: gl.constexpr, s_layout: gl.constexpr, SPLIT: gl.constexpr):
        """Row maxima of int32 scores [BM, BLOCK_N] (ptxas chains them as 3-input VIMNMX3). SPLIT: a thread's
        columns 64h + 8i + 2q + j reduced as one chain per half h over (i, j), then h, then the quad q, so the
        dependent chain is half as long."""
        if SPLIT:
            BM: gl.constexpr = s_int.shape[0]
            t = s_int.reshape([BM, 2, BLOCK_N // 16, 4, 2]).permute((0, 1, 3, 2, 4))
            t = gl.max(t.reshape([BM, 2, 4, BLOCK_N // 8]), axis=3)
            t = gl.max(gl.max(t, axis=1), axis=1)
            return gl.convert_layout(t, gl.SliceLayout(1, s_layout), assert_trivial=True)
        else:
            return gl.max(s_int, axis=1)

    @gluon.jit
    def _softmax_tile(s_int, m_i, l_i, c, start, Lk, BLOCK_N: gl.constexpr, s_layout: gl.constexpr,
                      ROW_SCALES: gl.constexpr = False, MAY_MASK: gl.constexpr = True, INT_MAX: gl.constexpr = False,
                      SPLIT_MAX: gl.constexpr = False, L_PARTIAL: gl.constexpr = False):
        """Online softmax of one tile of int32 scores; returns P·448 (fp32), the rescale factor and new m, l.

        ``c`` is the tile's dequantisation scale (q scale · k scale, log2 e / sqrt(D) folded in), one per row when
        ROW_SCALES (the tile spans several Q blocks). The int32 -> fp32
        conversion is the exact magic-number add (no quarter-rate I2F); the row maximum is taken on those biased
        floats (monotonic in s) and the bias is folded into the one FMA per score of the exp2 argument.

        MAY_MASK False: the caller knows every key of the tile is below Lk (no check, no branch). INT_MAX: the
        row maximum of a tile without masked keys is taken on the int32 scores themselves (:func:`_int_row_max`,
        SPLIT_MAX its two-chain form), so its chain need not wait for the conversion; the same value, as the
        conversion is exact and monotonic. A tile with masked keys takes it on the masked floats."""
        x = (s_int + 0x4B400000).to(gl.float32, bitcast=True)
        if INT_MAX:
            x_max = (_int_row_max(s_int, BLOCK_N, s_layout, SPLIT_MAX) + 0x4B400000).to(gl.float32, bitcast=True)
        if MAY_MASK:
            if start + BLOCK_N > Lk:
                cols = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
                x = gl.where(gl.expand_dims(cols < Lk, 0), x, float("-inf"))
                if INT_MAX:
                    x_max = gl.max(x, axis=1)
        if not INT_MAX:
            x_max = gl.max(x, axis=1)
        m_new = gl.maximum(m_i, (x_max - MAGIC) * c)
        bias = MAGIC * c + m_new - LOG2_FP8_MAX
        if ROW_SCALES:
            p = gl.exp2(gl.fma(x, gl.expand_dims(c, 1), -gl.expand_dims(bias, 1)))
        else:
            p = gl.exp2(gl.fma(x, c, -gl.expand_dims(bias, 1)))
        alpha = gl.exp2(m_i - m_new)
        if L_PARTIAL:  # l_i holds each thread's partial row sums ([BM, 4], _thread_row_sums): no quad shuffle here
            a = gl.convert_layout(alpha, gl.SliceLayout(1, l_i.type.layout), assert_trivial=True)
            l_i = l_i * gl.expand_dims(a, 1) + _thread_row_sums(p)
        else:
            l_i = l_i * alpha + gl.sum(p, axis=1)
        return p, alpha, m_new, l_i

    @gluon.jit
    def _row_sums_start(BM: gl.constexpr, BN: gl.constexpr, s_layout: gl.constexpr, L_PARTIAL: gl.constexpr):
        """The online softmax's zero row sums: [BM] in the score rows' layout, or with L_PARTIAL each thread's
        partial sums [BM, 4] (:func:`_thread_row_sums`), which :func:`_row_sums_end` finishes after the loop."""
        if L_PARTIAL:
            l_i = _thread_row_sums(gl.zeros([BM, BN], gl.float32, s_layout))
        else:
            l_i = gl.zeros([BM], gl.float32, gl.SliceLayout(1, s_layout))
        return l_i

    @gluon.jit
    def _row_sums_end(l_i, s_layout: gl.constexpr, L_PARTIAL: gl.constexpr):
        """The row sums [BM] in the score rows' layout; with L_PARTIAL the quad's partials summed (its two
        shuffles, once per row block)."""
        if L_PARTIAL:
            l_i = gl.convert_layout(gl.sum(l_i, axis=1), gl.SliceLayout(1, s_layout), assert_trivial=True)
        return l_i

    @gluon.jit
    def _thread_row_sums(p):
        """Each thread's sums of its own entries of each row of a wgmma-accumulator-layout tile [BM, BN], as [BM, 4]
        (axis 1 is the thread's place in its quad, the column pair 2·t + {0, 1} of every 8-column group): the row
        sum short of the quad's two shuffles, which ``gl.sum(., axis=1)`` of the result finishes."""
        BM: gl.constexpr = p.shape[0]
        BN: gl.constexpr = p.shape[1]
        return gl.sum(gl.sum(gl.reshape(p, [BM, BN // 8, 4, 2]), axis=3), axis=1)

    @gluon.jit
    def _as_pv_operand(p, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, p_layout: gl.constexpr):
        """P·448 -> FP8, relabelled from the score accumulator layout to the P·V register operand layout.

        Swapping the "which 8-column group" and "which lane of the quad" digits of the key index turns the one
        layout into the other, so the conversion moves no data (``assert_trivial``); V is stored in the same
        permuted key order (:func:`wgmma_key_order`)."""
        p8 = p.to(gl.float8e4nv)
        p8 = p8.reshape([BLOCK_M, BLOCK_N // 32, 2, 2, 4, 2]).permute((0, 1, 2, 4, 3, 5)).reshape([BLOCK_M, BLOCK_N])
        return gl.convert_layout(p8, p_layout, assert_trivial=True)

    # Lq, Lk and T are not specialized: Triton compiles a separate kernel for an integer argument equal to 1, and
    # the Lk == 1 one (a single key tile whose masked columns are known at compile time, so P is partly constant-
    # folded) wrote NaN into random rows, different from run to run, on an H200 (2026-11-27; the generic kernel
    # and the Triton kernel are exact there). A GPU test covers Lk = 1.
    @gluon.jit(do_not_specialize=["Lq", "Lk", "T"])
    def _sage_attn_fwd_gluon(
        q_desc, k_desc, v_desc, m_desc, p_desc,
        QS, KS, VS, LUT, O, QRAW, LIN_Z, LIN_B,
        stride_ob, stride_oh, stride_ol, stride_rb, stride_rh, stride_rl,
        H, Lq, Lk, LQP, LKP, NQS, NKS, T, MQ_LUT,
        BLKQ: gl.constexpr, BLKK: gl.constexpr, SPARSE: gl.constexpr, LINEAR: gl.constexpr,
        NUM_STAGES: gl.constexpr, M_IN_STAGES: gl.constexpr, PHI_PRE: gl.constexpr, TILES: gl.constexpr,
        num_warps: gl.constexpr, INT_MAX: gl.constexpr = False, L_PARTIAL: gl.constexpr = False,
    ):
        """One program: 64 query rows of one (batch, head) against all key tiles (dense) or the LUT's (sparse)."""
        BM: gl.constexpr = q_desc.block_type.shape[0]
        HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
        BN: gl.constexpr = k_desc.block_type.shape[0]
        gl.static_assert(BM == 16 * num_warps and (BM == 64 or BM == 128),
                         "one warpgroup per 64 query rows (two share the K/V tiles at 128 rows)")
        gl.static_assert(not SPARSE or BM <= BLKQ, "a sparse program covers one LUT row")
        ROW_SCALES: gl.constexpr = BM > BLKQ  # the tile spans several Q blocks: one scale per row
        gl.static_assert(BLKK % BN == 0, "key tiles must sit inside one K quantization block")
        gl.static_assert(not (LINEAR and M_IN_STAGES) or NUM_STAGES * BN >= 2 * HEAD_DIM,
                         "M (bf16 DxD) must fit K's stages")
        gl.static_assert(not PHI_PRE or (LINEAR and M_IN_STAGES and (NUM_STAGES - 1) * BN >= 2 * HEAD_DIM
                                         and BN * HEAD_DIM >= 2 * BM * HEAD_DIM),
                         "φ(q)/den goes to K's last stage, M to the ones before it")

        pid_m = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // H
        h = bh % H

        s_layout: gl.constexpr = wgmma_acc_layout(num_warps, BN, 32)
        o_layout: gl.constexpr = wgmma_acc_layout(num_warps, HEAD_DIM, 32)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        lin_layout: gl.constexpr = wgmma_acc_layout(num_warps, HEAD_DIM, 16)  # φ·M, bf16
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_o: gl.constexpr = gl.SliceLayout(0, o_layout)

        q_s = gl.allocate_shared_memory(q_desc.dtype, [BM, HEAD_DIM], q_desc.layout)
        k_s = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES, BN, HEAD_DIM], k_desc.layout)
        v_s = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES, HEAD_DIM, BN], v_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        aux = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # Q, linear-branch M
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=1)
        mbarrier.init(aux.index(0), count=1)
        mbarrier.init(aux.index(1), count=1)
        fence_async_shared()

        if SPARSE:
            n_tiles = T * (BLKK // BN)
        else:
            n_tiles = gl.cdiv(Lk, BN)
        lut_base = LUT + (bh * MQ_LUT + (pid_m * BM) // BLKQ) * T
        ks_row = KS + bh * NKS
        k_row0 = bh * LKP
        v_row0 = bh * HEAD_DIM

        mbarrier.expect(aux.index(0), q_desc.block_type.nbytes)
        tma_load(q_desc, [bh * LQP + pid_m * BM, 0], aux.index(0), q_s)

        # TILES > 1: every tile's first key (sparse) and K scale go to a shared-memory table up front, and the loop
        # reads them from there. Loaded from global memory inside the loop, each waited ~1 µs on L2 latency (ptxas
        # moves a loaded scalar to a uniform register right after its load; Nsight Compute: ~6% of the warps'
        # samples), mostly hidden under the scores' wgmma: sparse programs gain ~2%, dense ones lost 1%, so the
        # wrapper builds the table for sparse calls only (docs/kernels-attention.md).
        one: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        tab_smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        ST_ROWS: gl.constexpr = TILES if SPARSE else 1  # dense first keys are computed, not stored
        st_flat = gl.allocate_shared_memory(gl.int32, [ST_ROWS], tab_smem)
        ks_flat = gl.allocate_shared_memory(gl.float32, [TILES], tab_smem)
        st_s = reinterpret(st_flat, gl.int32, [ST_ROWS, 1], tab_smem)  # rows read one at a time with .index(j)
        ks_s = reinterpret(ks_flat, gl.float32, [TILES, 1], tab_smem)
        if TILES > 1:
            jv = gl.arange(0, TILES, layout=one)
            if SPARSE:
                sv = _tile_start(lut_base, jv, n_tiles, SPARSE, BLKK, BN)
                st_flat.store(sv)
                thread_barrier()
            else:
                sv = jv * BN
        for i in gl.static_range(NUM_STAGES - 1):  # the loop's first iteration fills the last stage
            _load_kv(k_desc, v_desc, k_s, v_s, ready, i,
                     _start_at(st_s, lut_base, i, n_tiles, SPARSE, BLKK, BN, TILES, one),
                     k_row0, v_row0, i < n_tiles, NUM_STAGES)
        if TILES > 1:  # the K scales' gather overlaps the first copies
            ks_flat.store(gl.load(ks_row + sv // BLKK, mask=jv < n_tiles, other=1.0))
            thread_barrier()
        if LINEAR:
            if M_IN_STAGES:  # loaded after the loop into K's (then idle) stages: no extra shared memory
                m_s = reinterpret(k_s, m_desc.dtype, [HEAD_DIM, HEAD_DIM], m_desc.layout)
                if PHI_PRE:  # the quantizer's φ(q)/den tile, in K's last stage
                    phi_s = reinterpret(k_s.index(NUM_STAGES - 1), p_desc.dtype, [BM, HEAD_DIM], p_desc.layout)
            else:
                m_s = gl.allocate_shared_memory(m_desc.dtype, [HEAD_DIM, HEAD_DIM], m_desc.layout)
                mbarrier.expect(aux.index(1), m_desc.block_type.nbytes)
                tma_load(m_desc, [bh * HEAD_DIM, 0], aux.index(1), m_s)

        if ROW_SCALES:
            qs = gl.load(QS + bh * NQS + (pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout))) // BLKQ,
                         mask=pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout)) < NQS * BLKQ,
                         other=1.0)
        else:
            qs = gl.load(QS + bh * NQS + (pid_m * BM) // BLKQ)  # one scale: the tile sits inside one Q block
        s_init = gl.zeros([BM, BN], gl.int32, s_layout)
        o_init = gl.zeros([BM, HEAD_DIM], gl.float32, o_layout)
        acc = gl.zeros([BM, HEAD_DIM], gl.float32, o_layout)
        m_i = gl.full([BM], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))
        l_i = _row_sums_start(BM, BN, s_layout, L_PARTIAL)

        # Scalars carried one iteration ahead: start/scale of the current and next tile, start of the next copy.
        cur_start = _start_at(st_s, lut_base, 0, n_tiles, SPARSE, BLKK, BN, TILES, one)
        cur_c = qs * _kscale_at(ks_s, ks_row, 0, cur_start, BLKK, TILES, one)
        nxt_start = _start_at(st_s, lut_base, 1, n_tiles, SPARSE, BLKK, BN, TILES, one)
        fill_start = _start_at(st_s, lut_base, NUM_STAGES - 1, n_tiles, SPARSE, BLKK, BN, TILES, one)

        mbarrier.wait(aux.index(0), 0)
        s_tok = _issue_scores(q_s, k_s, ready, 0, s_init, NUM_STAGES)
        s_cur = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
        # One tile at a time, every wgmma waited at once: no accumulator in flight across the softmax, which leaves
        # room for 128-key tiles; the two programs on an SM interleave their phases instead.
        for j in range(n_tiles):
            if PHI_PRE:
                if j == n_tiles - 1:  # K's stages are free once the last scores are in: fetch M and φ/den now
                    fence_async_shared()
                    mbarrier.expect(aux.index(1), m_desc.block_type.nbytes + p_desc.block_type.nbytes)
                    tma_load(p_desc, [bh * LQP + pid_m * BM, 0], aux.index(1), phi_s)
                    tma_load(m_desc, [bh * HEAD_DIM, 0], aux.index(1), m_s)
            p, alpha, m_i, l_i = _softmax_tile(s_cur, m_i, l_i, cur_c, cur_start, Lk, BN, s_layout, ROW_SCALES, True,
                                               INT_MAX, L_PARTIAL=L_PARTIAL)
            pv = warpgroup_mma(_as_pv_operand(p, BM, BN, p_layout), v_s.index(j % NUM_STAGES).permute((1, 0)),
                               o_init, use_acc=False, max_num_imprecise_acc=BN)
            acc = gl.fma(acc, gl.expand_dims(gl.convert_layout(alpha, row_o), 1), pv)
            _load_kv(k_desc, v_desc, k_s, v_s, ready, j + NUM_STAGES - 1, fill_start, k_row0, v_row0,
                     j + NUM_STAGES - 1 < n_tiles, NUM_STAGES)
            fill_start = _start_at(st_s, lut_base, j + NUM_STAGES, n_tiles, SPARSE, BLKK, BN, TILES, one)
            if j + 1 < n_tiles:
                s_tok = _issue_scores(q_s, k_s, ready, j + 1, s_init, NUM_STAGES)
                cur_c = qs * _kscale_at(ks_s, ks_row, j + 1, nxt_start, BLKK, TILES, one)
                cur_start = nxt_start
                nxt_start = _start_at(st_s, lut_base, j + 2, n_tiles, SPARSE, BLKK, BN, TILES, one)
                s_cur = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
        l_i = _row_sums_end(l_i, s_layout, L_PARTIAL)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(ready.index(i))
        if LINEAR and M_IN_STAGES and not PHI_PRE:  # every wgmma that read K is done (waited above)
            fence_async_shared()
            mbarrier.expect(aux.index(1), m_desc.block_type.nbytes)
            tma_load(m_desc, [bh * HEAD_DIM, 0], aux.index(1), m_s)

        offs_d = gl.arange(0, HEAD_DIM, layout=col_o)
        inv_l = 1.0 / gl.convert_layout(l_i, row_o)
        o = acc * gl.expand_dims(inv_l, 1) * gl.expand_dims(gl.load(VS + bh * HEAD_DIM + offs_d), 0)
        offs_m = pid_m * BM + gl.arange(0, BM, layout=row_o)
        row_ok = gl.expand_dims(offs_m < Lq, 1)
        if LINEAR and PHI_PRE:
            # o += (φ(q)/den)·M + bias with φ(q)/den from the Q quantizer (both operands by TMA: no exp, reduction
            # or register shuffle here)
            mbarrier.wait(aux.index(1), 0)
            lin = warpgroup_mma(phi_s, m_s, gl.zeros([BM, HEAD_DIM], gl.float32, lin_layout), use_acc=False)
            o = o + gl.convert_layout(lin, o_layout) + gl.expand_dims(gl.load(LIN_B + offs_d), 0)
        elif LINEAR:
            # o += (φ(q)·M) / (φ(q)·z + 1e-5) + bias, φ = softmax over head_dim of the raw (bf16) query
            r = gl.load(QRAW + b * stride_rb + h * stride_rh + gl.expand_dims(offs_m, 1) * stride_rl
                        + gl.expand_dims(offs_d, 0), mask=row_ok, other=0.0).to(gl.float32)
            e = gl.exp2((r - gl.expand_dims(gl.max(r, axis=1), 1)) * 1.4426950408889634)
            phi = e / gl.expand_dims(gl.sum(e, axis=1), 1)
            den = gl.sum(phi * gl.expand_dims(gl.load(LIN_Z + bh * HEAD_DIM + offs_d), 0), axis=1) + 1e-5
            phi_op = gl.convert_layout(phi.to(gl.bfloat16), gl.DotOperandLayout(operand_index=0, parent=lin_layout,
                                                                                 k_width=2))
            mbarrier.wait(aux.index(1), 0)
            lin = warpgroup_mma(phi_op, m_s, gl.zeros([BM, HEAD_DIM], gl.float32, lin_layout), use_acc=False)
            lin = gl.convert_layout(lin, o_layout)
            o = o + lin / gl.expand_dims(den, 1) + gl.expand_dims(gl.load(LIN_B + offs_d), 0)
        mbarrier.invalidate(aux.index(0))
        mbarrier.invalidate(aux.index(1))

        _store_rows(o, O, b, h, pid_m * BM, Lq, stride_ob, stride_oh, stride_ol, num_warps)


#: Off for the rest of the process once a first launch fails (an incompatible Triton); see :mod:`.gluon_guard`.
GUARD = GluonGuard("attention", "set TURBOCOMPILE_SAGE_KERNEL=triton to skip the attempt")


def available() -> bool:
    """True when the kernel can run here: Gluon's Hopper API imports, the GPU is sm_90, not the CPU interpreter."""
    return on_hopper()


def supported(q: torch.Tensor, blk_q: int, blk_k: int) -> str | None:
    """None if this kernel takes the call, else why not (the caller then runs the Triton kernel)."""
    if GUARD.disabled is not None:
        return f"switched off after its first launch failed ({GUARD.disabled})"
    if not available():
        return "Gluon's Hopper kernel needs an sm_90 GPU"
    if not q.is_cuda:
        return f"tensors are on {q.device.type}"
    if q.shape[-1] not in (64, 128):
        return f"head_dim {q.shape[-1]} is not 64 or 128"
    if blk_q not in (64, 128) or blk_k not in (64, 128):
        return f"blocks {blk_q}x{blk_k} are not 64/128"
    return None


def _phi_fits(block_n: int, head_dim: int, num_stages: int = NUM_STAGES) -> bool:
    """Whether M [D, D] and a φ/den tile [64, D] (bf16) fit K's idle stages after the loop: M in all but the last
    stage, φ/den in the last."""
    return (num_stages - 1) * block_n >= 2 * head_dim and block_n >= 128


def uses_lin_phi(blk_k: int, head_dim: int) -> bool:
    """Whether the kernel's default tiles take the SLA linear branch's φ(q)/den from the Q quantizer
    (``sage_quantize_triton(..., linear_z=)``) for this K block; otherwise it computes φ from the raw query and
    that pass would be wasted."""
    return _phi_fits(BLOCK_N if blk_k % BLOCK_N == 0 else 64, head_dim)


#: Largest per-program tile table (first key and K scale of every key tile) kept in shared memory: 4 KiB next to
#: the ~106 KiB of stages, so two programs still share an SM.
MAX_TABLE_BYTES = 4096


def preload_tiles(n_tiles: int, sparse: bool) -> int:
    """Rows of the shared-memory tile table for a program of ``n_tiles`` key tiles (a power of two), or 1 (no
    table: the loop loads each tile's first key and scale from global memory) when it would not fit
    :data:`MAX_TABLE_BYTES` (sparse tables hold 8 bytes a tile, dense ones 4: their first keys are computed)."""
    rows = 1 << max(int(n_tiles) - 1, 1).bit_length()
    return rows if rows * (8 if sparse else 4) <= MAX_TABLE_BYTES else 1


def sage_attention_gluon(quant: dict, lq: int, lk: int, out: torch.Tensor, lut: torch.Tensor | None,
                         blk_q: int, blk_k: int, q_raw: torch.Tensor | None = None, linear: tuple | None = None,
                         num_stages: int = NUM_STAGES, block_n: int | None = None, block_m: int = BLOCK_M,
                         m_in_stages: bool = M_IN_STAGES, lin_phi: torch.Tensor | None = None,
                         preload: bool | None = None) -> torch.Tensor:
    """Launch the kernel on a :func:`~.sage_attention.sage_quantize_triton` result whose Vᵀ is in wgmma key order.

    ``out`` (B, H, Lq, D) is written in place; ``lut`` [B, H, Mq, T] int32 selects key blocks (None = dense);
    ``linear`` = (M [B·H, D, D] bf16, z [B·H, D] fp32, bias [D] fp32) with the raw query ``q_raw`` adds the SLA
    linear branch. ``lin_phi`` [B, H, Lq_pad, D] bf16, ``φ(q)/(φ(q)·z + 1e-5)`` from the Q quantizer
    (``sage_quantize_triton(..., linear_z=z)``), spares the epilogue computing it from ``q_raw``. ``preload``
    puts every tile's first key and K scale in shared memory before the loop (:func:`preload_tiles`); by default
    only for block-sparse calls, where it was measured faster (dense lost 1%: docs/kernels-attention.md)."""
    if not quant.get("v_wgmma_order"):
        raise UnsupportedShapeError("the Gluon attention kernel needs V quantized in wgmma key order "
                                    "(sage_quantize_triton(..., v_order='wgmma'))")
    qa, ka, va = quant["q"], quant["k"], quant["v"]
    b, h, lqp, d = qa.shape
    lkp = ka.shape[2]
    q2, k2, v2 = qa.view(b * h * lqp, d), ka.view(b * h * lkp, d), va.view(b * h * d, lkp)
    lay = gl.NVMMASharedLayout.get_default_for
    if block_m not in (64, 128) or (lut is not None and block_m > blk_q):
        raise UnsupportedShapeError(f"query tile {block_m} must be 64 or 128 (and one LUT row, {blk_q}, if sparse)")
    q_desc = TensorDescriptor.from_tensor(q2, [block_m, d], lay([block_m, d], gl.int8))
    block_n = block_n or (BLOCK_N if blk_k % BLOCK_N == 0 else 64)
    if block_n not in (64, 128) or blk_k % block_n:
        raise UnsupportedShapeError(f"key tile {block_n} must be 64 or 128 and divide the K block {blk_k}")
    m_in_stages = m_in_stages and num_stages * block_n >= 2 * d  # else M gets its own buffer
    k_desc = TensorDescriptor.from_tensor(k2, [block_n, d], lay([block_n, d], gl.int8))
    v_desc = TensorDescriptor.from_tensor(v2, [d, block_n], lay([d, block_n], gl.float8e4nv))
    # φ/den and M must fit K's stages (else the epilogue computes φ from q_raw)
    phi_pre = (linear is not None and lin_phi is not None and m_in_stages and block_m == 64
               and _phi_fits(block_n, d, num_stages))
    p_desc = None
    if linear is not None:
        lin_m, lin_z, lin_b = linear
        m_desc = TensorDescriptor.from_tensor(lin_m.reshape(b * h * d, d), [d, d], lay([d, d], gl.bfloat16))
        if phi_pre:
            p_desc = TensorDescriptor.from_tensor(lin_phi.view(b * h * lqp, d), [block_m, d],
                                                  lay([block_m, d], gl.bfloat16))
        qr = q_raw
    else:
        lin_z = lin_b = quant["v_scale"]  # unused
        m_desc = q_desc
        qr = out
    lut_t = lut if lut is not None else quant["q_scale"]
    t = lut.shape[-1] if lut is not None else 0
    mq_lut = lut.shape[2] if lut is not None else 0
    n_tiles = t * (blk_k // block_n) if lut is not None else -(-lk // block_n)
    if preload is None:
        preload = PRELOAD_SPARSE and lut is not None
    tiles = preload_tiles(n_tiles, lut is not None) if preload else 1
    grid = (-(-lq // block_m), b * h)
    _sage_attn_fwd_gluon[grid](
        q_desc, k_desc, v_desc, m_desc, p_desc or m_desc,
        quant["q_scale"], quant["k_scale"], quant["v_scale"], lut_t, out, qr, lin_z, lin_b,
        out.stride(0), out.stride(1), out.stride(2), qr.stride(0), qr.stride(1), qr.stride(2),
        h, lq, lk, lqp, lkp, quant["q_scale"].shape[-1], quant["k_scale"].shape[-1], t, mq_lut,
        BLKQ=blk_q, BLKK=blk_k, SPARSE=lut is not None, LINEAR=linear is not None, NUM_STAGES=num_stages,
        M_IN_STAGES=m_in_stages, PHI_PRE=phi_pre, TILES=tiles, num_warps=block_m // 16, INT_MAX=INT_MAX,
        L_PARTIAL=L_PARTIAL)
    GUARD.succeeded()
    return out


def compile_for_sm90(sparse: bool = True, linear: bool = True, head_dim: int = 128, num_stages: int = NUM_STAGES,
                     block_n: int = BLOCK_N, block_m: int = BLOCK_M, phi_pre: bool = False, tiles: int = 32,
                     int_max: bool | None = None, l_partial: bool | None = None):
    """The kernel compiled for sm_90a without a GPU (:func:`.gluon_hopper.compile_for_sm90a`)."""
    lay = gl.NVMMASharedLayout.get_default_for
    d, bn = head_dim, block_n
    q_desc = f"tensordesc<i8[{block_m}, {d}],{lay([block_m, d], gl.int8)!r}>"
    ptrs = {"QS": "*fp32", "KS": "*fp32", "VS": "*fp32", "LUT": "*i32", "O": "*bf16", "QRAW": "*bf16",
            "LIN_Z": "*fp32", "LIN_B": "*fp32"}
    sig = {"q_desc": q_desc, "k_desc": f"tensordesc<i8[{bn}, {d}],{lay([bn, d], gl.int8)!r}>",
           "v_desc": f"tensordesc<fp8e4nv[{d}, {bn}],{lay([d, bn], gl.float8e4nv)!r}>",
           "m_desc": f"tensordesc<bf16[{d}, {d}],{lay([d, d], gl.bfloat16)!r}>" if linear else q_desc,
           "p_desc": f"tensordesc<bf16[{block_m}, {d}],{lay([block_m, d], gl.bfloat16)!r}>" if phi_pre else q_desc,
           **ptrs}
    consts = {"BLKQ": 64, "BLKK": 128, "SPARSE": sparse, "LINEAR": linear, "NUM_STAGES": num_stages,
              "M_IN_STAGES": M_IN_STAGES and num_stages * bn >= 2 * d, "PHI_PRE": phi_pre, "TILES": tiles,
              "num_warps": block_m // 16, "INT_MAX": INT_MAX if int_max is None else int_max,
              "L_PARTIAL": L_PARTIAL if l_partial is None else l_partial}
    return compile_for_sm90a(_sage_attn_fwd_gluon, sig, consts,
                             [*ptrs, "stride_ob", "stride_oh", "stride_ol", "stride_rb", "stride_rh", "stride_rl"])


#: Variants the benchmark sweeps (keyword arguments of :func:`sage_attention_gluon`); the first is the default. The
#: measured table is in docs/kernels-attention.md (with the variants measured slower and removed).
BENCH_VARIANTS = [{}, {"preload": True}, {"preload": False}, {"block_m": 128}, {"num_stages": 2},
                  {"linear_off": True}, {"phi_pre": True}, {"phi_pre": True, "preload": False}]


def bench_main(argv: list[str] | None = None) -> None:  # pragma: no cover - needs a Hopper GPU
    """Time the kernel alone (dense and block-sparse with the linear branch) in each variant against the Triton
    kernel on the same quantized inputs; check each against the Triton result."""
    import argparse
    import json

    from .block_map import lut_from_pooled
    from .sage_attention import bench_meta, bench_ms, block_attention_triton, sage_quantize_triton

    ap = argparse.ArgumentParser(description="Gluon Sage attention kernel variants vs the Triton kernel")
    ap.add_argument("--shapes", default="1.3B@480p,14B@720p")
    ap.add_argument("--modes", default="dense,sparse0.1")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--variants", default="",
                    help="comma-separated indices into BENCH_VARIANTS to time (default: all; 0 is the default config)")
    ap.add_argument("--wave-sweep", default="",
                    help="comma-separated query-tile counts: time the sparse kernel on the first shape with only that "
                         "many 64-row query tiles per head (what the last partial wave costs)")
    ap.add_argument("--topk-sweep", default="",
                    help="comma-separated top-k fractions: time the sparse kernel on the first shape at each, with and "
                         "without the linear epilogue (the per-program fixed cost is the intercept over key tiles)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    meta = bench_meta()
    print(meta, flush=True)
    variants = [BENCH_VARIANTS[int(i)] for i in args.variants.split(",")] if args.variants else BENCH_VARIANTS
    rows = []
    if args.wave_sweep or args.topk_sweep:
        shape = args.shapes.split(",")[0]
        if args.wave_sweep:
            rows += _wave_sweep(shape, [int(x) for x in args.wave_sweep.split(",")], dev)
        if args.topk_sweep:
            rows += _topk_sweep(shape, [float(x) for x in args.topk_sweep.split(",")], dev)
        args.shapes = ""

    for shape in filter(None, args.shapes.split(",")):
        (b, h, n, d), q, k, v, lin, moments = _bench_inputs(shape, dev)
        flops = 4.0 * b * h * n * n * d
        for mode in args.modes.split(","):
            blks = (64, 128)
            qt = sage_quantize_triton(q, k, v, *blks, **moments)
            qg = sage_quantize_triton(q, k, v, *blks, **moments, v_order="wgmma")
            lut = lut_from_pooled(qt["q_pool"], qt["k_pool"], 0.1) if mode != "dense" else None
            li = lin if lut is not None else None
            ref = torch.empty_like(q)
            # Triton baseline: its best configs (dense 64x128 blocks, sparse the op's), same quantized inputs
            if lut is None:
                qt64 = sage_quantize_triton(q, k, v, 64, 128, **moments)
                fn_t = lambda: block_attention_triton(q, k, v, None, 64, 128, sage=True, quant=qt64,  # noqa: E731
                                                      out=ref)
            else:
                fn_t = lambda: block_attention_triton(q, k, v, lut, *blks, sage=True, linear=li,  # noqa: E731
                                                      quant=qt, out=ref)
            t_ms = bench_ms(fn_t)
            rows.append({"shape": shape, "mode": mode, "kernel": "triton", "ms": t_ms, "tops": flops / t_ms / 1e9})
            print(f"{shape:10} {mode:10} triton                        {t_ms:8.3f} ms", flush=True)
            for var in variants:
                kw = {k_: v_ for k_, v_ in var.items() if k_ not in ("linear_off", "phi_pre")}
                if (lut is not None and kw.get("block_m", 64) > blks[0]) or (lut is None and (
                        "linear_off" in var or "phi_pre" in var)):
                    continue
                if set(var) == {"preload"} and var["preload"] == (PRELOAD_SPARSE and lut is not None):
                    continue  # that is this mode's default row again
                # linear_off: what the fused linear epilogue costs; phi_pre: φ(q)/den from the Q quantizer (what
                # sage_sla runs), against the default computing it from the raw query
                lin_v = None if var.get("linear_off") else li
                if var.get("phi_pre"):
                    kw["lin_phi"] = sage_quantize_triton(q, k, v, *blks, **moments, v_order="wgmma",
                                                         linear_z=lin[1])["lin_phi"]
                name = ",".join(f"{k_}={v_}" for k_, v_ in var.items()) or "default"
                o = torch.full_like(q, float("nan"))
                fn = lambda: sage_attention_gluon(qg, n, n, o, lut, *blks, q_raw=q, linear=lin_v, **kw)  # noqa: E731
                try:
                    ms = bench_ms(fn)
                except Exception as exc:  # noqa: BLE001 - a variant that fails to compile or launch is reported
                    print(f"{shape:10} {mode:10} gluon {name}: failed {exc}", flush=True)
                    continue
                err = float((o.float() - ref.float()).norm() / ref.float().norm())
                rows.append({"shape": shape, "mode": mode, "kernel": "gluon", "variant": var, "ms": ms,
                             "tops": flops / ms / 1e9, "rel_l2_vs_triton": err, "nan": bool(o.isnan().any())})
                print(f"{shape:10} {mode:10} gluon {name:24} {ms:8.3f} ms  x{t_ms / ms:.3f} vs triton  relL2 {err:.4f}",
                      flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sage_attention_gluon_bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


def _bench_inputs(shape: str, dev):  # pragma: no cover - needs a Hopper GPU
    """The structured bench inputs at ``shape``, a random ``proj_l`` and the linear branch's statistics and moments:
    ((B, H, L, D), q, k, v, (M, z, bias), moments)."""
    from .sage_attention import ATTENTION_BENCH_SHAPES, structured_qkv
    from .sla import linear_branch_stats

    b, h, n, d = ATTENTION_BENCH_SHAPES[shape]
    q, k, v = structured_qkv(b, h, n, d, torch.bfloat16, dev, seed=1)
    w, bias = torch.randn(d, d, device=dev) * 0.05, torch.randn(d, device=dev) * 0.05
    lin, moments = linear_branch_stats(k, v, w, bias)
    return (b, h, n, d), q, k, v, lin, moments


def _sweep_inputs(shape: str, dev):  # pragma: no cover - needs a Hopper GPU
    """:func:`_bench_inputs` quantized for the sparse kernel (64x128 blocks, V in wgmma key order, φ/den)."""
    from .sage_attention import sage_quantize_triton

    dims, q, k, v, lin, moments = _bench_inputs(shape, dev)
    qt = sage_quantize_triton(q, k, v, 64, 128, **moments)
    qg = sage_quantize_triton(q, k, v, 64, 128, **moments, v_order="wgmma", linear_z=lin[1])
    return dims, q, lin, qt, qg


def _topk_sweep(shape: str, fractions: list[float], dev) -> list[dict]:  # pragma: no cover - needs a Hopper GPU
    """Sparse kernel time (CUDA-graph replay) per top-k fraction, with and without the linear epilogue: time per
    program against key tiles per program is a line whose intercept is what a program costs besides its tiles."""
    from .block_map import lut_from_pooled
    from .sage_attention import bench_ms_graph

    (b, h, n, d), q, lin, qt, qg = _sweep_inputs(shape, dev)
    slots = 2 * torch.cuda.get_device_properties(dev).multi_processor_count
    progs = -(-n // BLOCK_M) * b * h
    o = torch.empty_like(q)
    rows = []
    for frac in fractions:
        lut = lut_from_pooled(qt["q_pool"], qt["k_pool"], frac)
        for linear in (True, False):
            kw = dict(q_raw=q, linear=lin, lin_phi=qg["lin_phi"]) if linear else {}
            ms = bench_ms_graph(lambda: sage_attention_gluon(qg, n, n, o, lut, 64, 128, **kw))
            slot_us = 1e3 * ms * slots / progs
            rows.append({"shape": shape, "topk": frac, "key_tiles": lut.shape[-1], "linear": linear, "ms": ms,
                         "us_per_program_slot": slot_us})
            print(f"{shape} topk {frac:5.3f} {lut.shape[-1]:4d} key tiles linear={linear!s:5} {ms:8.4f} ms "
                  f"{slot_us:7.3f} us per program per slot", flush=True)
    return rows


def _wave_sweep(shape: str, tiles: list[int], dev) -> list[dict]:  # pragma: no cover - needs a Hopper GPU
    """Sparse top-k 0.1 kernel time (CUDA-graph replay) with the grid cut to ``tiles`` query tiles per head: the
    slope is one program's share of an SM, the step at a wave boundary is what a partial last wave costs."""
    from .block_map import lut_from_pooled
    from .sage_attention import bench_ms_graph

    (b, h, n, d), q, lin, qt, qg = _sweep_inputs(shape, dev)
    lut = lut_from_pooled(qt["q_pool"], qt["k_pool"], 0.1)
    slots = 2 * torch.cuda.get_device_properties(dev).multi_processor_count
    o = torch.empty_like(q)
    rows = []
    for t in tiles:
        lq = min(n, t * BLOCK_M)
        ms = bench_ms_graph(lambda: sage_attention_gluon(qg, lq, n, o, lut, 64, 128, q_raw=q, linear=lin,
                                                         lin_phi=qg["lin_phi"]))
        progs = -(-lq // BLOCK_M) * b * h
        rows.append({"shape": shape, "query_tiles": t, "programs": progs, "waves": progs / slots, "ms": ms,
                     "us_per_program": 1e3 * ms / progs})
        print(f"{shape} {t:5d} tiles/head {progs:6d} programs {progs / slots:7.3f} waves {ms:8.4f} ms "
              f"{1e3 * ms / progs:7.4f} us/program", flush=True)
    return rows


if __name__ == "__main__":  # pragma: no cover
    bench_main()
