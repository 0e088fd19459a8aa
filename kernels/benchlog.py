"""The record a kernel benchmark keeps: each line printed and kept, and the result dict rewritten to
``<stem>.json`` with the lines in ``<stem>.log`` at every :meth:`BenchLog.dump`, so a run cut short by the device's
time limit still leaves everything it measured (the norms sweep of 2026-11-26 was lost that way: it was only
printed)."""
from __future__ import annotations

import json
import os
from typing import Any


class BenchLog:
    """``say`` prints and keeps a line; ``dump`` writes ``res`` and the lines under ``out_dir`` (if given)."""

    def __init__(self, out_dir: str | None, stem: str, res: dict[str, Any]):
        self.out_dir, self.stem, self.res = out_dir, stem, res
        self.lines: list[str] = []

    def say(self, msg: str) -> None:
        self.lines.append(msg)
        print(msg, flush=True)  # noqa: T201 - benchmark entry points report as they go

    def dump(self) -> None:
        if not self.out_dir:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"{self.stem}.json"), "w") as f:
            json.dump(self.res, f, indent=1)
        with open(os.path.join(self.out_dir, f"{self.stem}.log"), "w") as f:
            f.write("\n".join(self.lines) + "\n")
