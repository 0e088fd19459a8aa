"""Sage attention in FA3's layout for Hopper: a producer warp and two ping-ponging consumer warpgroups per program.

The Gluon kernel (:mod:`.sage_attention_gluon`) runs one 64-row warpgroup per program, two programs per SM, each
issuing its own K/V copies; its loop is latency-bound with two warps per scheduler (docs/kernels-attention.md). Here
one program holds 128 query rows: two consumer partitions of 64 rows (the same arithmetic: int8 scores, online
softmax, FP8 P·V into a fresh accumulator, fold) and a one-warp producer partition that issues every TMA copy
(``gl.warp_specialize``; ``setmaxnreg`` gives the consumers 240 registers, the producer 24). With ``pipeline=2``
(FA3's ping-pong) the consumers take turns on the tensor cores through a pair of mbarriers: a turn issues the next
tile's scores and this tile's P·V together, so one consumer's softmax runs under the other's wgmmas;
``pipeline=3`` (the default) also peels the last trip, so the loop's softmax skips the mask check and takes the
row maximum on the int32 scores (3-input ``VIMNMX3``, two chains per row: a shorter critical path). Per row the
arithmetic and its order are the Gluon kernel's, so the outputs are the same bits (GPU tests), except the rows of
a split last wave (below).

* **Dense** (``sage_attention_ws``, one K/V ring both consumers read): measured 9-12% faster than the Gluon kernel
  on an H200 (2026-11-27, 18:24-19:05 UTC), so dense Sage attention calls take it (:func:`dense_ws`,
  :data:`DENSE_OPS`); with the per-thread partial row sums (``sage_attention_gluon.L_PARTIAL``) 1.534x cuDNN through
  the op at 1.3B@480p and 1.555-1.558x at 14B@720p (22:58-22:59 UTC). The grid's last partial
  wave of row blocks runs as key-range parts merged by ``_merge_splits_kernel`` (:func:`tail_splits`).
* **Block-sparse** (``sage_sla_ws``, SLA's linear branch from the quantizer's φ(q)/den; an item is two adjacent
  LUT rows, one per consumer): persistent (one program per SM over all items) with one K/V ring for both
  consumers, where a key block that both rows name at the same position is copied once; :mod:`.lut_pairing`
  moves the blocks two rows share to the same positions (75% of them on the benchmark's inputs). On an H200
  (2026-11-27, 20:37-20:42 UTC) 0.877 ms against the Gluon kernel's 0.898 at 1.3B@480p top-k 0.1 (15.17 / 15.41
  ms at 14B@720p); through ``sage_sla`` 1.145 against 1.167 ms, so block-sparse calls take it
  (:func:`sparse_ws`, :data:`SPARSE_OPS`). Bit-equal to the Gluon kernel on the same LUT. Two earlier forms, a
  ring per consumer with a program per item or persistent, were 1-3% slower than the Gluon kernel and were
  removed (commit e61e9fb has them; docs/kernels-attention.md).

``python -m turbocompile.kernels.sage_attention_ws [--sparse-only | --dense-only] [--variants 3:4,3:4:0]
[--sparse-stages 5,6]`` times them against the Gluon kernel and cuDNN (dense variants:
pipeline:stages[:split_tail[:l_partial]]; sparse: on the LUT as the block map sorts it and paired, the paired one
at each ring depth given).
"""
from __future__ import annotations

import os
import sys

import torch

from turbocompile.errors import UnsupportedShapeError

from . import sage_attention_gluon as _G
from .gluon_guard import GluonGuard
from .gluon_hopper import (
    TensorDescriptor,
    compile_for_sm90a,
    fence_async_shared,
    gl,
    gluon,
    mbarrier,
    tma_load,
    warpgroup_mma,
    warpgroup_mma_wait,
)

BLOCK_M = 64  # query rows per consumer (two consumers: 128 rows per program)
BLOCK_N = 128
NUM_STAGES = 4  # K/V stages of the dense ring (32 KiB each at head_dim 128; one program per SM): 4 measured best
#: with PIPELINE 3 (3 with PIPELINE 2)
PIPELINE = 3  # 0: each consumer alone; 2: ping-pong; 3: ping-pong with the last trip peeled and the row maximum on
#: the int32 scores (measured fastest, the default: docs/kernels-attention.md, "The softmax's critical path"). 1, an
#: intra-warpgroup overlap of the next scores with this softmax, measured no gain and was removed (commit cf40779)
DENSE_OPS = True  # dense Sage attention calls take this kernel where it can (dense_ws); False: the Gluon kernel
SPARSE_OPS = True  # block-sparse calls take the one-ring sparse kernel where it can (sparse_ws), on a paired LUT
SPARSE_STAGES = 6  # stages of the sparse kernel's ring (192 KiB at head_dim 128)
SPLIT_TAIL = True  # PIPELINE 3: the grid's last partial wave of row blocks as key-range parts (tail_splits)
MAX_SPLITS = 4
SMS = None  # the SM count tail_splits plans for (None: the device's; tests set it to force splits)
CONSUMER_REGS = 240  # setmaxnreg of the consumer worker (the default partition gets the rest: 240 too)
PRODUCER_REGS = 24

