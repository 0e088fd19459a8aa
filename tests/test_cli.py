"""The CLI end to end on wan-tiny: models, generate (both samplers), convert, and its one-line errors."""
from __future__ import annotations

import sys
from pathlib import Path

import imageio.v3 as iio
from click.testing import CliRunner

from turbocompile.cli import main
from turbocompile.modeling import random_dit
from turbocompile.zoo import get_model

sys.path.insert(0, str(Path(__file__).parent))
from ckpt_factory import write_official  # noqa: E402


def test_models_list_and_info():
    r = CliRunner().invoke(main, ["models"])
    assert r.exit_code == 0 and "wan2.2-i2v-a14b" in r.output and "wan-tiny" in r.output
    r = CliRunner().invoke(main, ["models", "info", "wan2.1-t2v-1.3b"])
    assert r.exit_code == 0
    assert "32,760" in r.output and "1,418,996,800" in r.output and "int8" in r.output


def test_generate_rcm_and_unipc(tiny_build_plain: Path, tmp_path):
    runner = CliRunner()
    out = tmp_path / "rcm.mp4"
    r = runner.invoke(main, ["generate", str(tiny_build_plain), "--prompt", "a fox", "--steps", "2",
                             "--dense-steps", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    frames = iio.imread(out)
    assert frames.shape[0] == 17 and frames.shape[1:3] == (96, 160)
    assert "steps_s" in r.output or "step" in r.output
    out2 = tmp_path / "unipc.mp4"
    r = runner.invoke(main, ["generate", str(tiny_build_plain), "--prompt", "a fox", "--sampler", "unipc",
                             "--steps", "2", "--out", str(out2)])
    assert r.exit_code == 0, r.output
    assert out2.exists()


def test_generate_errors_are_one_line(tiny_build_plain: Path, tmp_path):
    runner = CliRunner()
    out = tmp_path / "x.mp4"
    r = runner.invoke(main, ["generate", str(tiny_build_plain), "--prompt", "a fox", "--steps", "5", "--out", str(out)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "1 to 4 steps, got 5" in r.output and "--sampler unipc" in r.output
    r = runner.invoke(main, ["generate", str(tiny_build_plain), "--prompt", "a fox", "--image", str(tmp_path / "i.png"),
                             "--out", str(out)])
    assert r.exit_code == 2 and "takes no image" in r.output
    r = runner.invoke(main, ["generate", str(tmp_path / "nope"), "--prompt", "a fox", "--out", str(out)])
    assert r.exit_code == 2 and "not an artifact directory" in r.output
    r = runner.invoke(main, ["generate", str(tiny_build_plain), "--prompt", "a fox", "--steps", "2",
                             "--dense-steps", "3", "--out", str(out)])
    assert r.exit_code == 2 and "--dense-steps must be between 0 and the 2 steps, got 3" in r.output
    r = runner.invoke(main, ["generate", str(tiny_build_plain), "--prompt", "a fox", "--cuda-graphs", "--out", str(out)])
    assert r.exit_code == 2 and "--cuda-graphs needs a CUDA device" in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_convert_cli(tmp_path):
    model = random_dit(get_model("wan-tiny"), seed=1)
    src = write_official(model, tmp_path / "official")
    runner = CliRunner()
    r = runner.invoke(main, ["convert", str(src), str(tmp_path / "diff"), "--to", "diffusers"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "diff" / "transformer" / "config.json").exists()
    r = runner.invoke(main, ["convert", str(tmp_path / "missing"), str(tmp_path / "d2"), "--to", "diffusers"])
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_generate_other_frame_count_needs_a_dynamic_build(tiny_build_plain: Path, tmp_path):
    from turbocompile.build import BuildOptions, build

    runner = CliRunner()
    r = runner.invoke(main, ["generate", str(tiny_build_plain), "--prompt", "a fox", "--frames", "9",
                             "--out", str(tmp_path / "a.mp4")])
    assert r.exit_code == 2 and "built for 17 frames, not 9" in r.output and "--dynamic-frames" in r.output
    art = build(BuildOptions(model="wan-tiny", out=tmp_path / "dyn", dynamic_frames=True))
    out = tmp_path / "b.mp4"
    r = runner.invoke(main, ["generate", str(art), "--prompt", "a fox", "--frames", "9", "--steps", "1",
                             "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert iio.imread(out).shape[0] == 9


def test_gpu_out_of_memory_is_one_line(tiny_build_plain: Path, tmp_path, monkeypatch):
    """A CUDA OOM anywhere in a command becomes one line that says what to do, exit code 2, no mp4 left."""
    import torch

    import turbocompile.pipeline  # noqa: F401 - the package's `generate` function shadows the module's name
    gen = sys.modules["turbocompile.pipeline.generate"]

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 MiB. GPU 0 has ...")

    monkeypatch.setattr(gen, "sample_rcm", oom)
    out = tmp_path / "x.mp4"
    r = CliRunner().invoke(main, ["generate", str(tiny_build_plain), "--prompt", "a fox", "--out", str(out)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "the GPU ran out of memory (CUDA out of memory)" in r.output and "--gpu-memory-budget" in r.output
    assert not out.exists()
