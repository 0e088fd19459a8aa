"""Kernel benchmarks at one model's shapes: attention, GEMMs, norms, each against its baseline."""
from __future__ import annotations

import torch

from ..zoo import ModelSpec
from . import Report, attention_flops, cuda_time, environment, rel_err

TOPKS = (0.05, 0.1, 0.15)


def _structured_qkv(b: int, h: int, L: int, d: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Gaussian plus a low-rank shared component, so attention is peaked as in real video models."""
    g = torch.Generator(device=device).manual_seed(seed)
    base = torch.randn(b, h, 16, d, device=device, generator=g)
    mix = torch.randn(b, h, L, 16, device=device, generator=g).softmax(-1)

    def one():
        return (torch.randn(b, h, L, d, device=device, generator=g) + 3.0 * (mix @ base)).to(dtype)

    return one(), one(), one()


def _exact_rows(q, k, v, rows: torch.Tensor) -> torch.Tensor:
    """fp32 attention for a subset of query rows (the full L x L reference would not fit)."""
    qs = q[:, :, rows].float()
    s = (qs @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return s.softmax(-1) @ v.float()


def flex_block_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: float, blk: int = 128):
    """The FlexAttention baseline: bf16 block-sparse attention over SLA's top-k LUT (128x128 blocks; the
    padded tail is masked). Returns a function that runs only the attention kernel (map built once)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from turbocompile.kernels.block_map import sla_block_map

    L = q.shape[2]
    lut = sla_block_map(q, k, topk, blk, blk)  # [B, H, Mq, T] int32, ascending
    b, h, mq, t = lut.shape
    nk = -(-k.shape[2] // blk)
    kv_indices = torch.zeros(b, h, mq, nk, dtype=torch.int32, device=q.device)
    kv_indices[..., :t] = lut
    kv_num = torch.full((b, h, mq), t, dtype=torch.int32, device=q.device)

    def in_range(b_, h_, q_idx, kv_idx):
        return kv_idx < L

    mask = BlockMask.from_kv_blocks(kv_num, kv_indices, BLOCK_SIZE=blk, mask_mod=in_range, seq_lengths=(L, L))
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, k, v, block_mask=mask)


def bench_attention(report: Report, spec: ModelSpec, L: int, repeats: int, dry_run: bool) -> None:
    import turbocompile.kernels as K

    K.load_ops()
    ops = torch.ops.turbocompile
    b, h, d = 1, spec.dit.num_heads, spec.dit.head_dim
    flops = attention_flops(b, h, L, L, d)
    section = f"attention (B=1, H={h}, L={L}, D={d})"
    if dry_run:
        for name in ("cuDNN SDPA bf16", "FLASH SDPA bf16", "sage_attention"):
            report.add(section, {"kernel": name, "dense TFLOP": flops / 1e12})
        for k in TOPKS:
            report.add(section, {"kernel": f"sage_sla topk {k}", "dense TFLOP": flops / 1e12})
            report.add(section, {"kernel": f"sla (bf16) topk {k}", "dense TFLOP": flops / 1e12})
            report.add(section, {"kernel": f"FlexAttention bf16 block-sparse topk {k}", "dense TFLOP": flops / 1e12})
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _structured_qkv(b, h, L, d, "cuda", torch.bfloat16)
    rows = torch.randint(0, L, (256,), device="cuda")
    exact = _exact_rows(q, k, v, rows)

    def sdpa(backend):
        def f():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return f

    from turbocompile.kernels.sage_attention import sage_kernel_for

    sage = f"({sage_kernel_for(q, 64, 128)} kernel)"  # Gluon on sm_90, Triton elsewhere
    base_t = None
    for name, fn in [("cuDNN SDPA bf16", sdpa(SDPBackend.CUDNN_ATTENTION)),
                     ("FLASH SDPA bf16", sdpa(SDPBackend.FLASH_ATTENTION)),
                     (f"sage_attention {sage}", lambda: ops.sage_attention(q, k, v, 64, 128))]:
        out = fn()
        t = cuda_time(fn, repeats)
        base_t = base_t or t
        err = rel_err(out[:, :, rows], exact)
        report.add(section, {"kernel": name, "ms": t * 1e3, "TFLOP/s": flops / t / 1e12,
                             "speedup vs cuDNN": base_t / t, **err})
    pw = torch.randn(d, d, device="cuda", dtype=torch.bfloat16) * d ** -0.5
    pb = torch.randn(d, device="cuda", dtype=torch.bfloat16) * 0.1
    for topk in TOPKS:
        for name, op in (("sage_sla", ops.sage_sla), ("sla (bf16)", ops.sla)):
            fn = (lambda op=op, topk=topk: op(q, k, v, pw, pb, topk, 64, 128))
            out = fn()
            t = cuda_time(fn, repeats)
            report.add(section, {"kernel": f"{name} topk {topk}" + (f" {sage}" if name == "sage_sla" else ""),
                                 "ms": t * 1e3,
                                 "TFLOP/s": flops / t / 1e12, "speedup vs cuDNN": base_t / t,
                                 "note": "block map + linear branch included; effective TFLOP/s"})
            del out
        try:
            fn = flex_block_sparse(q, k, v, topk)
            fn()
            t = cuda_time(fn, repeats)
            report.add(section, {"kernel": f"FlexAttention bf16 block-sparse topk {topk}", "ms": t * 1e3,
                                 "TFLOP/s": flops / t / 1e12, "speedup vs cuDNN": base_t / t,
                                 "note": "kernel only (block map built once, no linear branch)"})
        except Exception as exc:  # noqa: BLE001 - a baseline that fails to compile is reported, not fatal
            report.add(section, {"kernel": f"FlexAttention topk {topk}", "note": f"failed: {exc}"[:200]})


