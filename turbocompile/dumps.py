"""Per-pass dumps: the readable graph, the Python code, a summary, a diff, and one HTML page to walk them.

Layout: ``dumps/<expert>/NN_<pass>/{graph.txt, code.py, summary.json, diff.txt}`` and ``dumps/index.html``.
``graph.txt`` has one line per node: ``name = target(args) :: shape dtype @ source module``.
"""
from __future__ import annotations

import difflib
import html
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch.fx as fx

from .program import Program


def _fmt_arg(a: Any) -> str:
    if isinstance(a, fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]"
    if isinstance(a, float):
        return f"{a:.6g}"
    return repr(a)


def _fmt_val(node: fx.Node) -> str:
    val = node.meta.get("val")
    if val is None:
        return ""
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(_fmt_one(v) for v in val) + ")"
    return _fmt_one(val)


def _fmt_one(v: Any) -> str:
    shape = getattr(v, "shape", None)
    if shape is None:
        return type(v).__name__
    dims = "x".join(str(d) for d in shape)
    return f"{dims} {str(getattr(v, 'dtype', '')).replace('torch.', '')}"


def op_name(node: fx.Node) -> str:
    if node.op == "call_function":
        t = node.target
        name = getattr(t, "__name__", str(t))
        pkt = getattr(t, "_overloadpacket", None)
        if pkt is not None:
            ns = getattr(t, "namespace", "aten")
            return f"{ns}.{pkt.__name__}"
        return name
    return node.op


def graph_text(prog: Program) -> str:
    lines = []
    for n in prog.graph.nodes:
        if n.op == "placeholder":
            kind = "weight " + prog.key_of(n) if n.name in prog.weights else "input"
            lines.append(f"{n.name} = placeholder[{kind}] :: {_fmt_val(n)}")
        elif n.op == "output":
            lines.append(f"return {_fmt_arg(n.args[0])}")
        else:
            args = ", ".join([_fmt_arg(a) for a in n.args] + [f"{k}={_fmt_arg(v)}" for k, v in n.kwargs.items()])
            src = n.meta.get("source_module", "")
            lines.append(f"{n.name} = {op_name(n)}({args}) :: {_fmt_val(n)}" + (f" @ {src}" if src else ""))
    return "\n".join(lines) + "\n"


def op_histogram(prog: Program) -> dict[str, int]:
    c = Counter(op_name(n) for n in prog.graph.nodes if n.op == "call_function")
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def _stage_dir(root: Path, index: int, name: str) -> Path:
    return root / f"{index:02d}_{name}"


