"""Programmatic dependent launch (PDL) between the kernels of one op, on Hopper.

An op such as ``sage_sla`` is eight kernels in a row, each reading what the one before wrote. Launched with
``launch_pdl=True``, a kernel may be scheduled while its predecessor in the stream is still finishing; its first
instructions are ``griddepcontrol.wait`` (hold until the predecessor has completed and its writes are visible)
and ``griddepcontrol.launch_dependents`` (let the next kernel be scheduled now). Every kernel launched this way
waits before it reads anything, and a predecessor completes only after its own wait, so each kernel sees all the
earlier ones' results. What it saves is the gap between kernels (launch latency; inside a CUDA graph the
``sage_sla`` op took 1.183 ms against 1.170 ms of kernel time on an H200), not work. Torch's CUDA-graph capture
records the launches as programmatic edges.

On by default where it can run: CUDA tensors on sm_90 or newer, not the Triton interpreter.
``TURBOCOMPILE_PDL=0`` turns it off (:data:`ENABLED`, also what a benchmark flips to compare).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - no Triton, or one without griddepcontrol
    triton = None

from .gluon_hopper import gl, gluon

#: Launch the op kernels with PDL where possible (``TURBOCOMPILE_PDL=0``: never).
ENABLED = os.environ.get("TURBOCOMPILE_PDL", "1") != "0"


def use_pdl(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device get launched with PDL: :data:`ENABLED`, CUDA sm_90+, not interpreted."""
    if not ENABLED or triton is None or not t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return torch.cuda.get_device_capability(t.device)[0] >= 9


def launch_kwargs(pdl: bool) -> dict:
    """Keyword arguments for a kernel launch: the ``PDL`` constexpr and, when on, Triton's ``launch_pdl``."""
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


if triton is not None:

    @triton.jit
    def pdl_enter(PDL: tl.constexpr):
        """First thing in a PDL-launched Triton kernel: wait for the predecessor, then release the successor."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

if gluon is not None:

    @gluon.jit
    def pdl_enter_gluon(PDL: gl.constexpr):
        """The same for a Gluon kernel."""
        if PDL:
            gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                      is_pure=False, pack=1)
