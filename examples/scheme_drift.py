"""Whole-forward drift of each W8A8 scheme on wan2.1-t2v-1.3b (random weights), on the CPU.

Captures the full-size 1.3B DiT once, runs the clean-up passes, then for each scheme applies only
``linear_to_w8a8`` to a fresh capture and compares one forward with the fp32 program and with the same program
in bf16 (relative L2 and cosine of the output). The CPU path runs each op's PyTorch reference, which quantizes
exactly as the GPU kernels do, so the drift is the scheme's, not a kernel's. A short clip (5 frames = 2 latent
frames, 3120 tokens) keeps it to minutes on a small CPU; the error is per token and does not depend on L.

    python examples/scheme_drift.py [--frames 5] [--schemes int8-block,int8-row,fp8-row,fp8-block]
"""
from __future__ import annotations

import argparse
import time

import torch

from turbocompile.modeling import example_inputs, random_dit
from turbocompile.passes import BY_NAME
from turbocompile.passmanager import PassContext, PassManager
from turbocompile.program import capture
from turbocompile.targets import get_target
from turbocompile.zoo import get_model

CLEANUP = ("remove_noop_ops", "fold_constants", "eliminate_dead_code")


def compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    a, b = out.double().flatten(), ref.double().flatten()
    return ((a - b).norm() / b.norm()).item(), torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--schemes", default="int8-block,int8-row,fp8-row,fp8-block")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    spec = get_model("wan2.1-t2v-1.3b")
    inputs = example_inputs(spec, 832, 480, args.frames, seed=1)
    print(f"wan2.1-t2v-1.3b, random weights (seed 0), 832x480x{args.frames} = "
          f"{spec.num_tokens(832, 480, args.frames)} tokens, torch {torch.__version__}, CPU")
    model = random_dit(spec, seed=0)

    def program(*passes: str):
        prog = capture(model, inputs)
        ctx = PassContext(spec=spec, target=get_target("cpu"), options={"linear_to_w8a8": {"scheme": scheme}})
        PassManager([BY_NAME[n] for n in CLEANUP + passes], ctx, inputs).run(prog)
        return prog

    scheme = "bf16"
    t0 = time.perf_counter()
    ref = program()(*inputs)
    print(f"fp32 reference forward: {time.perf_counter() - t0:.0f} s")
    bf16 = model.to(torch.bfloat16)(*(v.to(torch.bfloat16) if v.is_floating_point() and v.ndim > 1 else v
                                      for v in inputs), return_dict=False)[0]
    model.float()
    rel, cos = compare(bf16, ref)
    print(f"| scheme | rel L2 vs fp32 | cosine vs fp32 |\n|---|---|---|\n| bf16 (diffusers model) | {rel:.4f} | {cos:.6f} |")
    for scheme in args.schemes.split(","):
        out = program("linear_to_w8a8")(*inputs)
        rel, cos = compare(out, ref)
        print(f"| {scheme} | {rel:.4f} | {cos:.6f} |", flush=True)


if __name__ == "__main__":
    main()
