"""Gluon's Hopper API for the Gluon kernels, imported in one place, with the shims for names that changed after Triton
3.6 (the GPU image; the CPU dev box has 3.9): the TMA load was ``async_copy_global_to_shared`` and is
``async_load``; a shared-memory view's ``_reinterpret`` became ``reinterpret`` (called here as ``reinterpret(view,
dtype, shape, layout)``); the CTA barrier ``gl.thread_barrier`` became ``gl.barrier``. Without Triton or without
Gluon's Hopper API every name is None and the kernels' modules report themselves unavailable.

Also the two things every Gluon kernel module needs around its kernel: whether it can run here (:func:`on_hopper`)
and a compile for sm_90a without a GPU for its tests (:func:`compile_for_sm90a`)."""
from __future__ import annotations

import os

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    reinterpret = (getattr(gl.shared_memory_descriptor, "reinterpret", None)
                   or gl.shared_memory_descriptor._reinterpret)
    thread_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
except ImportError:  # pragma: no cover - no Triton, or a Triton without Gluon's Hopper API
    gluon = gl = fence_async_shared = mbarrier = tma = warpgroup_mma = warpgroup_mma_wait = None
    TensorDescriptor = tma_load = reinterpret = thread_barrier = None

__all__ = ["gluon", "gl", "fence_async_shared", "mbarrier", "tma", "warpgroup_mma", "warpgroup_mma_wait",
           "TensorDescriptor", "tma_load", "reinterpret", "thread_barrier", "on_hopper", "compile_for_sm90a"]


def on_hopper(device: torch.device | None = None) -> bool:
    """Whether Gluon's Hopper kernels can run on ``device`` (the current GPU by default): Gluon's Hopper API
    imports, this is not the CPU interpreter, and the GPU is sm_90."""
    if gluon is None or os.environ.get("TRITON_INTERPRET", "0") == "1" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) == (9, 0)


def compile_for_sm90a(kernel, sig: dict, consts: dict, aligned):
    """Compile the Gluon ``kernel`` for sm_90a without a GPU (tests read its PTX, and ``ptxas -v`` on that PTX its
    registers, spills and wgmma-serialization warnings, before any device time is spent).

    ``sig`` types the arguments that are neither constexprs (the keys of ``consts``, which must hold
    ``num_warps``) nor i32; ``aligned`` names those declared divisible by 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = kernel.arg_names
    sig = {name: sig.get(name, "constexpr" if name in consts else "i32") for name in names}
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    return triton.compile(GluonASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": consts["num_warps"]})