def bench_gemms(report: Report, spec: ModelSpec, M: int, repeats: int, dry_run: bool) -> None:
    from turbocompile.kernels import linear_w8a8

    d, f = spec.dit.dim, spec.dit.ffn_dim
    shapes = [(d, d), (d, f), (f, d)]  # (K, N)
    section = f"linear layers (M={M}; activation quantization included)"
    for K_, N in shapes:
        flops = 2.0 * M * K_ * N
        if dry_run:
            report.add(section, {"K": K_, "N": N, "TFLOP": flops / 1e12,
                                 "schemes": "bf16, " + ", ".join(linear_w8a8.SCHEMES)})
            continue
        x = torch.randn(M, K_, device="cuda", dtype=torch.bfloat16)
        x[:, :: max(1, K_ // 16)] *= 8.0  # outlier channels
        w = torch.randn(N, K_, device="cuda", dtype=torch.bfloat16) * K_ ** -0.5
        bias = torch.randn(N, device="cuda", dtype=torch.bfloat16) * 0.1
        ref_fn = (lambda: torch.nn.functional.linear(x, w, bias))
        ref = ref_fn()
        t0 = cuda_time(ref_fn, repeats)
        report.add(section, {"K": K_, "N": N, "scheme": "cuBLAS bf16", "ms": t0 * 1e3,
                             "TFLOP/s": flops / t0 / 1e12, "speedup": 1.0})
        variants = [(scheme, None) for scheme in linear_w8a8.SCHEMES]
        if linear_w8a8.GEMM_BACKENDS["int8-block"] != "triton":
            variants.insert(1, ("int8-block", "triton"))  # the all-Triton path, for comparison
        # PyTorch's own 8-bit GEMMs behind our quantizers: torch._int_mm (+ a torch epilogue for the scales)
        # and torch._scaled_mm with per-row / per-channel scales
        variants += [(s_, "cublas") for s_ in ("int8-row", "fp8-row") if linear_w8a8.GEMM_BACKENDS[s_] != "cublas"]
        for scheme, backend in variants:
            qw = linear_w8a8.quantize_weight(w, scheme)
            if backend is None:
                op = linear_w8a8.SCHEMES[scheme]
                fn = (lambda op=op, qw=qw: op(x, qw["w_q"], qw["w_scale"], bias))
            else:
                fn = (lambda qw=qw, scheme=scheme, backend=backend: linear_w8a8.cuda_linear(
                    x, qw["w_q"], qw["w_scale"], bias, scheme, backend=backend))
            out = fn()
            t = cuda_time(fn, repeats)
            gemm = {"cublas": "torch._int_mm" if scheme.startswith("int8") else "torch._scaled_mm"}.get(backend, backend)
            name = scheme if backend is None else f"{scheme} ({gemm} GEMM)"
            report.add(section, {"K": K_, "N": N, "scheme": name, "ms": t * 1e3, "TFLOP/s": flops / t / 1e12,
                                 "speedup": t0 / t, **rel_err(out, ref)})
        del x, w, ref


def bench_norms(report: Report, spec: ModelSpec, L: int, repeats: int, dry_run: bool) -> None:
    import turbocompile.kernels as K

    K.load_ops()
    d = spec.dit.dim
    section = f"norms (L={L}, D={d}, bf16)"
    nbytes = 2 * 2 * L * d  # read x, write y (bf16)
    if dry_run:
        report.add(section, {"kernel": "layernorm_modulate", "GB moved": nbytes / 1e9})
        return
    x = torch.randn(1, L, d, device="cuda", dtype=torch.bfloat16)
    shift = torch.randn(1, 1, d, device="cuda") * 0.1
    scale = torch.randn(1, 1, d, device="cuda") * 0.1
    big = torch.empty(2**28, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(big)
    t_copy = cuda_time(lambda: dst.copy_(big), repeats)
    copy_bw = 2 * big.numel() / t_copy
    report.add(section, {"kernel": "device copy (1 GiB read+write)", "GB/s": copy_bw / 1e9})

    def eager():
        return (torch.nn.functional.layer_norm(x.float(), (d,), eps=1e-6) * (1 + scale) + shift).to(x.dtype)

    ref = eager()
    for name, fn in [("eager LayerNorm+modulate", eager),
                     ("layernorm_modulate", lambda: torch.ops.turbocompile.layernorm_modulate(x, shift, scale, 1e-6))]:
        out = fn()
        t = cuda_time(fn, repeats)
        report.add(section, {"kernel": name, "ms": t * 1e3, "GB/s": nbytes / t / 1e9,
                             "% of copy": 100 * nbytes / t / copy_bw, **rel_err(out, ref)})


def bench_kernels(spec: ModelSpec, resolution: str, repeats: int, dry_run: bool) -> Report:
    w, h = spec.pixel_size(resolution)
    L = spec.num_tokens(w, h, spec.default_frames)
    report = Report(f"kernels at {spec.id}@{resolution} ({L} tokens)", environment(dry_run))
    report.header["command"] = f"turbocompile bench kernels --model {spec.id} --resolution {resolution}"
    bench_attention(report, spec, L, repeats, dry_run)
    bench_gemms(report, spec, L, repeats, dry_run)
    bench_norms(report, spec, L, repeats, dry_run)
    return report
