"""Summarise an Nsight Compute source page: where each kernel's warps wait, by stall reason and by SASS line.

Usage (on the GPU machine, after ``ncu --set full --import-source yes -o REPORT ...``):

    ncu -i REPORT.ncu-rep --page source --print-source sass --csv > source.csv
    python examples/ncu_stalls.py source.csv [KERNEL_NAME_SUBSTRING] [--top 30]

Prints, per profiled launch, the share of warp samples per stall reason and the SASS instructions with the most
samples (their top three reasons). That is how the tile-table preload in ``sage_attention_gluon`` was found: the
warps sat in long-scoreboard waits right after the loop's scalar loads (docs/kernels-attention.md).
"""
from __future__ import annotations

import argparse
import collections
import csv


def read_launches(path: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """(kernel name, header, rows) per profiled launch of an ``ncu --page source --csv`` dump."""
    launches: list[tuple[str, list[str], list[list[str]]]] = []
    with open(path, newline="") as f:
        for line in csv.reader(f):
            if not line:
                continue
            if line[0] == "Kernel Name":
                launches.append((line[1], [], []))
            elif line[0] == "Address" and launches:
                launches[-1][1].extend(line)
            elif launches:
                launches[-1][2].append(line)
    return launches


def summarise(name: str, header: list[str], rows: list[list[str]], top: int) -> str:
    col = {h: i for i, h in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    samples = col["Warp Stall Sampling (All Samples)"]

    def num(row: list[str], i: int) -> int:
        return int(row[i]) if row[i].isdigit() else 0

    total = sum(num(r, samples) for r in rows) or 1
    by_reason = collections.Counter({s: sum(num(r, col[s]) for r in rows) for s in reasons})
    out = [f"{name}: {len(rows)} SASS instructions, {total} warp samples"]
    out += [f"  {s[6:]:20s} {v:8d} {100 * v / total:5.1f}%" for s, v in by_reason.most_common() if v]
    out.append(f"  top {top} instructions by samples:")
    for r in sorted(rows, key=lambda r: -num(r, samples))[:top]:
        why = sorted(((num(r, col[s]), s[6:]) for s in reasons), reverse=True)[:3]
        out.append(f"    {r[0][-5:]} {r[1].strip()[:58]:58s} {num(r, samples):6d} "
                   + " ".join(f"{s}={v}" for v, s in why if v))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("kernel", nargs="?", default="", help="only launches whose name contains this")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    for name, header, rows in read_launches(args.csv):
        if args.kernel in name and header:
            print(summarise(name, header, rows, args.top), "\n")


if __name__ == "__main__":
    main()
