"""Drop nodes whose results nobody uses, then the weights nothing reads any more."""
from __future__ import annotations

from turbocompile.passmanager import PassContext, PassResult
from turbocompile.program import Program


def eliminate_dead_code(prog: Program, ctx: PassContext) -> PassResult:
    before = len(prog.graph.nodes)
    prog.graph.eliminate_dead_code()
    freed = prog.drop_unused_weights()
    removed = before - len(prog.graph.nodes)
    res = PassResult(matched=before, rewritten=removed, weight_bytes_changed=freed)
    res.notes.append(f"removed {removed} dead nodes, {freed} bytes of unused weights")
    return res