if gluon is not None:
    import triton
    import triton.language as tl

    from .gluon_hopper import reinterpret
    from .sage_attention_gluon import (_as_pv_operand, _issue_scores, _row_sums_end, _row_sums_start,
                                           _softmax_tile, _store_rows, wgmma_acc_layout)

    @gluon.jit
    def _claim_stage(ready, empty, j, nbytes, NUM_STAGES: gl.constexpr):
        """Stage j % NUM_STAGES of a ring for entry j, once its consumers have released the entry it held before,
        its ``ready`` barrier set to expect ``nbytes`` of copies. Returns the stage."""
        s = j % NUM_STAGES
        if j >= NUM_STAGES:
            mbarrier.wait(empty.index(s), ((j // NUM_STAGES) - 1) & 1)
        mbarrier.expect(ready.index(s), nbytes)
        return s

    @gluon.jit
    def _fill_stage(k_desc, v_desc, k_s, v_s, ready, empty, j, start, k_row0, v_row0, NUM_STAGES: gl.constexpr):
        """Tile j (keys from ``start``) of K and Vᵀ into stage j % NUM_STAGES of a ring (:func:`_claim_stage`)."""
        s = _claim_stage(ready, empty, j, k_desc.block_type.nbytes + v_desc.block_type.nbytes, NUM_STAGES)
        tma_load(k_desc, [k_row0 + start, 0], ready.index(s), k_s.index(s))
        tma_load(v_desc, [v_row0, start], ready.index(s), v_s.index(s))

    @gluon.jit
    def _ws_producer(k_desc, v_desc, k_s, v_s, ready, empty, t0, n_tiles, k_row0, v_row0, NUM_STAGES: gl.constexpr):
        """Fill the ring: key tile t0 + j's K and Vᵀ into stage j % NUM_STAGES once both consumers released it."""
        BN: gl.constexpr = k_desc.block_type.shape[0]
        for j in range(n_tiles):
            _fill_stage(k_desc, v_desc, k_s, v_s, ready, empty, j, (t0 + j) * BN, k_row0, v_row0, NUM_STAGES)

    @gluon.jit
    def _consumer_start(q_desc, q_s, q_bar, q_row, QS, bh, NQS, row0, BLKQ: gl.constexpr, s_layout: gl.constexpr,
                        o_layout: gl.constexpr, L_PARTIAL: gl.constexpr):
        """A consumer's start: the TMA copy of its 64 query rows from ``row0`` issued (``q_bar``), their Q block
        scale (rows past Lq take the last block's: their output is masked out), the zero wgmma accumulators and
        the online-softmax state."""
        BM: gl.constexpr = q_desc.block_type.shape[0]
        HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
        BN: gl.constexpr = s_layout.instr_shape[1]
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma_load(q_desc, [q_row, 0], q_bar, q_s)
        qs = gl.load(QS + bh * NQS + gl.minimum(row0 // BLKQ, NQS - 1))
        s_init = gl.zeros([BM, BN], gl.int32, s_layout)
        o_init = gl.zeros([BM, HEAD_DIM], gl.float32, o_layout)
        acc = gl.zeros([BM, HEAD_DIM], gl.float32, o_layout)
        m_i = gl.full([BM], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))
        l_i = _row_sums_start(BM, BN, s_layout, L_PARTIAL)
        return qs, s_init, o_init, acc, m_i, l_i

    @gluon.jit
    def _normalized(acc, l_i, VS, bh, o_layout: gl.constexpr):
        """The consumer's output before any epilogue term: ``acc / l`` times V's per-channel scale."""
        HEAD_DIM: gl.constexpr = acc.shape[1]
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        inv_l = 1.0 / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        return acc * gl.expand_dims(inv_l, 1) * gl.expand_dims(gl.load(VS + bh * HEAD_DIM + offs_d), 0)

    @gluon.jit
    def _pingpong_turn(q_s, k_next, v_cur, p, s_init, o_init, ready_bar, ready_phase, turn_me, turn_phase, turn_other,
                       empty_bar, p_layout: gl.constexpr, twice=False, TWICE: gl.constexpr = False):
        """One turn on the tensor cores: wait for the next K tile and for this consumer's turn, issue the next
        scores and this tile's P·V together, hand the turn over, wait for both and release this tile's stage
        (TWICE: a second arrival where ``twice``, for a stage of a two-consumer ring that only this consumer read).
        Returns the next scores and this tile's P·V (to fold into the output with :func:`_fold`)."""
        BM: gl.constexpr = s_init.shape[0]
        BN: gl.constexpr = s_init.shape[1]
        mbarrier.wait(ready_bar, ready_phase)
        mbarrier.wait(turn_me, turn_phase)
        tok = warpgroup_mma(q_s, k_next.permute((1, 0)), s_init, use_acc=False, is_async=True)
        tok_pv = warpgroup_mma(_as_pv_operand(p, BM, BN, p_layout), v_cur.permute((1, 0)), o_init, use_acc=False,
                               max_num_imprecise_acc=BN, is_async=True)
        mbarrier.arrive(turn_other)
        s_next, pv = warpgroup_mma_wait(num_outstanding=0, deps=[tok, tok_pv])
        mbarrier.arrive(empty_bar)
        if TWICE:
            mbarrier.arrive(empty_bar, pred=twice)
        return s_next, pv

    @gluon.jit
    def _pingpong_last_turn(v_cur, p, o_init, turn_me, turn_phase, turn_other, p_layout: gl.constexpr):
        """The last tile's turn: its P·V alone (there are no next scores to issue). Returns the P·V."""
        BM: gl.constexpr = p.shape[0]
        BN: gl.constexpr = p.shape[1]
        mbarrier.wait(turn_me, turn_phase)
        tok_pv = warpgroup_mma(_as_pv_operand(p, BM, BN, p_layout), v_cur.permute((1, 0)), o_init, use_acc=False,
                               max_num_imprecise_acc=BN, is_async=True)
        mbarrier.arrive(turn_other)
        return warpgroup_mma_wait(num_outstanding=0, deps=[tok_pv])

    @gluon.jit
    def _fold(acc, alpha, pv, row_o: gl.constexpr):
        """The two-level FP8 accumulation's outer step: ``acc·alpha + pv`` in fp32."""
        return gl.fma(acc, gl.expand_dims(gl.convert_layout(alpha, row_o), 1), pv)

    @gluon.jit
    def _ws_consumer(q_desc, q_s, q_bar, k_s, v_s, ready, empty, turn_me, turn_other, QS, KS, VS, O, bh, H, q_row,
                     row0, t0, n_tiles, Lq, Lk,
                     NQS, NKS, stride_ob, stride_oh, stride_ol, PART, PART_ML, part_row0, n_part_rows,
                     BLKQ: gl.constexpr, BLKK: gl.constexpr,
                     NUM_STAGES: gl.constexpr, NW: gl.constexpr, PIPELINE: gl.constexpr, SPLITS: gl.constexpr,
                     L_PARTIAL: gl.constexpr):
        """64 query rows from ``row0`` of head ``bh`` against the ring's key tiles t0 .. t0 + n_tiles - 1 (all of
        them unless the program is one of SPLITS parts of a row block, PIPELINE 3 only: it then writes its
        unnormalised output, running maximum and row sum to PART / PART_ML rows ``part_row0`` .. +64 for
        :func:`_merge_splits_kernel`).

        PIPELINE 2 (FA3's ping-pong; 3 the same with the last trip peeled; 0 is the plain loop, each consumer on
        its own): a trip
        issues the next scores and this tile's P·V together, on this consumer's turn (``turn_me``, then it hands
        the turn over on ``turn_other``), waits, folds, and does the next tile's softmax while the other consumer
        has the tensor cores. The arithmetic and its order are unchanged either way, so the output is the same
        bits."""
        BM: gl.constexpr = q_desc.block_type.shape[0]
        HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
        BN: gl.constexpr = k_s.shape[1]
        s_layout: gl.constexpr = wgmma_acc_layout(NW, BN, 32)
        o_layout: gl.constexpr = wgmma_acc_layout(NW, HEAD_DIM, 32)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        qs, s_init, o_init, acc, m_i, l_i = _consumer_start(q_desc, q_s, q_bar, q_row, QS, bh, NQS, row0, BLKQ,
                                                            s_layout, o_layout, L_PARTIAL)
        mbarrier.wait(q_bar, 0)
        if PIPELINE == 2:
            s_cur = warpgroup_mma_wait(num_outstanding=0, deps=[_issue_scores(q_s, k_s, ready, 0, s_init, NUM_STAGES)])
            for j in range(n_tiles):
                s = j % NUM_STAGES
                c = qs * gl.load(KS + bh * NKS + (j * BN) // BLKK)
                p, alpha, m_i, l_i = _softmax_tile(s_cur, m_i, l_i, c, j * BN, Lk, BN, s_layout, L_PARTIAL=L_PARTIAL)
                jn = gl.minimum(j + 1, n_tiles - 1)  # the last trip's scores are recomputed and dropped
                sn = jn % NUM_STAGES
                s_cur, pv = _pingpong_turn(q_s, k_s.index(sn), v_s.index(s), p, s_init, o_init, ready.index(sn),
                                           (jn // NUM_STAGES) & 1, turn_me, j & 1, turn_other, empty.index(s),
                                           p_layout)
                acc = _fold(acc, alpha, pv, row_o)
        elif PIPELINE == 3:
            # the ping-pong with the last trip peeled: the loop's tiles are all below Lk, so their softmax needs no
            # mask check and takes the row maximum on the int32 scores in two chains (INT_MAX, SPLIT_MAX); the
            # next K scale is read under the wgmmas, and the last trip issues no scores to drop
            c = qs * gl.load(KS + bh * NKS + (t0 * BN) // BLKK)
            s_cur = warpgroup_mma_wait(num_outstanding=0, deps=[_issue_scores(q_s, k_s, ready, 0, s_init, NUM_STAGES)])
            for j in range(n_tiles - 1):
                s = j % NUM_STAGES
                p, alpha, m_i, l_i = _softmax_tile(s_cur, m_i, l_i, c, (t0 + j) * BN, Lk, BN, s_layout,
                                                   MAY_MASK=False, INT_MAX=True, SPLIT_MAX=True, L_PARTIAL=L_PARTIAL)
                c = qs * gl.load(KS + bh * NKS + ((t0 + j + 1) * BN) // BLKK)
                sn = (j + 1) % NUM_STAGES
                s_cur, pv = _pingpong_turn(q_s, k_s.index(sn), v_s.index(s), p, s_init, o_init, ready.index(sn),
                                           ((j + 1) // NUM_STAGES) & 1, turn_me, j & 1, turn_other, empty.index(s),
                                           p_layout)
                acc = _fold(acc, alpha, pv, row_o)
            j = n_tiles - 1
            p, alpha, m_i, l_i = _softmax_tile(s_cur, m_i, l_i, c, (t0 + j) * BN, Lk, BN, s_layout,
                                               L_PARTIAL=L_PARTIAL)
            pv = _pingpong_last_turn(v_s.index(j % NUM_STAGES), p, o_init, turn_me, j & 1, turn_other, p_layout)
            acc = _fold(acc, alpha, pv, row_o)
        else:
            for j in range(n_tiles):
                s = j % NUM_STAGES
                mbarrier.wait(ready.index(s), (j // NUM_STAGES) & 1)
                tok = warpgroup_mma(q_s, k_s.index(s).permute((1, 0)), s_init, use_acc=False, is_async=True)
                c = qs * gl.load(KS + bh * NKS + (j * BN) // BLKK)
                s_cur = warpgroup_mma_wait(num_outstanding=0, deps=[tok])
                p, alpha, m_i, l_i = _softmax_tile(s_cur, m_i, l_i, c, j * BN, Lk, BN, s_layout, L_PARTIAL=L_PARTIAL)
                pv = warpgroup_mma(_as_pv_operand(p, BM, BN, p_layout), v_s.index(s).permute((1, 0)), o_init,
                                   use_acc=False, max_num_imprecise_acc=BN)
                mbarrier.arrive(empty.index(s))  # K and V of this stage are read (both wgmmas waited)
                acc = gl.fma(acc, gl.expand_dims(gl.convert_layout(alpha, row_o), 1), pv)
        l_i = _row_sums_end(l_i, s_layout, L_PARTIAL)
        if SPLITS > 1:
            gl.static_assert(PIPELINE == 3, "split row blocks are PIPELINE 3's")
            rows = part_row0 + gl.arange(0, BM, layout=row_o)
            cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
            gl.store(PART + gl.expand_dims(rows, 1) * HEAD_DIM + gl.expand_dims(cols, 0), acc)
            rows_s = part_row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout))
            gl.store(PART_ML + rows_s, m_i)
            gl.store(PART_ML + n_part_rows + rows_s, l_i)
        else:
            _store_rows(_normalized(acc, l_i, VS, bh, o_layout), O, bh // H, bh % H, row0, Lq, stride_ob, stride_oh,
                        stride_ol, NW)

    @gluon.jit(do_not_specialize=["Lq", "Lk", "ITEM0", "N_M"])
    def _sage_attn_ws_kernel(q_desc, k_desc, v_desc, QS, KS, VS, O, PART, PART_ML, stride_ob, stride_oh, stride_ol,
                             H, Lq, Lk, LQP, LKP, NQS, NKS, ITEM0, N_M,
                             BLKQ: gl.constexpr, BLKK: gl.constexpr, NUM_STAGES: gl.constexpr,
                             CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, PIPELINE: gl.constexpr,
                             num_warps: gl.constexpr, SPLITS: gl.constexpr = 1, L_PARTIAL: gl.constexpr = False):
        """One program: 128 query rows of one (batch, head), two consumer partitions of 64, one producer warp.

        Row block ``ITEM0 + program`` (``N_M`` per head, heads in order) against all key tiles; with SPLITS > 1,
        row block ``ITEM0 + program // SPLITS`` against the ``program % SPLITS``-th of SPLITS near-equal key
        ranges, its partial results to PART / PART_ML (program ``p``'s rows at 128·p)."""
        BM: gl.constexpr = q_desc.block_type.shape[0]
        HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
        BN: gl.constexpr = k_desc.block_type.shape[0]
        gl.static_assert(BM == 64 and num_warps == 4, "a consumer is one warpgroup of 64 query rows")
        gl.static_assert(BLKK % BN == 0, "key tiles must sit inside one K quantization block")
        pid = gl.program_id(0)
        item = ITEM0 + pid // SPLITS
        pid_m = item % N_M
        bh = item // N_M
        q_s = gl.allocate_shared_memory(q_desc.dtype, [2, BM, HEAD_DIM], q_desc.layout)
        k_s = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES, BN, HEAD_DIM], k_desc.layout)
        v_s = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES, HEAD_DIM, BN], v_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # ping-pong (PIPELINE 2, 3)
        q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # both consumers release a stage
        mbarrier.init(q_bar.index(0), count=1)
        mbarrier.init(q_bar.index(1), count=1)
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        fence_async_shared()
        mbarrier.arrive(turn.index(0))  # the first consumer has the first turn
        n_all = gl.cdiv(Lk, BN)
        if SPLITS > 1:
            split = pid % SPLITS
            t0 = split * n_all // SPLITS
            n_tiles = (split + 1) * n_all // SPLITS - t0
        else:
            t0 = 0
            n_tiles = n_all
        row0 = pid_m * 2 * BM
        q_row = bh * LQP + row0
        n_part_rows = gl.num_programs(0) * 2 * BM
        gl.warp_specialize([
            (_ws_consumer, (q_desc, q_s.index(0), q_bar.index(0), k_s, v_s, ready, empty, turn.index(0),
                            turn.index(1), QS, KS, VS, O, bh, H,
                            q_row, row0, t0, n_tiles, Lq, Lk, NQS, NKS, stride_ob, stride_oh, stride_ol, PART,
                            PART_ML, pid * 2 * BM, n_part_rows, BLKQ, BLKK, NUM_STAGES, num_warps, PIPELINE,
                            SPLITS, L_PARTIAL)),
            (_ws_consumer, (q_desc, q_s.index(1), q_bar.index(1), k_s, v_s, ready, empty, turn.index(1),
                            turn.index(0), QS, KS, VS, O, bh, H,
                            q_row + BM, row0 + BM, t0, n_tiles, Lq, Lk, NQS, NKS, stride_ob, stride_oh, stride_ol,
                            PART, PART_ML, pid * 2 * BM + BM, n_part_rows, BLKQ, BLKK, NUM_STAGES, 4, PIPELINE,
                            SPLITS, L_PARTIAL)),
            (_ws_producer, (k_desc, v_desc, k_s, v_s, ready, empty, t0, n_tiles, bh * LKP, bh * HEAD_DIM,
                            NUM_STAGES)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])

    @triton.jit
    def _merge_splits_kernel(PART, PART_ML, VS, O, stride_ob, stride_oh, stride_ol, H, Lq, ITEM0, N_M, n_part_rows,
                             SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
        """``ROWS`` rows of split row block ``ITEM0 + program``: its SPLITS partial results rescaled to their common
        running maximum and summed, ``Σ 2^(m_s - m) acc_s / Σ 2^(m_s - m) l_s`` times V's per-channel scale, into O
        (rows past Lq left out)."""
        pid = tl.program_id(0)
        rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)  # 0 .. 127 within the row block
        cols = tl.arange(0, HEAD_DIM)
        item = ITEM0 + pid
        pid_m = item % N_M
        bh = item // N_M
        first = pid * SPLITS * 128
        m = tl.full([ROWS], float("-inf"), tl.float32)
        for s in tl.static_range(SPLITS):
            m = tl.maximum(m, tl.load(PART_ML + first + s * 128 + rows))
        acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        l_sum = tl.zeros([ROWS], tl.float32)
        for s in tl.static_range(SPLITS):
            prow = first + s * 128 + rows
            w = tl.math.exp2(tl.load(PART_ML + prow) - m)
            l_sum += w * tl.load(PART_ML + n_part_rows + prow)
            acc += w[:, None] * tl.load(PART + prow[:, None] * HEAD_DIM + cols[None, :])
        o = acc / l_sum[:, None] * tl.load(VS + bh * HEAD_DIM + cols)[None, :]
        qrow = pid_m * 128 + rows
        ptrs = O + (bh // H) * stride_ob + (bh % H) * stride_oh + qrow[:, None] * stride_ol + cols[None, :]
        tl.store(ptrs, o.to(O.dtype.element_ty), mask=(qrow < Lq)[:, None])

    @gluon.jit
    def _fill_shared_aux(m_desc, p_desc, k_s, v_s, ready, empty, g, bh, q_row, NUM_STAGES: gl.constexpr):
        """The linear-branch operands of an item into the two-consumer ring's two entries after its tiles: M's row
        halves into entry ``g``'s K and V slots (both consumers read them), the two consumers' φ(q)/den (column
        halves, rows ``q_row`` and ``q_row + 64``) into entry ``g + 1``'s K and V slots."""
        HALF: gl.constexpr = m_desc.block_type.shape[0]
        HEAD_DIM: gl.constexpr = m_desc.block_type.shape[1]
        BM: gl.constexpr = p_desc.block_type.shape[0]
        s = _claim_stage(ready, empty, g, 2 * m_desc.block_type.nbytes, NUM_STAGES)
        tma_load(m_desc, [bh * HEAD_DIM, 0], ready.index(s),
                 reinterpret(k_s.index(s), m_desc.dtype, [HALF, HEAD_DIM], m_desc.layout))
        tma_load(m_desc, [bh * HEAD_DIM + HALF, 0], ready.index(s),
                 reinterpret(v_s.index(s), m_desc.dtype, [HALF, HEAD_DIM], m_desc.layout))
        s = _claim_stage(ready, empty, g + 1, 4 * p_desc.block_type.nbytes, NUM_STAGES)
        phi0 = reinterpret(k_s.index(s), p_desc.dtype, [2, BM, HALF], p_desc.layout)
        phi1 = reinterpret(v_s.index(s), p_desc.dtype, [2, BM, HALF], p_desc.layout)
        tma_load(p_desc, [q_row, 0], ready.index(s), phi0.index(0))
        tma_load(p_desc, [q_row, HALF], ready.index(s), phi0.index(1))
        tma_load(p_desc, [q_row + BM, 0], ready.index(s), phi1.index(0))
        tma_load(p_desc, [q_row + BM, HALF], ready.index(s), phi1.index(1))

    @gluon.jit
    def _item_rows(LUT, item, N_M, MQ_LUT, T, BLKQ: gl.constexpr, BM: gl.constexpr):
        """An item of the sparse kernel (``N_M`` per (batch, head), heads in order): its (batch·head, first of its
        2·BM query rows) and its two LUT rows (the second clamped to the last row: past Lq, masked at the store)."""
        bh = item // N_M
        rows01 = (item % N_M) * 2 * BM
        lut0 = LUT + (bh * MQ_LUT + gl.minimum(rows01 // BLKQ, MQ_LUT - 1)) * T
        lut1 = LUT + (bh * MQ_LUT + gl.minimum((rows01 + BM) // BLKQ, MQ_LUT - 1)) * T
        return bh, rows01, lut0, lut1

    @gluon.jit
    def _ws_shared_producer(k_desc, v_desc, m_desc, p_desc, k_s, v_s, ready, empty, LUT, N_M, N_ITEMS, MQ_LUT, T,
                            LQP, LKP, BLKQ: gl.constexpr, BLKK: gl.constexpr, NUM_STAGES: gl.constexpr,
                            LINEAR: gl.constexpr):
        """One ring for both consumers, item after item: for each j, the key block both LUT rows name at position
        j once, or the two different ones one after the other (first consumer's first); then (LINEAR) the two
        entries of the linear-branch operands (:func:`_fill_shared_aux`)."""
        HEAD_DIM: gl.constexpr = k_desc.block_type.shape[1]
        BM: gl.constexpr = 64
        g = 0
        for item in range(gl.program_id(0), N_ITEMS, gl.num_programs(0)):
            bh, row0, lut0, lut1 = _item_rows(LUT, item, N_M, MQ_LUT, T, BLKQ, BM)
            x_n = gl.load(lut0)
            y_n = gl.load(lut1)
            for j in range(T):
                x = x_n
                y = y_n
                x_n = gl.load(lut0 + j + 1, mask=j + 1 < T, other=0)  # read a pair ahead
                y_n = gl.load(lut1 + j + 1, mask=j + 1 < T, other=0)
                _fill_stage(k_desc, v_desc, k_s, v_s, ready, empty, g, x * BLKK, bh * LKP, bh * HEAD_DIM, NUM_STAGES)
                g += 1
                if y != x:
                    _fill_stage(k_desc, v_desc, k_s, v_s, ready, empty, g, y * BLKK, bh * LKP, bh * HEAD_DIM,
                                NUM_STAGES)
                    g += 1
            if LINEAR:
                _fill_shared_aux(m_desc, p_desc, k_s, v_s, ready, empty, g, bh, bh * LQP + row0, NUM_STAGES)
                g += 2

    @gluon.jit
    def _ws_shared_consumer(q_desc, m_desc, p_desc, q_s, q_bar, k_s, v_s, ready, empty, turn_me, turn_other,
                            QS, KS, VS, LIN_B, O, LUT, H, N_M, N_ITEMS, MQ_LUT, T, Lq, Lk, LQP, NQS, NKS,
                            stride_ob, stride_oh, stride_ol, HALF_ROW: gl.constexpr, BLKQ: gl.constexpr,
                            BLKK: gl.constexpr, NUM_STAGES: gl.constexpr, LINEAR: gl.constexpr, NW: gl.constexpr,
                            L_PARTIAL: gl.constexpr):
        """One LUT row of each of the program's items (``HALF_ROW``: the first or second 64 rows of its 128), the
        arithmetic and order of :func:`_ws_consumer`'s ping-pong loop per tile (so the Gluon kernel's bits for the
        same LUT). Ring entries and turns are counted over the items: position j of the item's two LUT rows is
        one ring entry when they name the same key block (both consumers read it and each arrives once to release
        it) or two (each consumer reads its own and arrives twice). The next item's Q copy is issued as soon as
        this item's last scores are in; the linear branch's operands arrive through the ring
        (:func:`_fill_shared_aux`) and are released after their wgmmas."""
        BM: gl.constexpr = q_desc.block_type.shape[0]
        HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
        BN: gl.constexpr = k_s.shape[1]
        s_layout: gl.constexpr = wgmma_acc_layout(NW, BN, 32)
        o_layout: gl.constexpr = wgmma_acc_layout(NW, HEAD_DIM, 32)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        lin_layout: gl.constexpr = wgmma_acc_layout(NW, HEAD_DIM, 16)  # φ·M, bf16
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        pid = gl.program_id(0)
        G = gl.num_programs(0)
        s_init = gl.zeros([BM, BN], gl.int32, s_layout)
        o_init = gl.zeros([BM, HEAD_DIM], gl.float32, o_layout)
        row0 = (pid % N_M) * 2 * BM + HALF_ROW * BM
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma_load(q_desc, [(pid // N_M) * LQP + row0, 0], q_bar, q_s)
        g0 = 0
        n_done = 0
        for item in range(pid, N_ITEMS, G):
            bh, rows01, lut0, lut1 = _item_rows(LUT, item, N_M, MQ_LUT, T, BLKQ, BM)
            row0 = rows01 + HALF_ROW * BM
            qs = gl.load(QS + bh * NQS + gl.minimum(row0 // BLKQ, NQS - 1))
            acc = gl.zeros([BM, HEAD_DIM], gl.float32, o_layout)
            m_i = gl.full([BM], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))
            l_i = _row_sums_start(BM, BN, s_layout, L_PARTIAL)
            ks_row = KS + bh * NKS
            turn0 = n_done * T  # this consumer's turns before this item
            x = gl.load(lut0)
            y = gl.load(lut1)
            split = (x != y).to(gl.int32)  # position 0 takes two ring entries
            e = g0 + HALF_ROW * split  # this consumer's entry of position 0
            base = g0 + 1 + split  # the first entry of position 1
            start = (y if HALF_ROW else x) * BLKK
            c = qs * gl.load(ks_row + start // BLKK)
            x_n = gl.load(lut0 + 1, mask=1 < T, other=0)
            y_n = gl.load(lut1 + 1, mask=1 < T, other=0)
            mbarrier.wait(q_bar, n_done & 1)
            s_cur = warpgroup_mma_wait(num_outstanding=0, deps=[_issue_scores(q_s, k_s, ready, e, s_init,
                                                                               NUM_STAGES)])
            for j in range(T - 1):
                s = e % NUM_STAGES
                p, alpha, m_i, l_i = _softmax_tile(s_cur, m_i, l_i, c, start, Lk, BN, s_layout, INT_MAX=True,
                                                   SPLIT_MAX=True, L_PARTIAL=L_PARTIAL)
                split_n = (x_n != y_n).to(gl.int32)
                e_n = base + HALF_ROW * split_n
                base = base + 1 + split_n
                start = (y_n if HALF_ROW else x_n) * BLKK
                c = qs * gl.load(ks_row + start // BLKK)
                x_n = gl.load(lut0 + j + 2, mask=j + 2 < T, other=0)  # the position after next, read now
                y_n = gl.load(lut1 + j + 2, mask=j + 2 < T, other=0)
                sn = e_n % NUM_STAGES
                s_cur, pv = _pingpong_turn(q_s, k_s.index(sn), v_s.index(s), p, s_init, o_init, ready.index(sn),
                                           (e_n // NUM_STAGES) & 1, turn_me, (turn0 + j) & 1, turn_other,
                                           empty.index(s), p_layout, split != 0, True)
                acc = _fold(acc, alpha, pv, row_o)
                e = e_n
                split = split_n
            nxt = item + G
            if nxt < N_ITEMS:  # every score wgmma of this item has completed: Q's buffer takes the next rows
                nrow0 = (nxt % N_M) * 2 * BM + HALF_ROW * BM
                mbarrier.expect(q_bar, q_desc.block_type.nbytes)
                tma_load(q_desc, [(nxt // N_M) * LQP + nrow0, 0], q_bar, q_s)
            s = e % NUM_STAGES
            p, alpha, m_i, l_i = _softmax_tile(s_cur, m_i, l_i, c, start, Lk, BN, s_layout, L_PARTIAL=L_PARTIAL)
            acc = _fold(acc, alpha, _pingpong_last_turn(v_s.index(s), p, o_init, turn_me, (turn0 + T - 1) & 1,
                                                        turn_other, p_layout), row_o)
            mbarrier.arrive(empty.index(s))
            mbarrier.arrive(empty.index(s), pred=split != 0)
            g0 = base
            o = _normalized(acc, _row_sums_end(l_i, s_layout, L_PARTIAL), VS, bh, o_layout)
            if LINEAR:  # o += (φ(q)/den)·M + bias, K split in two halves (the same k16 steps in the same order)
                HALF: gl.constexpr = HEAD_DIM // 2
                sa = g0 % NUM_STAGES
                sb = (g0 + 1) % NUM_STAGES
                mbarrier.wait(ready.index(sa), (g0 // NUM_STAGES) & 1)
                mbarrier.wait(ready.index(sb), ((g0 + 1) // NUM_STAGES) & 1)
                m_lo = reinterpret(k_s.index(sa), m_desc.dtype, [HALF, HEAD_DIM], m_desc.layout)
                m_hi = reinterpret(v_s.index(sa), m_desc.dtype, [HALF, HEAD_DIM], m_desc.layout)
                if HALF_ROW:
                    phi = reinterpret(v_s.index(sb), p_desc.dtype, [2, BM, HALF], p_desc.layout)
                else:
                    phi = reinterpret(k_s.index(sb), p_desc.dtype, [2, BM, HALF], p_desc.layout)
                lin = warpgroup_mma(phi.index(0), m_lo, gl.zeros([BM, HEAD_DIM], gl.float32, lin_layout),
                                    use_acc=False, is_async=True)
                lin = warpgroup_mma(phi.index(1), m_hi, lin, is_async=True)
                lin = warpgroup_mma_wait(num_outstanding=0, deps=[lin])
                mbarrier.arrive(empty.index(sa))
                mbarrier.arrive(empty.index(sb))
                g0 += 2
                offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
                o = o + gl.convert_layout(lin, o_layout) + gl.expand_dims(gl.load(LIN_B + offs_d), 0)
            _store_rows(o, O, bh // H, bh % H, row0, Lq, stride_ob, stride_oh, stride_ol, NW)
            n_done += 1

    @gluon.jit(do_not_specialize=["Lq", "Lk", "T", "N_ITEMS"])
    def _sage_sla_ws_shared_kernel(q_desc, k_desc, v_desc, m_desc, p_desc, QS, KS, VS, LUT, LIN_B, O,
                                   stride_ob, stride_oh, stride_ol, H, Lq, Lk, LQP, LKP, NQS, NKS, T, MQ_LUT,
                                   N_M, N_ITEMS, BLKQ: gl.constexpr, BLKK: gl.constexpr, NUM_STAGES: gl.constexpr,
                                   LINEAR: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                                   num_warps: gl.constexpr, L_PARTIAL: gl.constexpr = False):
        """Block-sparse, persistent, one K/V ring for both consumers: a key block that both LUT rows of an item
        name at the same position is copied once (:func:`.lut_pairing.pair_lut_rows` puts the blocks two rows
        share at the same positions; adjacent query blocks share ~75% of their blocks on the benchmark's inputs).
        Against a ring per consumer (each consumer's own 32 KiB per key tile, ~5.6 TB/s of L2 reads at 1.3B@480p)
        that is 38% fewer copies and, measured, a 2-4% faster kernel (docs/kernels-attention.md)."""
        BM: gl.constexpr = q_desc.block_type.shape[0]
        HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
        BN: gl.constexpr = k_desc.block_type.shape[0]
        gl.static_assert(BM == 64 and num_warps == 4 and BLKQ == BM, "a consumer is one warpgroup and one LUT row")
        gl.static_assert(BLKK == BN, "one key tile per LUT entry")
        gl.static_assert(not LINEAR or (2 * m_desc.block_type.shape[0] == HEAD_DIM
                                        and 2 * p_desc.block_type.shape[1] == HEAD_DIM
                                        and BN * HEAD_DIM >= HEAD_DIM * HEAD_DIM),
                         "M's row halves go to one ring entry's K and V slots, φ(q)/den's column halves to a slot")
        q_s = gl.allocate_shared_memory(q_desc.dtype, [2, BM, HEAD_DIM], q_desc.layout)
        k_s = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES, BN, HEAD_DIM], k_desc.layout)
        v_s = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES, HEAD_DIM, BN], v_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        bars = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())  # turns, Q
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # two arrivals free a stage: one per consumer, or two by one
        for i in gl.static_range(4):
            mbarrier.init(bars.index(i), count=1)
        fence_async_shared()
        mbarrier.arrive(bars.index(0))  # the first consumer has the first turn
        gl.warp_specialize([
            (_ws_shared_consumer, (q_desc, m_desc, p_desc, q_s.index(0), bars.index(2), k_s, v_s, ready, empty,
                                   bars.index(0), bars.index(1), QS, KS, VS, LIN_B, O, LUT, H, N_M, N_ITEMS,
                                   MQ_LUT, T, Lq, Lk, LQP, NQS, NKS, stride_ob, stride_oh, stride_ol, 0, BLKQ, BLKK,
                                   NUM_STAGES, LINEAR, num_warps, L_PARTIAL)),
            (_ws_shared_consumer, (q_desc, m_desc, p_desc, q_s.index(1), bars.index(3), k_s, v_s, ready, empty,
                                   bars.index(1), bars.index(0), QS, KS, VS, LIN_B, O, LUT, H, N_M, N_ITEMS,
                                   MQ_LUT, T, Lq, Lk, LQP, NQS, NKS, stride_ob, stride_oh, stride_ol, 1, BLKQ, BLKK,
                                   NUM_STAGES, LINEAR, 4, L_PARTIAL)),
            (_ws_shared_producer, (k_desc, v_desc, m_desc, p_desc, k_s, v_s, ready, empty, LUT, N_M, N_ITEMS, MQ_LUT,
                                   T, LQP, LKP, BLKQ, BLKK, NUM_STAGES, LINEAR)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def _unsupported(quant: dict, blk_q: int, blk_k: int, lut: torch.Tensor | None = None,
                 linear: tuple | None = None, lin_phi: torch.Tensor | None = None) -> str | None:
    """Why these kernels cannot take a call (dense when ``lut`` is None), or None: the launchers raise it, the
    op-path gates (:func:`dense_ws`, :func:`sparse_ws`) leave the call to the Gluon kernel."""
    if not quant.get("v_wgmma_order"):
        return "needs V quantized in wgmma key order (sage_quantize_triton(..., v_order='wgmma'))"
    if blk_k % BLOCK_N:
        return f"K block {blk_k} must be a multiple of {BLOCK_N} keys"
    if lut is not None and blk_q != BLOCK_M:
        return f"Q block {blk_q}: a sparse consumer's {BLOCK_M} rows must be one LUT row"
    if lut is not None and blk_k != BLOCK_N:
        return f"K block {blk_k}: the sparse kernel copies one {BLOCK_N}-key tile per LUT entry"
    if blk_q % BLOCK_M:
        return f"Q block {blk_q}: a consumer's {BLOCK_M} rows must lie in one Q block"
    if quant["q"].shape[2] % (2 * BLOCK_M):
        return f"quantized Q must be padded to a multiple of {2 * BLOCK_M} rows, not {quant['q'].shape[2]}"
    if lut is not None and not lut.is_contiguous():
        return "the LUT must be contiguous"
    if linear is not None and lin_phi is None:
        return "the linear branch needs φ(q)/den from the quantizer (lin_phi)"
    return None


def _qkv_descs(quant: dict) -> tuple:
    """TMA descriptors of the quantized Q, K (int8) and Vᵀ (FP8) tiles these kernels read."""
    qa, ka, va = quant["q"], quant["k"], quant["v"]
    b, h, lqp, d = qa.shape
    lkp = ka.shape[2]
    lay = gl.NVMMASharedLayout.get_default_for
    return (TensorDescriptor.from_tensor(qa.view(b * h * lqp, d), [BLOCK_M, d], lay([BLOCK_M, d], gl.int8)),
            TensorDescriptor.from_tensor(ka.view(b * h * lkp, d), [BLOCK_N, d], lay([BLOCK_N, d], gl.int8)),
            TensorDescriptor.from_tensor(va.view(b * h * d, lkp), [d, BLOCK_N], lay([d, BLOCK_N], gl.float8e4nv)))


def tail_splits(items: int, n_tiles: int, sms: int) -> tuple[int, int]:
    """(splits, full) for ``items`` row blocks of ``n_tiles`` key tiles on ``sms`` SMs (one program each): the
    first ``full`` (whole waves) run as usual; the last, partial wave's row blocks are cut into ``splits`` key
    ranges so that it fills the SMs (1.3B@480p: 3072 row blocks = 23 waves of 132 + 36, which left 96 SMs idle
    for a whole program: ~3% of the kernel). (1, items) when there is no partial wave, the grid is under one
    wave, :data:`SPLIT_TAIL` is off, or a part would have under 8 key tiles."""
    tail = items % sms
    if not SPLIT_TAIL or items < sms or tail == 0:
        return 1, items
    splits = min(MAX_SPLITS, sms // tail, n_tiles // 8)
    return (splits, items - tail) if splits >= 2 else (1, items)


def _sm_count(device: torch.device) -> int:
    from .sage_attention import _sm_count as count

    return SMS or count(device)


def sage_attention_ws(quant: dict, lq: int, lk: int, out: torch.Tensor, blk_q: int, blk_k: int,
                      num_stages: int | None = None, pipeline: int | None = None,
                      split_tail: bool | None = None, l_partial: bool | None = None) -> torch.Tensor:
    """Dense attention of a :func:`~.sage_attention.sage_quantize_triton` result (Vᵀ in wgmma key order) into
    ``out`` (B, H, Lq, D), like :func:`.sage_attention_gluon.sage_attention_gluon` with ``lut=None``.

    With PIPELINE 3 the last partial wave of row blocks runs as key-range parts merged by a second small kernel
    (:func:`tail_splits`; ``split_tail`` False or :data:`SPLIT_TAIL` off: never); those rows are then not the
    Gluon kernel's bits (each part's FP8 P is scaled to its own running maximum), the others are."""
    why = _unsupported(quant, blk_q, blk_k)
    if why is not None:
        raise UnsupportedShapeError(why)
    b, h, lqp, d = quant["q"].shape
    pipeline = int(PIPELINE if pipeline is None else pipeline)
    n_m = -(-lq // (2 * BLOCK_M))
    items = n_m * b * h
    splits, full = 1, items
    if pipeline == 3 and (SPLIT_TAIL if split_tail is None else split_tail):
        splits, full = tail_splits(items, -(-lk // BLOCK_N), _sm_count(out.device))
    descs = _qkv_descs(quant)
    args = (quant["q_scale"], quant["k_scale"], quant["v_scale"], out)
    strides = (out.stride(0), out.stride(1), out.stride(2))
    sizes = (h, lq, lk, lqp, quant["k"].shape[2], quant["q_scale"].shape[-1], quant["k_scale"].shape[-1])
    consts = dict(BLKQ=blk_q, BLKK=blk_k, NUM_STAGES=num_stages or NUM_STAGES, CONSUMER_REGS=CONSUMER_REGS,
                  PRODUCER_REGS=PRODUCER_REGS, PIPELINE=pipeline, num_warps=4,
                  L_PARTIAL=bool(_G.L_PARTIAL if l_partial is None else l_partial))
    if full:
        _sage_attn_ws_kernel[(full,)](*descs, *args, out, out, *strides, *sizes, 0, n_m, **consts)
    if splits > 1:
        n_split = (items - full) * splits
        part = torch.empty((n_split * 2 * BLOCK_M, d), dtype=torch.float32, device=out.device)
        part_ml = torch.empty((2, n_split * 2 * BLOCK_M), dtype=torch.float32, device=out.device)
        _sage_attn_ws_kernel[(n_split,)](*descs, *args, part, part_ml, *strides, *sizes, full, n_m, SPLITS=splits,
                                         **consts)
        _merge_splits_kernel[(items - full, 4)](part, part_ml, quant["v_scale"], out, *strides, h, lq, full, n_m,
                                               n_split * 2 * BLOCK_M, SPLITS=splits, HEAD_DIM=d, ROWS=32,
                                               num_warps=4)
    return out


def sage_sla_ws(quant: dict, lq: int, lk: int, out: torch.Tensor, lut: torch.Tensor, blk_q: int, blk_k: int,
                linear: tuple | None = None, lin_phi: torch.Tensor | None = None,
                num_stages: int = SPARSE_STAGES) -> torch.Tensor:
    """Block-sparse attention over ``lut`` [B, H, Mq, T] (plus SLA's linear branch when ``linear`` = (M, z, bias)
    and the quantizer's ``lin_phi`` are given) into ``out`` (B, H, Lq, D), like
    :func:`.sage_attention_gluon.sage_attention_gluon` with ``lut`` and ``lin_phi``: the persistent one-ring
    kernel, min(items, SMs) programs. Any LUT gives the right result; one paired by
    :func:`.lut_pairing.pair_lut_rows` copies fewer key tiles."""
    why = _unsupported(quant, blk_q, blk_k, lut, linear, lin_phi)
    if why is not None:
        raise UnsupportedShapeError(why)
    q_desc, k_desc, v_desc = _qkv_descs(quant)
    m_desc, p_desc = _linear_descs(quant, linear, lin_phi, q_desc)
    b, h, lqp, d = quant["q"].shape
    n_m = -(-lq // (2 * BLOCK_M))
    items = n_m * b * h
    lin_b = linear[2] if linear is not None else quant["v_scale"]  # unused without the linear branch
    _sage_sla_ws_shared_kernel[(min(items, _sm_count(out.device)),)](
        q_desc, k_desc, v_desc, m_desc, p_desc, quant["q_scale"], quant["k_scale"], quant["v_scale"], lut, lin_b, out,
        out.stride(0), out.stride(1), out.stride(2), h, lq, lk, lqp, quant["k"].shape[2], quant["q_scale"].shape[-1],
        quant["k_scale"].shape[-1], lut.shape[-1], lut.shape[2], n_m, items, BLKQ=blk_q, BLKK=blk_k,
        NUM_STAGES=num_stages, LINEAR=linear is not None, CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS,
        num_warps=4, L_PARTIAL=_G.L_PARTIAL)
    return out


def _linear_descs(quant: dict, linear: tuple | None, lin_phi: torch.Tensor | None, q_desc) -> tuple:
    """TMA descriptors of the persistent kernel's linear-branch operands: M [B·H·D, D] bf16 in row halves
    [D/2, D], φ(q)/den [B·H·Lq_pad, D] bf16 in column halves [64, D/2] (``q_desc`` stands in without them)."""
    if linear is None:
        return q_desc, q_desc
    b, h, lqp, d = quant["q"].shape
    lay = gl.NVMMASharedLayout.get_default_for
    m_desc = TensorDescriptor.from_tensor(linear[0].reshape(b * h * d, d), [d // 2, d], lay([d // 2, d], gl.bfloat16))
    p_desc = TensorDescriptor.from_tensor(lin_phi.view(b * h * lqp, d), [BLOCK_M, d // 2],
                                          lay([BLOCK_M, d // 2], gl.bfloat16))
    return m_desc, p_desc


#: Off for the rest of the process once a first launch fails (the calls then take the Gluon kernel).
GUARD = GluonGuard("FA3-layout attention", "set TURBOCOMPILE_SAGE_KERNEL=triton to skip the Gluon kernels",
                   fallback="the Gluon attention kernel")


def _guarded(enabled: bool, why_not: str | None, launch, *args) -> bool:
    """Run ``launch(*args)`` if these kernels are on and take the call; False (the caller falls back) if not, or if
    it is the first launch in this process and it failed (:data:`GUARD` then switches them off)."""
    from .sage_attention_gluon import available

    if not enabled or GUARD.disabled is not None or gluon is None or not available() or why_not is not None:
        return False
    try:
        launch(*args)
    except Exception as exc:
        if not GUARD.launch_failed(exc):
            raise
        return False
    GUARD.succeeded()
    return True


def dense_ws(quant: dict, lq: int, lk: int, out: torch.Tensor, blk_q: int, blk_k: int) -> torch.Tensor | None:
    """Dense attention by this kernel when it takes the call (``out`` written and returned), else None: the
    caller runs :func:`.sage_attention_gluon.sage_attention_gluon`. It takes dense calls on Hopper with 128-key K
    blocks (its tiles), Vᵀ in wgmma key order, unless switched off (:data:`DENSE_OPS`, or a failed first launch)."""
    taken = _guarded(DENSE_OPS, _unsupported(quant, blk_q, blk_k), sage_attention_ws, quant, lq, lk, out, blk_q,
                     blk_k)
    return out if taken else None


def wants_paired_lut(q: torch.Tensor, blk_q: int, blk_k: int) -> bool:
    """Whether block-sparse calls of this shape will run the one-ring kernel, which copies a key block two LUT rows
    share once only where :func:`.lut_pairing.pair_lut_rows` has aligned them: the caller then pairs its LUT
    (off the critical path where it can; any LUT is correct)."""
    from .sage_attention_gluon import available

    return (SPARSE_OPS and GUARD.disabled is None and gluon is not None
            and blk_q == BLOCK_M and blk_k == BLOCK_N and q.is_cuda and available())


def sparse_ws(quant: dict, lq: int, lk: int, out: torch.Tensor, lut: torch.Tensor, blk_q: int, blk_k: int,
              linear: tuple | None, lin_phi: torch.Tensor | None) -> torch.Tensor | None:
    """Block-sparse attention by this kernel when it takes the call (``out`` written and returned), else None: the
    caller runs :func:`.sage_attention_gluon.sage_attention_gluon`. It takes 64-row LUT rows over 128-key K blocks,
    with the linear branch only when φ(q)/den came from the quantizer, unless switched off
    (:data:`SPARSE_OPS`, or a failed first launch)."""
    taken = _guarded(SPARSE_OPS, _unsupported(quant, blk_q, blk_k, lut, linear, lin_phi), sage_sla_ws, quant, lq,
                     lk, out, lut, blk_q, blk_k, linear, lin_phi)
    return out if taken else None


def compile_for_sm90(head_dim: int = 128, num_stages: int = NUM_STAGES, consumer_regs: int = CONSUMER_REGS,
                     producer_regs: int = PRODUCER_REGS, pipeline: int = PIPELINE, splits: int = 1,
                     l_partial: bool | None = None):
    """The kernel compiled for sm_90a without a GPU (:func:`.gluon_hopper.compile_for_sm90a`)."""
    lay = gl.NVMMASharedLayout.get_default_for
    d, bn, bm = head_dim, BLOCK_N, BLOCK_M
    sig = {"q_desc": f"tensordesc<i8[{bm}, {d}],{lay([bm, d], gl.int8)!r}>",
           "k_desc": f"tensordesc<i8[{bn}, {d}],{lay([bn, d], gl.int8)!r}>",
           "v_desc": f"tensordesc<fp8e4nv[{d}, {bn}],{lay([d, bn], gl.float8e4nv)!r}>",
           "QS": "*fp32", "KS": "*fp32", "VS": "*fp32", "O": "*bf16", "PART": "*fp32", "PART_ML": "*fp32"}
    consts = {"BLKQ": 64, "BLKK": 128, "NUM_STAGES": num_stages, "CONSUMER_REGS": consumer_regs,
              "PRODUCER_REGS": producer_regs, "PIPELINE": int(pipeline), "num_warps": 4, "SPLITS": splits,
              "L_PARTIAL": bool(_G.L_PARTIAL if l_partial is None else l_partial)}
    return compile_for_sm90a(_sage_attn_ws_kernel, sig, consts,
                             ["QS", "KS", "VS", "O", "PART", "PART_ML", "stride_ob", "stride_oh", "stride_ol"])


def compile_sparse_for_sm90(head_dim: int = 128, num_stages: int = SPARSE_STAGES, linear: bool = True):
    """The block-sparse kernel compiled for sm_90a without a GPU."""
    lay = gl.NVMMASharedLayout.get_default_for
    d, bn, bm = head_dim, BLOCK_N, BLOCK_M
    q_desc = f"tensordesc<i8[{bm}, {d}],{lay([bm, d], gl.int8)!r}>"
    sig = {"q_desc": q_desc, "k_desc": f"tensordesc<i8[{bn}, {d}],{lay([bn, d], gl.int8)!r}>",
           "v_desc": f"tensordesc<fp8e4nv[{d}, {bn}],{lay([d, bn], gl.float8e4nv)!r}>",
           "m_desc": f"tensordesc<bf16[{d // 2}, {d}],{lay([d // 2, d], gl.bfloat16)!r}>" if linear else q_desc,
           "p_desc": f"tensordesc<bf16[{bm}, {d // 2}],{lay([bm, d // 2], gl.bfloat16)!r}>" if linear else q_desc,
           "QS": "*fp32", "KS": "*fp32", "VS": "*fp32", "LUT": "*i32", "LIN_B": "*fp32", "O": "*bf16"}
    consts = {"BLKQ": 64, "BLKK": 128, "NUM_STAGES": num_stages, "LINEAR": linear, "CONSUMER_REGS": CONSUMER_REGS,
              "PRODUCER_REGS": PRODUCER_REGS, "num_warps": 4, "L_PARTIAL": _G.L_PARTIAL}
    return compile_for_sm90a(_sage_sla_ws_shared_kernel, sig, consts,
                             ["QS", "KS", "VS", "LUT", "LIN_B", "O", "stride_ob", "stride_oh", "stride_ol"])


def bench_main() -> None:  # pragma: no cover - needs a Hopper GPU
    """Kernel alone, dense, at the Wan shapes: this kernel (without and with the ping-pong) against the Gluon
    kernel and cuDNN,
    CUDA-graph replays, with the bit-equality of the outputs."""
    import json

    from .sage_attention import ATTENTION_BENCH_SHAPES, bench_meta, bench_ms_graph, sage_quantize_triton, structured_qkv
    from .sage_attention_gluon import sage_attention_gluon

    dev = torch.device("cuda")
    print(bench_meta(), flush=True)
    variants = [(2, 3), (3, 4)]
    if "--variants" in sys.argv:  # e.g. --variants 2:3,3:4,3:4:0,3:4:1:0 (pipeline:stages[:split_tail[:l_partial]])
        variants = [tuple(int(x) for x in v.split(":")) for v in sys.argv[sys.argv.index("--variants") + 1].split(",")]
    rows = []
    for shape, (b, h, n, d) in ATTENTION_BENCH_SHAPES.items() if "--sparse-only" not in sys.argv else ():
        q, k, v = structured_qkv(b, h, n, d, torch.bfloat16, dev, seed=1)
        qg = sage_quantize_triton(q, k, v, 64, 128, v_order="wgmma")
        ref = torch.empty_like(q)
        t_ref = bench_ms_graph(lambda: sage_attention_gluon(qg, n, n, ref, None, 64, 128))  # noqa: B023
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            t_sdpa = bench_ms_graph(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))  # noqa: B023
        rows.append({"shape": shape, "kernel": "gluon", "ms": t_ref, "cudnn_ms": t_sdpa})
        print(f"{shape} gluon {t_ref:.3f} ms  cuDNN {t_sdpa:.3f} ms", flush=True)
        for pipeline, stages, *split in variants:
            o = torch.full_like(q, float("nan"))
            lpart = bool(split[1]) if len(split) > 1 else None
            split = bool(split[0]) if split else None
            name = (f"ws stages={stages} pipeline={int(pipeline)}" + ("" if split is None else f" split_tail={split}")
                    + ("" if lpart is None else f" l_partial={lpart}"))
            try:
                ms = bench_ms_graph(lambda: sage_attention_ws(qg, n, n, o, 64, 128, stages, pipeline,  # noqa: B023
                                                              split, lpart))  # noqa: B023
            except Exception as exc:  # noqa: BLE001 - a failing variant is reported
                print(f"{shape} {name}: failed {exc}", flush=True)
                continue
            same = bool(torch.equal(o, ref))
            rel = float((o.float() - ref.float()).norm() / ref.float().norm())
            rows.append({"shape": shape, "kernel": "ws", "stages": stages, "pipeline": pipeline, "split_tail": split,
                         "ms": ms,
                         "bit_equal": same, "rel": rel})
            print(f"{shape} {name} {ms:.3f} ms  x{t_ref / ms:.3f} vs gluon  x{t_sdpa / ms:.3f} vs cuDNN  "
                  f"bit-equal {same} rel {rel:.1e}", flush=True)
        del q, k, v, qg, ref
        torch.cuda.empty_cache()
    if "--dense-only" not in sys.argv:
        rows += _bench_sparse(dev)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "sage_attention_ws_bench.json"), "w") as f:
        json.dump(rows, f, indent=1)


def _bench_sparse(dev) -> list[dict]:  # pragma: no cover - needs a Hopper GPU
    """Block-sparse (top-k 0.1) with SLA's linear branch, as ``sage_sla`` runs it: this kernel against the Gluon
    kernel on the same quantized inputs, CUDA-graph replays, with the bit-equality of the outputs."""
    from .block_map import lut_from_pooled
    from .lut_pairing import pair_lut_rows
    from .sage_attention import ATTENTION_BENCH_SHAPES, bench_ms_graph, sage_quantize_triton, structured_qkv
    from .sage_attention_gluon import sage_attention_gluon
    from .sla import linear_branch_stats

    rows = []
    for shape, (b, h, n, d) in ATTENTION_BENCH_SHAPES.items():
        q, k, v = structured_qkv(b, h, n, d, torch.bfloat16, dev, seed=1)
        w, bias = torch.randn(d, d, device=dev) * 0.05, torch.randn(d, device=dev) * 0.05
        lin, moments = linear_branch_stats(k, v, w, bias)
        qg = sage_quantize_triton(q, k, v, 64, 128, **moments, v_order="wgmma", linear_z=lin[1])
        lut = lut_from_pooled(qg["q_pool"], qg["k_pool"], 0.1)
        ref = torch.full_like(q, float("nan"))
        t_ref = bench_ms_graph(lambda: sage_attention_gluon(  # noqa: B023
            qg, n, n, ref, lut, 64, 128, q_raw=q, linear=lin, lin_phi=qg["lin_phi"]))
        paired = pair_lut_rows(lut)
        ref_p = torch.full_like(q, float("nan"))
        t_ref_p = bench_ms_graph(lambda: sage_attention_gluon(  # noqa: B023
            qg, n, n, ref_p, paired, 64, 128, q_raw=q, linear=lin, lin_phi=qg["lin_phi"]))
        t_pair = bench_ms_graph(lambda: pair_lut_rows(lut))  # noqa: B023
        print(f"{shape} sparse 0.1 + linear: gluon {t_ref:.3f} ms, on the paired LUT {t_ref_p:.3f} ms; pairing "
              f"{t_pair * 1000:.1f} us", flush=True)
        stages_list = [SPARSE_STAGES]
        if "--sparse-stages" in sys.argv:  # e.g. --sparse-stages 4,5,6 (ring stages, on the paired LUT)
            stages_list = [int(x) for x in sys.argv[sys.argv.index("--sparse-stages") + 1].split(",")]
        for table, want, stages in [(lut, ref, SPARSE_STAGES)] + [(paired, ref_p, st) for st in stages_list]:
            o = torch.full_like(q, float("nan"))
            ms = bench_ms_graph(lambda: sage_sla_ws(qg, n, n, o, table, 64, 128, lin, qg["lin_phi"],  # noqa: B023
                                                    stages))  # noqa: B023
            same = bool(torch.equal(o, want))
            rel = float((o.float() - ref.float()).norm() / ref.float().norm())
            name = "paired LUT" if table is paired else "sorted LUT"
            rows.append({"shape": shape, "mode": "sparse0.1+linear", "lut": name, "stages": stages, "gluon_ms": t_ref,
                         "gluon_paired_ms": t_ref_p, "pair_ms": t_pair, "ws_ms": ms, "bit_equal": same,
                         "rel_vs_gluon_sorted": rel})
            print(f"{shape} ws, {name}, {stages} stages: {ms:.3f} ms  x{t_ref / ms:.3f} vs gluon  "
                  f"bit-equal (same LUT) {same}  "
                  f"rel vs gluon (sorted LUT) {rel:.1e}", flush=True)
        del q, k, v, qg, ref, o
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":  # pragma: no cover
    bench_main()
