"""Does AOTInductor package loading work with this torch build? Run: ``python probe_aoti_load.py [--device cuda]``.

Compiles a two-layer MLP with ``torch._inductor.aoti_compile_and_package`` and loads it in several ways, each in a
child process so a crash (segfault) is reported instead of ending the probe:

- ``fresh``:            load in a new process (what ``turbocompile.load`` of an aoti artifact does)
- ``fresh_cuda_init``:  the same after initialising CUDA first
- ``single_threaded``:  ``aoti_load_package(..., run_single_threaded=True)``
- ``same_process``:     compile and load in one process
- ``loader``:           ``torch._C._aoti.AOTIModelPackageLoader`` directly
- ``fresh_gdb``:        the fresh load under gdb (native backtrace), when it failed and gdb is installed

Prints one line per way: ok / exit status / signal, with the tail of its output.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

CHILD = textwrap.dedent("""
    import faulthandler, sys, torch
    faulthandler.enable()
    way, path, device = sys.argv[1], sys.argv[2], sys.argv[3]

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(64, 128), torch.nn.Linear(128, 32)
        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model = MLP().to(device).eval()
    x = torch.randn(8, 64, device=device)
    if way in ("compile", "same_process"):
        ep = torch.export.export(model, (x,))
        torch._inductor.aoti_compile_and_package(ep, package_path=path)
        print("compiled", path, flush=True)
        if way == "compile":
            sys.exit(0)
    if way == "fresh_cuda_init" and device == "cuda":
        torch.cuda.init(); torch.zeros(1, device="cuda"); torch.cuda.synchronize()
    if way == "loader":
        runner = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1)
        out = runner.run([x])[0]
    else:
        kw = {"run_single_threaded": True} if way == "single_threaded" else {}
        f = torch._inductor.aoti_load_package(path, **kw)
        print("loaded", flush=True)
        out = f(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
    with torch.no_grad():
        err = (out - model(x)).abs().max().item()
    print("max_abs_err", err, flush=True)
    assert err < 1e-3
""")


def run_child(way: str, path: str, device: str, timeout: int, gdb: bool = False) -> dict:
    cmd = [sys.executable, "-c", CHILD, way, path, device]
    if gdb:  # a native backtrace of the crash
        cmd = ["gdb", "-q", "-batch", "-ex", "run", "-ex", "bt 25", "--args"] + cmd
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"way": way, "status": f"timeout {timeout}s", "tail": []}
    rc = proc.returncode
    status = "ok" if rc == 0 else (f"signal {-rc}" if rc < 0 else f"exit {rc}")
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-(30 if gdb else 12):]
    result = {"way": way + ("_gdb" if gdb else ""), "status": status, "tail": tail}
    print(f"{result['way']:16s} {status}", flush=True)
    for line in tail:
        print("    " + line, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--timeout", type=int, default=120)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    print(json.dumps(info), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mlp.pt2")
        results.append(run_child("compile", path, args.device, args.timeout))
        ways = ["fresh", "fresh_cuda_init", "single_threaded", "loader"] if os.path.exists(path) else []
        for way in ways:
            results.append(run_child(way, path, args.device, args.timeout))
        if ways and results[1]["status"] != "ok" and shutil.which("gdb"):
            results.append(run_child("fresh", path, args.device, args.timeout, gdb=True))
        results.append(run_child("same_process", os.path.join(tmp, "mlp2.pt2"), args.device, args.timeout))
    print("summary: " + ", ".join(f"{r['way']}={r['status']}" for r in results), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
