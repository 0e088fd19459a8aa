"""Time the Wan2.1 VAE decode of one 81-frame latent on the GPU under a few cuDNN / layout settings.

A warm 1.3B@480p video spends 2.3 s in the VAE decode against 0.79 s of DiT sampling (docs/performance.md), so
this checks the cheap levers before anything is changed in ``turbocompile.pipeline``: cuDNN's algorithm search
(``torch.backends.cudnn.benchmark``) for the decoder's Conv3d shapes, which repeat for every latent frame, and
TF32 for the fp32 parts. Random weights (the speed does not depend on them), bf16 like ``generate()``.

    python examples/vae_decode_bench.py [--width 832 --height 480 --frames 81] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    from diffusers import AutoencoderKLWan

    from turbocompile.pipeline.vae import decode_latents

    torch.manual_seed(0)
    vae = AutoencoderKLWan().to("cuda", torch.bfloat16).eval().requires_grad_(False)
    lat_f = (args.frames - 1) // 4 + 1
    z = torch.randn(1, vae.config.z_dim, lat_f, args.height // 8, args.width // 8, device="cuda")
    rows = []
    base = None
    for name, bench, tf32 in [("default", False, False), ("cudnn.benchmark", True, False),
                              ("cudnn.benchmark + TF32", True, True), ("default again", False, False)]:
        torch.backends.cudnn.benchmark = bench
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        with torch.no_grad():
            decode_latents(vae, z)  # first call: algorithm search when benchmark is on
            times = []
            for _ in range(3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = decode_latents(vae, z)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        base = out if base is None else base
        rows.append({"setting": name, "s": sorted(times)[1], "max_abs_diff_vs_default": (out - base).abs().max().item()})
        print(rows[-1], flush=True)
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "shape": vars(args), "rows": rows,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.out:
        with open(os.path.join(args.out, "vae_decode_bench.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
