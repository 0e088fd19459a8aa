"""Reading a kernel compiled for sm_90a on the CPU: Triton's bundled ``cuobjdump`` on its cubin."""
from __future__ import annotations

import os
import subprocess
import tempfile


def cuobjdump(kernel, *flags: str) -> list[str] | None:
    """``cuobjdump FLAG cubin`` for each of ``flags`` (e.g. ``-sass``, ``--dump-resource-usage``) on the compiled
    ``kernel``'s cubin, one output per flag; None when this Triton ships no cuobjdump (the caller skips)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return [subprocess.run([tool, flag, f.name], capture_output=True, text=True, timeout=120).stdout
                for flag in flags]
