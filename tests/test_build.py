"""The compiler on a CPU: capture, passes, dumps, artifact, load, inspect, and its failure modes."""
from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import turbocompile
from turbocompile.build import BuildOptions, build
from turbocompile.cli import main
from turbocompile.errors import ArtifactError, GPUError, PassError
from turbocompile.modeling import example_inputs, random_dit
from turbocompile.passmanager import PassInfo, PassResult
from turbocompile.zoo import get_model


def _eager_output(seed_inputs: int = 7):
    spec = get_model("wan-tiny")
    model = random_dit(spec, seed=0)
    w, h = spec.pixel_size()
    x, t, c = example_inputs(spec, w, h, spec.default_frames, seed=seed_inputs)
    with torch.no_grad():
        return (x, t, c), model(x, t, c, return_dict=False)[0]


def test_plain_build_reproduces_eager(tiny_build_plain: Path):
    engine = turbocompile.load(tiny_build_plain)
    (x, t, c), ref = _eager_output()
    out = engine.expert("main")(x, t, c)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_program_file_holds_the_graph_not_the_weights(tiny_build_plain: Path):
    """The weights live once, in weights.safetensors: program.pt2 must not carry them again as the export's
    sample inputs (it did, doubling every artifact: 15 GB more per A14B expert)."""
    import zipfile

    folder = tiny_build_plain / "experts" / "main"
    with zipfile.ZipFile(folder / "program.pt2") as z:
        samples = sum(i.file_size for i in z.infolist() if "sample_inputs" in i.filename)
    weights = (folder / "weights.safetensors").stat().st_size
    assert weights > 1_000_000 and samples < 1024, (samples, weights)


def test_dumps_for_every_pass(tiny_build_plain: Path):
    manifest = json.loads((tiny_build_plain / "manifest.json").read_text())
    stages = sorted(p.name for p in (tiny_build_plain / "dumps" / "main").iterdir())
    assert stages == ["00_capture"] + [f"{i:02d}_{n}" for i, n in enumerate(manifest["passes"], 1)]
    for s in stages:
        d = tiny_build_plain / "dumps" / "main" / s
        for f in ("graph.txt", "code.py", "summary.json", "diff.txt"):
            assert (d / f).is_file(), f"{s}/{f} missing"
        summary = json.loads((d / "summary.json").read_text())
        assert summary["nodes"] > 0 and summary["ops"]
    graph = (tiny_build_plain / "dumps" / "main" / "00_capture" / "graph.txt").read_text()
    # one line per node with source module: self- and cross-attention are told apart
    assert "aten.scaled_dot_product_attention" in graph
    assert "@ blocks.0.attn1" in graph and "@ blocks.0.attn2" in graph
    removed = json.loads((tiny_build_plain / "dumps" / "main" / "01_remove_noop_ops" / "summary.json").read_text())
    assert removed["rewritten"] > 0
    assert removed["numerics"]["rel_l2"] == 0.0


def test_rope_tables_are_folded(tiny_build_plain: Path):
    summary = json.loads((tiny_build_plain / "dumps" / "main" / "02_fold_constants" / "summary.json").read_text())
    assert summary["rewritten"] >= 2
    graph = (tiny_build_plain / "dumps" / "main" / "02_fold_constants" / "graph.txt").read_text()
    assert "weight folded.blocks.0.attn1" in graph
    assert "aten.arange" not in graph  # the sinusoid frequency table is precomputed too


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_index_html_renders(tiny_build_plain: Path):
    page = (tiny_build_plain / "dumps" / "index.html").read_text()
    parser = _Collector()
    parser.feed(page)
    assert parser.tags.count("table") >= 2 and "svg" in parser.tags and "rect" in parser.tags
    text = "".join(parser.text)
    for name in ("remove_noop_ops", "fold_constants", "eliminate_dead_code", "op histogram"):
        assert name in text


def test_inspect_cli(tiny_build_plain: Path):
    runner = CliRunner()
    r = runner.invoke(main, ["inspect", str(tiny_build_plain)])
    assert r.exit_code == 0, r.output
    assert "fold_constants" in r.output or "fold_con" in r.output
    r = runner.invoke(main, ["inspect", str(tiny_build_plain), "--json"])
    data = json.loads(r.output)
    assert [s["pass"] for s in data["experts"]["main"]][:2] == ["capture", "remove_noop_ops"]
    r = runner.invoke(main, ["inspect", str(tiny_build_plain), "--pass", "capture"])
    assert "aten.scaled_dot_product_attention" in r.output
    r = runner.invoke(main, ["inspect", str(tiny_build_plain), "--diff", "capture", "remove_noop_ops"])
    assert r.output.startswith("--- 00_capture") and "_assert_tensor_metadata" in r.output
    r = runner.invoke(main, ["inspect", str(tiny_build_plain), "--pass", "nope"])
    assert r.exit_code != 0 and "no stage 'nope'" in r.output


