"""Run a test file's interpreter checks in a subprocess with TRITON_INTERPRET=1 (set before triton is imported).

Kernels decide at decoration time whether they are interpreted, and other test files may already have imported
them compiled, so the interpreter checks of tests/test_linear_ops.py and tests/test_norm_ops.py run their own
file as a script (``python FILE OUT.json``) and read the JSON report it writes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_interpreted(test_file: str, out: Path, timeout: int = 600) -> dict:
    """Execute ``test_file`` as a script under the Triton interpreter; returns the report it wrote to ``out``."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, test_file, str(out)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"interpreter checks of {Path(test_file).name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())