def write_stage(root: Path, rec: Any, prog: Program, prev_text: str | None, text: str | None = None) -> Path:
    text = text if text is not None else graph_text(prog)
    d = _stage_dir(root, rec.index, rec.name)
    d.mkdir(parents=True, exist_ok=True)
    (d / "graph.txt").write_text(text)
    (d / "code.py").write_text(prog.gm.code)
    diff = "" if prev_text is None else "".join(
        difflib.unified_diff(prev_text.splitlines(True), text.splitlines(True), "before", "after", n=1)
    )
    (d / "diff.txt").write_text(diff)
    summary = {
        "index": rec.index,
        "pass": rec.name,
        "seconds": round(rec.seconds, 4),
        "nodes": rec.node_count,
        "ops": op_histogram(prog),
        "matched": rec.result.matched,
        "rewritten": rec.result.rewritten,
        "weight_bytes_changed": rec.result.weight_bytes_changed,
        "notes": rec.result.notes,
        "extra": rec.result.extra,
        "weight_bytes_by_dtype": prog.weight_bytes_by_dtype(),
        "numerics": rec.numerics.as_dict() if rec.numerics else None,
    }
    (d / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return d


def read_stages(expert_dir: Path) -> list[dict[str, Any]]:
    """The summaries of every stage of one expert, in order."""
    out = []
    for d in sorted(p for p in expert_dir.iterdir() if p.is_dir()):
        s = d / "summary.json"
        if s.exists():
            item = json.loads(s.read_text())
            item["dir"] = d.name
            out.append(item)
    return out


# -- HTML ------------------------------------------------------------------------------------------

def block_svg(prog: Program, block: str = "blocks.0") -> str:
    """An SVG of one transformer block's subgraph: nodes in dependency layers, edges between them."""
    nodes = [n for n in prog.graph.nodes if n.op == "call_function"
             and (n.meta.get("source_module", "") + ".").startswith(block + ".")]
    keep = {n for n in nodes if op_name(n) not in ("getitem", "aten._assert_tensor_metadata")}
    depth: dict[fx.Node, int] = {}
    for n in prog.graph.nodes:
        if n in keep:
            ins = [a for a in n.all_input_nodes if a in keep]
            depth[n] = 1 + max((depth[a] for a in ins), default=-1)
    layers: dict[int, list[fx.Node]] = {}
    for n, dpt in depth.items():
        layers.setdefault(dpt, []).append(n)
    bw, bh, gx, gy = 150, 22, 12, 18
    pos = {}
    width = max((len(v) for v in layers.values()), default=1) * (bw + gx) + gx
    for dpt, ns in layers.items():
        for i, n in enumerate(ns):
            pos[n] = (gx + i * (bw + gx), gy + dpt * (bh + gy))
    height = (max(layers, default=0) + 1) * (bh + gy) + gy
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="monospace" font-size="10">']
    for n, (x, y) in pos.items():
        for a in n.all_input_nodes:
            if a in pos:
                ax, ay = pos[a]
                parts.append(f'<line x1="{ax + bw / 2}" y1="{ay + bh}" x2="{x + bw / 2}" y2="{y}" '
                             'stroke="#999" stroke-width="1"/>')
    for n, (x, y) in pos.items():
        op = op_name(n)
        color = "#ffd6a5" if op.startswith("turbocompile.") else ("#caffbf" if "attention" in op else "#e0e7ff")
        label = html.escape(op.replace("aten.", "")[:22])
        parts.append(f'<g><title>{html.escape(n.name)} @ {html.escape(n.meta.get("source_module", ""))}</title>'
                     f'<rect x="{x}" y="{y}" width="{bw}" height="{bh}" rx="4" fill="{color}" stroke="#555"/>'
                     f'<text x="{x + 4}" y="{y + 15}">{label}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def write_index(dumps_root: Path, title: str, svgs: dict[str, str]) -> Path:
    """``dumps/index.html``: per expert, a table of passes, each stage's op histogram and diff, a block picture."""
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>"]
    for expert_dir in sorted(p for p in dumps_root.iterdir() if p.is_dir()):
        stages = read_stages(expert_dir)
        body.append(f'<h2 id="{esc(expert_dir.name)}">expert: {esc(expert_dir.name)}</h2>')
        body.append("<table><tr><th>#</th><th>pass</th><th>nodes</th><th>matched</th><th>rewritten</th>"
                    "<th>weight bytes changed</th><th>rel L2</th><th>cosine</th><th>seconds</th></tr>")
        for s in stages:
            num = s.get("numerics") or {}
            body.append(
                f'<tr><td>{s["index"]}</td><td><a href="#{esc(expert_dir.name)}-{esc(s["dir"])}">{esc(s["pass"])}</a></td>'
                f'<td>{s["nodes"]}</td><td>{s["matched"]}</td><td>{s["rewritten"]}</td>'
                f'<td>{s["weight_bytes_changed"]}</td><td>{num.get("rel_l2", "")}</td>'
                f'<td>{num.get("cosine", "")}</td><td>{s["seconds"]}</td></tr>')
        body.append("</table>")
        if expert_dir.name in svgs:
            body.append("<h3>one transformer block after the last pass (blocks.0)</h3>")
            body.append(f'<div class="svg">{svgs[expert_dir.name]}</div>')
        for s in stages:
            diff = (expert_dir / s["dir"] / "diff.txt").read_text()
            hist = "".join(f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in s["ops"].items())
            notes = "".join(f"<li>{esc(str(n))}</li>" for n in s.get("notes", []))
            body.append(
                f'<h3 id="{esc(expert_dir.name)}-{esc(s["dir"])}">{esc(s["dir"])}</h3>'
                f"<ul>{notes}</ul>"
                f'<details><summary>op histogram</summary><table>{hist}</table></details>'
                f'<details><summary>diff against the previous stage ({diff.count(chr(10))} lines)</summary>'
                f"<pre>{esc(diff[:200000])}</pre></details>"
                f'<p><a href="{esc(expert_dir.name)}/{esc(s["dir"])}/graph.txt">graph.txt</a> · '
                f'<a href="{esc(expert_dir.name)}/{esc(s["dir"])}/code.py">code.py</a></p>')
    page = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>"
            + esc(title) + "</title><style>body{font-family:sans-serif;margin:2em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px}"
            "pre{background:#f6f6f6;padding:1em;overflow:auto;max-height:40em}.svg{overflow:auto}</style>"
            "</head><body>" + "".join(body) + "</body></html>")
    path = dumps_root / "index.html"
    path.write_text(page)
    return path
