"""Gluon's Hopper API for the Gluon kernels, imported in one place, with the shims for names that changed after Triton
3.6 (the GPU image; the CPU dev box has 3.9): the TMA load was ``async_copy_global_to_shared`` and is
``async_load``; a shared-memory view's ``_reinterpret`` became ``reinterpret`` (called here as ``reinterpret(view,
dtype, shape, layout)``); the CTA barrier ``gl.thread_barrier`` became ``gl.barrier``. Without Triton or without
Gluon's Hopper API every name is None and the kernels' modules report themselves unavailable."""
from __future__ import annotations

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
           "TensorDescriptor", "tma_load", "reinterpret", "thread_barrier"]
