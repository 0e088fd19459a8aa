"""Checkpoint conversion: bit-exact round trips, diffusers-loadable output, sharding, atomic writes."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from ckpt_factory import official_state_dict, turbodiffusion_state_dict, write_official, write_turbodiffusion
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from turbocompile.checkpoints import convert_checkpoint, detect_layout, load_checkpoint
from turbocompile.errors import CheckpointError
from turbocompile.modeling import dit_class, example_inputs, random_dit
from turbocompile.quantization import dequantize_int8_block
from turbocompile.zoo import get_model

TINY, TINY_I2V = get_model("wan-tiny"), get_model("wan-tiny-i2v")


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the weight files in ``folder`` (not the extras side file)."""
    out = {}
    for f in sorted(folder.glob("diffusion_pytorch_model*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def _same_as(loaded, model, spec):
    """Same parameters bit for bit, same outputs (diffusers leaves its tensors 16 bytes off 64-byte alignment,
    which sends CPU kernels down other paths: 1e-6 differences, hence the tolerance)."""
    _assert_identical(dict(loaded.state_dict()), dict(model.state_dict()))
    torch.testing.assert_close(_forward(loaded, spec), _forward(model, spec), rtol=1e-5, atol=1e-5)


def _forward(model, spec):
    x, t, ctx = example_inputs(spec, 160, 96, 17, seed=7)
    with torch.no_grad():
        return model(x.to(model.dtype), t, ctx.to(model.dtype), return_dict=False)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_official_diffusers_official_is_bit_exact(dtype, tmp_path):
    model = random_dit(TINY, seed=11, dtype=dtype)
    src = write_official(model, tmp_path / "src")
    dif = convert_checkpoint(src, tmp_path / "dif", to="diffusers")
    assert detect_layout(dif) == "diffusers"
    back = convert_checkpoint(dif, tmp_path / "back", to="official")
    assert detect_layout(back) == "official"
    _assert_identical(_tensors(back), _tensors(src))
    # dtypes kept as stored: the block's linears in the model's dtype, diffusers' fp32 modules (norm3) in fp32
    assert _tensors(back)["blocks.0.ffn.0.weight"].dtype == dtype
    assert _tensors(back)["blocks.0.norm3.weight"].dtype == torch.float32
    cfg = json.loads((back / "config.json").read_text())
    assert (cfg["_class_name"], cfg["dim"], cfg["num_layers"], cfg["in_dim"], cfg["model_type"]) == \
        ("WanModel", 256, 2, 16, "t2v")


def test_diffusers_output_opens_with_from_pretrained(tmp_path):
    model = random_dit(TINY, seed=12)
    dif = convert_checkpoint(write_official(model, tmp_path / "src"), tmp_path / "dif", to="diffusers")
    _same_as(dit_class().from_pretrained(str(dif / "transformer")), model, TINY)


def test_two_experts_round_trip_and_sharding(tmp_path):
    pair = {"high_noise": random_dit(TINY_I2V, seed=13), "low_noise": random_dit(TINY_I2V, seed=14)}
    src = write_official(pair, tmp_path / "src", fmt="sharded")
    # ~3.5 MB per expert in fp32: 1 MB shards give several files per expert
    dif = convert_checkpoint(src, tmp_path / "dif", to="diffusers", max_shard_bytes=2**20)
    assert sorted(p.name for p in dif.iterdir()) == ["transformer", "transformer_2"]
    for sub, expert in (("transformer", "high_noise"), ("transformer_2", "low_noise")):
        index = json.loads((dif / sub / "diffusion_pytorch_model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        n = len(files)
        assert n >= 3 and files == [f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"
                                     for i in range(1, n + 1)]
        sizes = 0
        for f in files:
            with safe_open(str(dif / sub / f), "pt") as h:
                shard = sum(h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in h.keys())
                # at most max_shard_bytes, unless one tensor alone is bigger (time_proj: 1.5 MB)
                assert shard <= 2**20 or len(h.keys()) == 1
            sizes += shard
        assert index["metadata"]["total_size"] == sizes
        _same_as(dit_class().from_pretrained(str(dif / sub)), pair[expert], TINY_I2V)
    back = convert_checkpoint(dif, tmp_path / "back", to="official")
    assert sorted(p.name for p in back.iterdir()) == ["high_noise_model", "low_noise_model"]
    for expert in pair:
        _assert_identical(_tensors(back / f"{expert}_model"), _tensors(src / f"{expert}_model"))
    ck = load_checkpoint(back, dtype=torch.float32, progress=False)
    assert ck.spec.id == "wan-tiny-i2v" and sorted(ck.models) == ["high_noise", "low_noise"]


def test_turbodiffusion_quant_to_diffusers_keeps_proj_l(tmp_path, caplog):
    model = random_dit(TINY, seed=15, dtype=torch.bfloat16)
    src = write_turbodiffusion(model, tmp_path / "src", quant=True, wrap="state_dict", prefix="net.")
    with caplog.at_level(logging.WARNING):
        dif = convert_checkpoint(src, tmp_path / "dif", to="diffusers")
    assert "int8 Linears dequantized" in caplog.text
    want = turbodiffusion_state_dict(model, quant=True)
    side = load_file(str(dif / "transformer" / "turbodiffusion_extras.safetensors"))
    assert sorted(side) == sorted(f"blocks.{i}.attn1.proj_l.{w}" for i in range(2) for w in ("weight", "bias"))
    for i in range(2):
        ref = want[f"blocks.{i}.self_attn.attn_op.local_attn.proj_l.weight"]
        assert side[f"blocks.{i}.attn1.proj_l.weight"].dtype == ref.dtype
        assert torch.equal(side[f"blocks.{i}.attn1.proj_l.weight"], ref)
    weights = _tensors(dif / "transformer")
    q, s = want["blocks.1.ffn.0.int8_weight"], want["blocks.1.ffn.0.scale"]
    got = weights["blocks.1.ffn.net.0.proj.weight"]
    assert got.dtype == torch.bfloat16 and torch.equal(got, dequantize_int8_block(q, s, torch.bfloat16))
    assert torch.equal(weights["patch_embedding.weight"], model.patch_embedding.weight)  # Linear -> Conv3d
    # the loader picks the side file up again; diffusers itself opens the folder
    ck = load_checkpoint(dif, progress=False)
    assert ck.layout == "diffusers" and sorted(ck.extras["main"]) == sorted(side)
    assert torch.equal(ck.extras["main"]["blocks.0.attn1.proj_l.bias"], side["blocks.0.attn1.proj_l.bias"])
    dit_class().from_pretrained(str(dif / "transformer"))
    # and to official: same side file next to the official weights
    off = convert_checkpoint(src, tmp_path / "off", to="official")
    assert detect_layout(off) == "official"
    assert load_checkpoint(off, progress=False).extras["main"].keys() == side.keys()


def test_refuses_non_empty_destination(tmp_path):
    src = write_official(random_dit(TINY, seed=16), tmp_path / "src")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        convert_checkpoint(src, tmp_path / "dst", to="diffusers")
    assert (tmp_path / "dst" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert convert_checkpoint(src, tmp_path / "empty", to="diffusers") == tmp_path / "empty"
    with pytest.raises(CheckpointError, match="cannot convert to 'onnx'"):
        convert_checkpoint(src, tmp_path / "x", to="onnx")


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    model = random_dit(TINY, seed=17)
    sd = official_state_dict(model)
    del sd["blocks.0.ffn.2.bias"]
    (tmp_path / "bad").mkdir()
    save_file(sd, str(tmp_path / "bad" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\) wan-tiny needs: blocks.0.ffn.2.bias"):
        convert_checkpoint(tmp_path / "bad", tmp_path / "out" / "dst", to="diffusers")
    assert not (tmp_path / "out" / "dst").exists()
    # a failure in the middle of writing removes the temp folder too
    import turbocompile.checkpoints.convert as conv

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(conv, "official_config", boom)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(write_official(model, tmp_path / "src"), tmp_path / "out2" / "dst", to="official")
    assert list((tmp_path / "out2").iterdir()) == []
