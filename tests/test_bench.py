"""`turbocompile bench`: the plan on CPU (--dry-run), the refusal without a GPU, and the ladder's logic."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from turbocompile.bench.model import RUNGS, bench_model, forward_flops
from turbocompile.cli import main
from turbocompile.zoo import get_model


def test_flop_model_matches_reference_numbers():
    # Wan reference (docs): 14B@720p 6.523 PFLOP, 1.3B@480p 283 TFLOP per forward
    assert forward_flops(get_model("wan2.1-t2v-14b"), 75600) / 1e15 == pytest.approx(6.523, rel=2e-3)
    assert forward_flops(get_model("wan2.1-t2v-1.3b"), 32760) / 1e12 == pytest.approx(283.0, rel=2e-3)


@pytest.mark.parametrize("what", ["kernels", "model", "e2e"])
def test_dry_run_plan(what, tmp_path):
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["bench", what, "--dry-run", "--model", "wan2.1-t2v-14b", "--resolution", "720p",
                                  "--json", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["header"]["gpu"].startswith("none (dry run")
    rows = [row for sec in data["sections"].values() for row in sec]
    assert rows
    if what == "model":
        assert [row["rung"] for row in rows] == RUNGS
    if what == "kernels":
        assert any("sage_sla topk 0.1" == row.get("kernel") for row in rows)
        assert {row.get("K") for row in rows if "K" in row} == {5120, 13824}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_gpu():
    r = CliRunner().invoke(main, ["bench", "model"])
    assert r.exit_code == 2 and "needs a CUDA GPU" in r.output and "--dry-run" in r.output


@pytest.fixture(scope="module")
def full_ladder():
    """The whole ladder on wan-tiny with the CPU reference kernels, run once for the tests that read it."""
    return bench_model(get_model("wan-tiny"), "tiny", repeats=1, dry_run=False, device="cpu", compile=False)


def test_ladder_logic_on_cpu(full_ladder):
    """The ladder end to end on wan-tiny with the CPU reference kernels (timings meaningless, logic real)."""
    rows = full_ladder.sections["ladder wan-tiny@tiny"]
    assert [r["rung"] for r in rows] == RUNGS
    row = {r["rung"]: r for r in rows}
    for r in rows[1:RUNGS.index("+ torch.compile")]:
        assert r["cosine"] > 0.98, r
    assert rows[1]["rel_l2"] < 1e-2  # the clean-up passes do not change the numbers
    # the RoPE written by the norms and the norm+quant fusion change no bit; fusing the projections no number
    assert row["+ RoPE written by the q/k norms"]["rel_l2"] == row["+ fused norms"]["rel_l2"]
    assert abs(row["+ fused q/k/v projections"]["rel_l2"] - row["+ RoPE written by the q/k norms"]["rel_l2"]) < 1e-5
    assert row["+ fp8 input written by the norms"]["rel_l2"] == row["+ W8A8 (auto scheme)"]["rel_l2"]
    assert row["+ GELU in the FFN GEMM's epilogue"]["rel_l2"] == row["+ fp8 input written by the norms"]["rel_l2"]
    assert row["+ residual steps in the GEMMs' epilogues"]["rel_l2"] == row["+ GELU in the FFN GEMM's epilogue"]["rel_l2"]
    assert "skipped" in row["+ torch.compile"]["note"]


def test_ladder_skip_pass_leaves_the_pass_out_and_says_so():
    """`bench model --skip-pass fuse_projections --skip-pass linear_to_w8a8`: the A/B of passes, their rungs
    recorded as skipped, the program still complete (the SageSLA rung still runs); an unknown or unskippable pass
    is one clear error."""
    report = bench_model(get_model("wan-tiny"), "tiny", repeats=1, dry_run=False, device="cpu", compile=False,
                         skip=("fuse_projections", "linear_to_w8a8"))
    rows = report.sections["ladder wan-tiny@tiny"]
    assert [r["rung"] for r in rows] == RUNGS
    row = {r["rung"]: r for r in rows}
    assert row["+ fused q/k/v projections"]["note"] == "skipped (--skip-pass fuse_projections)"
    assert "s/forward" not in row["+ fused q/k/v projections"]
    assert row["+ W8A8 (auto scheme)"]["note"] == "skipped (--skip-pass linear_to_w8a8)"
    assert "s/forward" not in row["+ W8A8 (auto scheme)"]
    assert row["+ SageSLA (topk 0.1)"]["cosine"] > 0.98
    r = CliRunner().invoke(main, ["bench", "model", "--dry-run", "--skip-pass", "attention_to_sagesla"])
    assert r.exit_code != 0 and ("can leave out fuse_norms, fuse_norm_rope, fuse_projections, linear_to_w8a8, "
                                 "fuse_norm_quant, fuse_gelu, fuse_residual") in r.output


def test_ladder_final_only_times_the_ends_and_runs_every_pass(full_ladder):
    """`bench model --final-only`: the rungs in between are recorded as applied but untimed; the last eager rung
    still carries every pass (same numbers as the full ladder's), and the flag is refused outside `bench model`."""
    full = {r["rung"]: r for r in full_ladder.sections["ladder wan-tiny@tiny"]}
    report = bench_model(get_model("wan-tiny"), "tiny", repeats=1, dry_run=False, device="cpu", compile=False,
                         final_only=True)
    assert report.header["command"].endswith("--final-only")
    rows = report.sections["ladder wan-tiny@tiny"]
    assert [r["rung"] for r in rows] == RUNGS
    row = {r["rung"]: r for r in rows}
    for name in RUNGS[1:RUNGS.index("+ SageSLA (topk 0.1)")]:
        assert row[name] == {"rung": name, "note": "applied, not timed (--final-only)"}
    assert row[RUNGS[0]]["s/forward"] > 0
    sla = row["+ SageSLA (topk 0.1)"]
    assert sla["s/forward"] > 0 and sla["rel_l2"] == full["+ SageSLA (topk 0.1)"]["rel_l2"]
    r = CliRunner().invoke(main, ["bench", "e2e", "--dry-run", "--final-only"])
    assert r.exit_code != 0 and "--final-only applies to `bench model` only" in r.output


def test_flex_baseline_is_masked_attention_over_the_lut():
    """The FlexAttention baseline computes exactly softmax attention restricted to SLA's kept blocks."""
    from turbocompile.bench.kernels import flex_block_sparse
    from turbocompile.kernels.block_map import sla_block_map

    g = torch.Generator().manual_seed(3)
    L = 300  # not a multiple of the 128-token block: the tail is masked
    q, k, v = (torch.randn(1, 2, L, 64, generator=g) for _ in range(3))
    out = flex_block_sparse(q, k, v, 0.5)()
    lut = sla_block_map(q, k, 0.5, 128, 128)
    mask = torch.zeros(1, 2, L, L, dtype=torch.bool)
    for h in range(2):
        for qb in range(lut.shape[2]):
            for kb in lut[0, h, qb].tolist():
                mask[0, h, qb * 128:(qb + 1) * 128, kb * 128:(kb + 1) * 128] = True
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_bench_log_keeps_lines_and_rewrites_json_at_each_dump(tmp_path, capsys):
    """Every dump leaves a complete JSON + log, so a benchmark killed by a time limit keeps what it measured."""
    from turbocompile.kernels.benchlog import BenchLog

    res = {"rows": []}
    log = BenchLog(str(tmp_path / "out"), "bench_x", res)
    log.say("first")
    res["rows"].append(1)
    log.dump()
    assert json.loads((tmp_path / "out" / "bench_x.json").read_text()) == {"rows": [1]}
    log.say("second")
    res["sweep"] = [2]
    log.dump()
    assert json.loads((tmp_path / "out" / "bench_x.json").read_text()) == {"rows": [1], "sweep": [2]}
    assert (tmp_path / "out" / "bench_x.log").read_text() == "first\nsecond\n"
    assert capsys.readouterr().out == "first\nsecond\n"
    BenchLog(None, "bench_y", {}).dump()  # no folder: nothing written, no error
    assert not list(tmp_path.glob("**/bench_y*"))


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_graph_rung_marks_the_weights_static_as_the_engine_does(mode, monkeypatch):
    """The CUDA-graph rung must time what the engine runs: weights (graph inputs) marked as static addresses, so a
    replay reads them in place instead of copying each one first (that copy made the rung 1-4% slower than the
    plain compiled one on the GPU). The plain compiled rung leaves them alone. torch.compile is stubbed: only the
    wiring is under test here."""
    from turbocompile.bench import model as bm
    from turbocompile.bench import Report

    marked: list[int] = []
    monkeypatch.setattr(torch._dynamo, "mark_static_address", lambda t: marked.append(id(t)))
    monkeypatch.setattr(torch, "compile", lambda gm, **kw: gm)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)

    class Prog:
        weights = [torch.randn(3), torch.randn(2, 2)]

        def ordered_weights(self):
            return list(self.weights)

        def gm(self, *args):
            return (args[-1] * 2,)

    calls = []
    report = Report("t", {})
    first = bm._compiled_rung(Prog(), (torch.ones(2),), False, lambda name, fn: calls.append((name, fn())),
                              report, "s", mode)
    assert first is not None and calls and torch.equal(calls[0][1], torch.full((2,), 2.0))
    expected = [id(w) for w in Prog.weights] if mode == "reduce-overhead" else []
    assert marked == expected
