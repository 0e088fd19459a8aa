"""The paper's block-scaled 8-bit GEMM: ``out = sum_kb (A_kb @ B_kb^T) * sa[., kb] * sb[n/128, kb] (+ bias)``.

A is the quantized activation [M, K] (int8 in 128x128 blocks for ``int8-block``, or e4m3 in 1x128 groups for the
Triton ``fp8-block`` path), B the quantized weight [N, K] in 128x128 blocks. The scales change every 128 channels
of K, so the integer accumulator cannot run over all of K as in a per-row scheme: each program accumulates one
128-deep K block on the tensor cores (``tl.dot`` -> wgmma on Hopper, int32 for int8, fp32 for fp8), then folds it
into an fp32 accumulator with one multiply-add by the product of the two block scales. That rescale is CUDA-core
work on every accumulator element per K block, and Triton waits for each block's wgmma before it (the tensor
cores idle meanwhile): on an H200 this kernel reaches ~800 TOP/s against ~1250 for the same loads and tiles without
the rescale (docs/kernels-linear.md). ``GemmConfig.rescale`` selects how int32 becomes fp32: the plain convert
(``I2FP`` on sm_90, measured fastest, default), an exact magic-number add/subtract, or the magic number folded
out of the loop. Bias and the output cast are fused in the epilogue.

Tiles are 128 x 128 (x 128 deep) so a 128x128 scale block maps onto a tile and the scales are scalars per K step;
``BLOCK_N = 256`` loads a pair of weight scales. Programs are rasterized in groups of ``GROUP_M`` row-tiles so
a wave of programs reuses the same weight tiles from L2.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from turbocompile.errors import UnsupportedShapeError

log = logging.getLogger(__name__)

from turbocompile.kernels.quantize_activations import INTERPRET, interp_round_bits

try:
    import triton
    import triton.language as tl

    from turbocompile.kernels.quantize_activations import round_bits
except ImportError:  # pragma: no cover
    triton = None
    tl = None

BLOCK = 128


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and pipelining of one launch (the benchmark sweeps these)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4
    #: int32 -> fp32 rescale of each K block's accumulator (int8 only):
    #: 0 = convert instruction; 1 = exact magic-number convert (integer add + float subtract);
    #: 2 = same, the integer add done by the tensor core (accumulator starts at the magic bits);
    #: 3 = like 2 but the magic offset is subtracted once at the end (one FFMA per element; not bit-faithful:
    #:     relative error ~1e-3 of the output from the cancellation, far under the 8-bit quantization error).
    rescale: int = 0
    #: persistent grid (one program per SM walking the tiles) with TMA tensor-descriptor loads
    tma: bool = False
    #: with ``tma``: flatten the tile and K loops so the pipeline prefetches the next tile during the epilogue
    flatten: bool = True

    def launch_kwargs(self) -> dict:
        kw = dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m,
                  RESCALE=self.rescale, num_warps=self.num_warps, num_stages=self.num_stages)
        if self.tma:
            kw["FLATTEN"] = self.flatten
        return kw


#: Named configurations tried by the benchmark; ``DEFAULT_CONFIG`` is the measured winner (docs/kernels-linear.md).
CONFIGS: dict[str, GemmConfig] = {
    "128x128_w8_s4_cvt": GemmConfig(rescale=0),
    "128x128_w8_s4_magic": GemmConfig(rescale=1),
    "128x128_w8_s4_r3": GemmConfig(rescale=3),
    "128x64_w4_s4": GemmConfig(block_n=64, num_warps=4),
    "tma_128x128_w8_s4": GemmConfig(tma=True),
    "tma_128x128_w8_s3": GemmConfig(tma=True, num_stages=3),
    "tma_128x128_w8_s4_noflat": GemmConfig(tma=True, flatten=False),
    "tma_128x128_w8_s4_r3": GemmConfig(tma=True, rescale=3),
    "128x256_w8_s3": GemmConfig(block_n=256, num_stages=3),
    "256x128_w8_s3": GemmConfig(block_m=256, num_stages=3),
}
DEFAULT_CONFIG = "128x128_w8_s4_cvt"
#: The last compiled kernel launched (the benchmark reads its PTX/SASS facts from it).
LAST_COMPILED = None


if triton is not None:

    @triton.jit
    def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """Map a linear program id to (tile_m, tile_n), walking GROUP_M row-tiles per column sweep (L2 reuse)."""
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * num_pid_n
        group = pid // in_group
        first_m = group * GROUP_M
        size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % size_m
        pid_n = (pid % in_group) // size_m
        return pid_m, pid_n

    @triton.jit
    def tile_operands(a_ptr, b_ptr, M, N, stride_am, stride_bn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """This program's tile and its first A [BLOCK_M, BLOCK_K] / B^T [BLOCK_K, BLOCK_N] pointers.

        Out-of-range rows/columns read a valid row instead (their results are never stored): no load masks on
        M/N. B is read K-major (B^T tile from the row-major [N, K] weight), as int8/e4m3 wgmma requires."""
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        rows_a = (offs_m % M).to(tl.int64)
        rows_b = (offs_n % N).to(tl.int64)
        a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + rows_b[None, :] * stride_bn + offs_k[:, None]
        return pid_m, pid_n, offs_m, offs_n, offs_k, rows_a, rows_b, a_ptrs, b_ptrs

    @triton.jit
    def load_k_step(a_ptrs, b_ptrs, offs_k, k_left, EVEN_K: tl.constexpr):
        """The A and B^T tiles of one K step (zero past K unless K is a multiple of the step)."""
        if EVEN_K:
            return tl.load(a_ptrs), tl.load(b_ptrs)
        else:
            return (tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0),
                    tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0))

    @triton.jit
    def int_block_to_f32(a, b, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RESCALE: tl.constexpr):
        """One 128-deep int8 block product on the tensor cores, returned as fp32 (see GemmConfig.rescale)."""
        if RESCALE == 0:
            return tl.dot(a, b, out_dtype=tl.int32).to(tl.float32)
        elif RESCALE == 1:  # exact for |d| < 2**22; 128 products of int8 are at most 2**21
            d = tl.dot(a, b, out_dtype=tl.int32)
            return (d + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
        else:
            d = tl.dot(a, b, tl.full((BLOCK_M, BLOCK_N), 0x4B400000, tl.int32), out_dtype=tl.int32)
            if RESCALE == 2:
                return d.to(tl.float32, bitcast=True) - 12582912.0
            else:
                return d.to(tl.float32, bitcast=True)

    #: The epilogue's GELU in PTX on the GPU (the interpreter runs no inline assembly and takes the plain form).
    _GELU_PTX: tl.constexpr = tl.constexpr(not INTERPRET)

    @triton.jit
    def epilogue_activation(out, c_ptr, OUT_ROUND: tl.constexpr, ACT: tl.constexpr):
        """ACT 1: GELU (tanh form) of the output as the graph computed it: the GEMM's result rounded to the output
        dtype first (what ``aten.gelu`` read), then ``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` in fp32 (pass
        ``fuse_gelu``), as ``x / (1 + exp(−2u))``: no cancellation where tanh is near −1, so the small negative
        outputs are more exact than ``1 + tanhf`` (they differ from PyTorch's in low bits there).

        On the GPU that is seven PTX instructions per element: ``−2u·log2(e)`` as ``x·(c1 + c2·x²)`` (one FFMA,
        two FMUL), ``ex2.approx``, an add, ``rcp.approx`` and a multiply, each within 2 ulp of fp32, far under
        the output's bf16 rounding. Written with Triton's ``exp`` and IEEE division it took ~18 SASS instructions
        per element, and the epilogue is not overlapped with the next tile's main loop (docs/kernels-linear.md).
        ACT 0: ``out`` unchanged."""
        if ACT == 1:
            x = round_bits(out, OUT_ROUND).to(c_ptr.dtype.element_ty).to(tl.float32)
            if _GELU_PTX:  # c1 = −2·log2(e)·√(2/π) = 0xC0135761, c2 = 0.044715·c1 = 0xBDD2D3E8
                out = tl.inline_asm_elementwise(
                    "{ .reg .f32 t; mul.f32 t, $1, $1; fma.rn.f32 t, t, 0fBDD2D3E8, 0fC0135761; "
                    "mul.f32 t, t, $1; ex2.approx.ftz.f32 t, t; add.f32 t, t, 0f3F800000; "
                    "rcp.approx.ftz.f32 t, t; mul.f32 $0, t, $1; }",
                    "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
            else:
                u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
                out = x / (1.0 + tl.exp(-2.0 * u))
        return out

    @triton.jit
    def epilogue_residual(out, c_ptr, res_ptr, gate_ptr, offs_m, offs_n, M, N, stride_rm, rows_per_gate,
                          OUT_ROUND: tl.constexpr, RESIDUAL: tl.constexpr):
        """The block's residual update in the output GEMM's epilogue (pass ``fuse_residual``), on the GEMM's value
        rounded to the output dtype first (what the graph's add read), in fp32: RESIDUAL 1 ``residual + out``
        (the cross-attention's), 2 ``residual + out·gate`` with the fp32 adaLN gate [B, N], one gate row per
        ``rows_per_gate`` output rows (self-attention and FFN). Reading the residual here costs 2 bytes per
        element and saves the separate kernel's three (read out, read residual, write). RESIDUAL 0: unchanged."""
        if RESIDUAL > 0:
            o = round_bits(out, OUT_ROUND).to(c_ptr.dtype.element_ty).to(tl.float32)
            ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
            r = tl.load(res_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :], mask=ok,
                        other=0.0).to(tl.float32)
            if RESIDUAL == 2:
                g = tl.load(gate_ptr + (offs_m // rows_per_gate).to(tl.int64)[:, None] * N + offs_n[None, :],
                            mask=ok, other=0.0)
                out = r + o * g
            else:
                out = r + o
        return out

    @triton.jit
    def _gemm_block_scaled_kernel(
        a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr,
        M, N, K,
        stride_am, stride_bn, stride_cm,
        stride_sam, stride_sak, stride_sbn, stride_sbk,
        HAS_BIAS: tl.constexpr, A_PER_ROW: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        RESCALE: tl.constexpr, OUT_ROUND: tl.constexpr,
    ):
        pid_m, pid_n, offs_m, offs_n, offs_k, rows_a, rows_b, a_ptrs, b_ptrs = tile_operands(
            a_ptr, b_ptr, M, N, stride_am, stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
        # Scales: a scalar per K step where the tile lies inside one 128-block, else a vector over rows/columns.
        if A_PER_ROW:  # 1 x 128 groups: one scale per row and K block
            sa_ptrs = sa_ptr + rows_a * stride_sam
        elif BLOCK_M <= 128:
            sa_ptrs = sa_ptr + (pid_m * BLOCK_M // 128) * stride_sam
        else:
            sa_ptrs = sa_ptr + (rows_a // 128) * stride_sam
        if BLOCK_N <= 128:
            sb_ptrs = sb_ptr + (pid_n * BLOCK_N // 128) * stride_sbn
        else:
            sb_ptrs = sb_ptr + (rows_b // 128) * stride_sbn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        corr = 0.0
        for kt in range(0, tl.cdiv(K, BLOCK_K)):
            a, b = load_k_step(a_ptrs, b_ptrs, offs_k, K - kt * BLOCK_K, EVEN_K)
            sa = tl.load(sa_ptrs + kt * stride_sak)
            sb = tl.load(sb_ptrs + kt * stride_sbk)
            if a.dtype == tl.int8:
                df = int_block_to_f32(a, b, BLOCK_M, BLOCK_N, RESCALE)
            else:
                df = tl.dot(a, b)
            if A_PER_ROW or BLOCK_M > 128:
                if BLOCK_N <= 128:
                    acc += df * (sa * sb)[:, None]
                else:
                    acc += df * (sa[:, None] * sb[None, :])
            else:
                if BLOCK_N <= 128:
                    acc += df * (sa * sb)
                else:
                    acc += df * (sa * sb)[None, :]
            if RESCALE == 3:
                corr += sa * sb
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if RESCALE == 3:
            acc -= 12582912.0 * corr
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, round_bits(acc, OUT_ROUND).to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


if triton is not None:

    @triton.jit
    def _gemm_scaled_tma_kernel(
        a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, bias_ptr,
        M, N, K, stride_cm,
        stride_sam, stride_sak, stride_sbn, stride_sbk,
        HAS_BIAS: tl.constexpr, A_PER_ROW: tl.constexpr, ROW_SCALED: tl.constexpr, NUM_SMS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        RESCALE: tl.constexpr, OUT_ROUND: tl.constexpr, FLATTEN: tl.constexpr, ACT: tl.constexpr = 0,
        res_ptr=None, gate_ptr=None, stride_rm=0, rows_per_gate=1, RESIDUAL: tl.constexpr = 0,
    ):
        """Persistent TMA variant: ``ROW_SCALED`` = one scale per row of A and of B applied in the epilogue
        (int8-row / fp8-row), else the block scheme of ``_gemm_block_scaled_kernel``. TMA zero-fills the edges.
        ``ACT`` applies :func:`epilogue_activation` after the bias, ``RESIDUAL`` then :func:`epilogue_residual`."""
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=FLATTEN):
            pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            rows_a = (offs_m % M).to(tl.int64)
            rows_b = (offs_n % N).to(tl.int64)
            if ROW_SCALED:
                if a_desc.dtype == tl.int8:
                    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
                else:
                    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for kt in range(k_tiles):
                    a = a_desc.load([pid_m * BLOCK_M, kt * BLOCK_K])
                    b = b_desc.load([pid_n * BLOCK_N, kt * BLOCK_K])
                    acc_i = tl.dot(a, b.T, acc_i, out_dtype=acc_i.dtype)
                acc = acc_i.to(tl.float32) * tl.load(sa_ptr + rows_a)[:, None] * tl.load(sb_ptr + rows_b)[None, :]
            else:
                if A_PER_ROW:
                    sa_ptrs = sa_ptr + rows_a * stride_sam
                else:
                    sa_ptrs = sa_ptr + (pid_m * BLOCK_M // 128) * stride_sam
                sb_ptrs = sb_ptr + (pid_n * BLOCK_N // 128) * stride_sbn
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                corr = 0.0
                for kt in range(k_tiles):
                    a = a_desc.load([pid_m * BLOCK_M, kt * BLOCK_K])
                    b = b_desc.load([pid_n * BLOCK_N, kt * BLOCK_K])
                    sa = tl.load(sa_ptrs + kt * stride_sak)
                    sb = tl.load(sb_ptrs + kt * stride_sbk)
                    if a.dtype == tl.int8:
                        df = int_block_to_f32(a, b.T, BLOCK_M, BLOCK_N, RESCALE)
                    else:
                        df = tl.dot(a, b.T)
                    if A_PER_ROW:
                        acc += df * (sa * sb)[:, None]
                    else:
                        acc += df * (sa * sb)
                    if RESCALE == 3:
                        corr += sa * sb
                if RESCALE == 3:
                    acc -= 12582912.0 * corr
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            acc = epilogue_activation(acc, c_ptr, OUT_ROUND, ACT)
            acc = epilogue_residual(acc, c_ptr, res_ptr, gate_ptr, offs_m, offs_n, M, N, stride_rm, rows_per_gate,
                                    OUT_ROUND, RESIDUAL)
            c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
            tl.store(c_ptrs, round_bits(acc, OUT_ROUND).to(c_ptr.dtype.element_ty),
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


_NUM_SMS: dict[int, int] = {}


def launch_tma(a_q: torch.Tensor, w_q: torch.Tensor, out: torch.Tensor, a_scale: torch.Tensor,
               w_scale: torch.Tensor, bias: torch.Tensor | None, strides: tuple[int, int, int, int],
               cfg: GemmConfig, a_per_row: bool, row_scaled: bool, act: int = 0, residual: dict | None = None):
    """Launch the persistent TMA kernel (one program per SM); returns the compiled kernel. ``act`` 1: GELU (tanh)
    in the epilogue; ``residual``: :func:`residual_args` (the residual update after it)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    dev = a_q.device.index or 0
    if dev not in _NUM_SMS:
        _NUM_SMS[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    m, k = a_q.shape
    n = w_q.shape[0]
    a_desc = TensorDescriptor.from_tensor(a_q, [cfg.block_m, cfg.block_k])
    b_desc = TensorDescriptor.from_tensor(w_q, [cfg.block_n, cfg.block_k])
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    grid = (min(_NUM_SMS[dev], tiles),)
    return _gemm_scaled_tma_kernel[grid](
        a_desc, b_desc, out, a_scale, w_scale, bias if bias is not None else out, m, n, k, out.stride(0),
        *strides, HAS_BIAS=bias is not None, A_PER_ROW=a_per_row, ROW_SCALED=row_scaled, NUM_SMS=_NUM_SMS[dev],
        OUT_ROUND=interp_round_bits(out.dtype), **({"ACT": act} if act else {}), **(residual or {}),
        **cfg.launch_kwargs())


def residual_args(out: torch.Tensor, residual: torch.Tensor | None, gate: torch.Tensor | None) -> dict:
    """Launch arguments of :func:`epilogue_residual` for an [M, N] ``out``: ``residual`` [M, N] in out's dtype,
    ``gate`` None or fp32 [G, N] with G dividing M (G = 1: every row; G = batch: M/G rows each). {} for none."""
    if residual is None:
        return {}
    m, n = out.shape
    if residual.shape != out.shape or residual.dtype != out.dtype or residual.stride(-1) != 1:
        raise UnsupportedShapeError(f"residual must be {out.dtype} {tuple(out.shape)} with unit column stride, "
                                    f"got {residual.dtype} {tuple(residual.shape)} strides {residual.stride()}")
    args = {"res_ptr": residual, "stride_rm": residual.stride(0), "RESIDUAL": 1}
    if gate is not None:
        if gate.dtype != torch.float32 or gate.ndim != 2 or gate.shape[1] != n or m % gate.shape[0]:
            raise UnsupportedShapeError(f"gate must be fp32 [G, {n}] with G dividing {m} rows, "
                                        f"got {gate.dtype} {tuple(gate.shape)}")
        args.update(gate_ptr=gate.contiguous(), rows_per_gate=m // gate.shape[0], RESIDUAL=2)
    return args


def tma_ok(a_q: torch.Tensor, w_q: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and row strides (K % 16 == 0 for 8-bit operands) and a CUDA device."""
    return (a_q.is_cuda and a_q.data_ptr() % 16 == 0 and w_q.data_ptr() % 16 == 0
            and a_q.stride(0) % 16 == 0 and w_q.stride(0) % 16 == 0)


def _config(config: GemmConfig | str | None) -> GemmConfig:
    if config is None:
        return CONFIGS[DEFAULT_CONFIG]
    return CONFIGS[config] if isinstance(config, str) else config


def gemm_block_scaled(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                      bias: torch.Tensor | None, out_dtype: torch.dtype, a_per_row: bool = False,
                      config: GemmConfig | str | None = None) -> torch.Tensor:
    """Block-scaled GEMM ``[M, K] x [N, K]^T -> [M, N]`` in ``out_dtype``.

    ``a_scale`` is ``[ceil(M/128), ceil(K/128)]`` (128x128 blocks) or, with ``a_per_row``, K-major
    ``[ceil(K/128), M]`` (1x128 groups, as :func:`quant_fp8_group` writes it). ``w_scale`` is
    ``[ceil(N/128), ceil(K/128)]``. A and B must both be int8 or both float8_e4m3fn.
    """
    if triton is None:
        from turbocompile.errors import BackendUnavailableError
        raise BackendUnavailableError("Triton is not installed: the block-scaled GEMM needs it")
    cfg = _config(config)
    m, k = a_q.shape
    n = w_q.shape[0]
    if w_q.shape[1] != k or a_q.dtype != w_q.dtype:
        raise UnsupportedShapeError(f"GEMM operands disagree: A {tuple(a_q.shape)} {a_q.dtype}, "
                                    f"B {tuple(w_q.shape)} {w_q.dtype}; quantize both with the same scheme")
    if cfg.rescale == 3 and (a_per_row or cfg.block_m > BLOCK or cfg.block_n > BLOCK):
        raise UnsupportedShapeError("rescale mode 3 needs one scale per tile: 128x128 tiles or smaller, 128x128 A")
    if cfg.tma and (cfg.block_m > BLOCK or cfg.block_n > BLOCK):
        raise UnsupportedShapeError(f"the TMA block-scaled kernel takes tiles up to 128 x 128, got {cfg}")
    if cfg.block_k != BLOCK or BLOCK % min(cfg.block_m, BLOCK) or BLOCK % min(cfg.block_n, BLOCK):
        raise UnsupportedShapeError(f"block-scaled GEMM tiles must be 128 deep and nest with 128 blocks, got {cfg}")
    kb = math.ceil(k / BLOCK)
    if tuple(w_scale.shape) != (math.ceil(n / BLOCK), kb):
        raise UnsupportedShapeError(f"weight scale shape {tuple(w_scale.shape)} != {(math.ceil(n / BLOCK), kb)}")
    if a_per_row:
        stride_sam, stride_sak = a_scale.stride(1), a_scale.stride(0)
    else:
        stride_sam, stride_sak = a_scale.stride(0), a_scale.stride(1)
    a_q = a_q if a_q.stride(1) == 1 else a_q.contiguous()
    w_q = w_q if w_q.stride(1) == 1 else w_q.contiguous()
    out = torch.empty((m, n), dtype=out_dtype, device=a_q.device)
    if m == 0:
        return out
    global LAST_COMPILED
    if cfg.tma and tma_ok(a_q, w_q):
        LAST_COMPILED = launch_tma(a_q, w_q, out, a_scale, w_scale, bias,
                                   (stride_sam, stride_sak, w_scale.stride(0), w_scale.stride(1)), cfg,
                                   a_per_row=a_per_row, row_scaled=False)
        return out
    if cfg.tma:
        cfg = CONFIGS[DEFAULT_CONFIG]
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    LAST_COMPILED = _gemm_block_scaled_kernel[grid](
        a_q, w_q, out, a_scale, w_scale, bias if bias is not None else out,
        m, n, k, a_q.stride(0), w_q.stride(0), out.stride(0),
        stride_sam, stride_sak, w_scale.stride(0), w_scale.stride(1),
        HAS_BIAS=bias is not None, A_PER_ROW=a_per_row, EVEN_K=k % cfg.block_k == 0,
        OUT_ROUND=interp_round_bits(out_dtype), **cfg.launch_kwargs())
    return out
