"""Run a test file's interpreter checks in a subprocess with TRITON_INTERPRET=1 (set before triton is imported).

Kernels decide at decoration time whether they are interpreted, and other test files may already have imported
them compiled, so a test file with interpreter checks (test_linear_ops, test_norm_ops, test_rms_norm_rope,
test_block_map) runs itself as a script (``python FILE OUT.json``, ending in :func:`write_report`) and its tests
read the JSON report through the fixture :func:`report_fixture` makes.
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


def report_fixture(test_file: str, name: str, timeout: int = 600):
    """A module-scoped ``interp_report`` fixture: ``test_file``'s interpreter checks, run once, as the dict they
    wrote to ``<tmp>/name`` (skipped without Triton). Assign it to ``interp_report`` in the test module."""
    import pytest

    @pytest.fixture(scope="module")
    def interp_report(tmp_path_factory) -> dict:
        pytest.importorskip("triton", reason="Triton is not installed")
        return run_interpreted(test_file, tmp_path_factory.mktemp("interp") / name, timeout=timeout)

    return interp_report


def write_report(report: dict) -> None:
    """The subprocess side: write a test file's interpreter report to the path ``run_interpreted`` passed."""
    with open(sys.argv[1], "w") as f:
        json.dump(report, f, indent=1)