def test_broken_pass_fails_build_and_leaves_nothing(tmp_path, monkeypatch):
    import turbocompile.passes as passes

    def break_graph(prog, ctx):
        node = next(n for n in prog.graph.nodes if n.op == "call_function")
        node.args = (node.args[0], "not a tensor") + tuple(node.args[2:])  # shape propagation will fail
        return PassResult(rewritten=1)

    monkeypatch.setattr(passes, "PASSES", passes.PASSES + [PassInfo("break_graph", break_graph, "test")])
    monkeypatch.setitem(passes.BY_NAME, "break_graph", passes.PASSES[-1])
    out = tmp_path / "art"
    with pytest.raises(PassError, match="pass 'break_graph' failed"):
        build(BuildOptions(model="wan-tiny", out=out, passes=["remove_noop_ops", "break_graph"]))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temp directory left either


def test_drift_threshold_fails_build(tmp_path, monkeypatch):
    import turbocompile.passes as passes

    def perturb(prog, ctx):
        node = next(n for n in prog.weight_placeholders() if prog.weights[n.name].ndim == 2)
        prog.weights[node.name] = prog.weights[node.name] * 3.0
        return PassResult(rewritten=1)

    monkeypatch.setitem(passes.BY_NAME, "perturb", PassInfo("perturb", perturb, "test"))
    out = tmp_path / "art"
    with pytest.raises(PassError, match="pass 'perturb' changed the output by relative L2"):
        build(BuildOptions(model="wan-tiny", out=out, passes=["perturb"], verify=True, max_drift=0.01))
    assert not out.exists()


def test_tampered_weights_refused(tiny_build_plain: Path, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_build_plain, copy)
    f = copy / "experts" / "main" / "weights.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        turbocompile.load(copy)


def test_other_schema_and_missing_manifest_refused(tiny_build_plain: Path, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_build_plain, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["schema_version"] = 999
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="schema 999"):
        turbocompile.load(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        turbocompile.load(copy)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_artifact_refused_without_gpu(tiny_build_plain: Path, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_build_plain, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["target"] = "sm_90"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(GPUError, match="built for sm_90"):
        turbocompile.load(copy)


def test_build_cli_errors(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["build", "--model", "wan2.1-t2v-13b", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "did you mean 'wan2.1-t2v-1.3b'" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(main, ["build", "--model", "wan2.1-t2v-1.3b", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "needs --checkpoint" in r.output
    r = runner.invoke(main, ["build", "--model", "wan-tiny", "--frames", "16", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "4k+1" in r.output
    r = runner.invoke(main, ["build", "--model", "wan-tiny", "--gpu", "sm_75", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown --gpu" in r.output
    r = runner.invoke(main, ["build", "--model", "wan-tiny", "--pass-option", "sla.nope=1", "--out",
                             str(tmp_path / "x")])
    assert r.exit_code == 2 and "has no option 'nope'" in r.output
    r = runner.invoke(main, ["build", "--model", "wan-tiny", "--skip-pass", "nope", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown pass 'nope'" in r.output
    assert not (tmp_path / "x").exists()


def test_existing_output_refused(tiny_build_plain: Path):
    runner = CliRunner()
    r = runner.invoke(main, ["build", "--model", "wan-tiny", "--out", str(tiny_build_plain)])
    assert r.exit_code == 2 and "already exists" in r.output
    assert (tiny_build_plain / "manifest.json").exists()


def test_dynamic_frames_build_runs_other_frame_counts(tmp_path):
    art = build(BuildOptions(model="wan-tiny", out=tmp_path / "dyn", dynamic_frames=True,
                             skip_passes=["attention_to_sagesla", "linear_to_w8a8", "fuse_norms"]))
    engine = turbocompile.load(art)
    spec = get_model("wan-tiny")
    model = random_dit(spec, seed=0)
    for frames in (9, 25):  # built at 17
        x, t, c = example_inputs(spec, 160, 96, frames, seed=frames)
        with torch.no_grad():
            ref = model(x, t, c, return_dict=False)[0]
        torch.testing.assert_close(engine.expert("main")(x, t, c), ref, rtol=1e-4, atol=1e-4)


def test_any_tampered_artifact_file_refused(tiny_build_plain: Path, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_build_plain, copy)
    (copy / "experts" / "main" / "program.pt2").write_bytes(b"not a program")
    with pytest.raises(ArtifactError, match="program.pt2 does not match"):
        turbocompile.load(copy)
