"""Checkpoint loading: every layout gives the same model, extras are exact, bad input fails clearly."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch
from ckpt_factory import (
    official_state_dict,
    turbodiffusion_state_dict,
    write_diffusers,
    write_official,
    write_turbodiffusion,
)
from safetensors.torch import save_file

from turbocompile.checkpoints import detect_layout, load_checkpoint
from turbocompile.checkpoints import reader as reader_mod
from turbocompile.checkpoints.infer import Arch, pick_spec
from turbocompile.checkpoints.keymap import diffusers_to_official, official_to_diffusers
from turbocompile.errors import CheckpointError, UnknownModelError
from turbocompile.modeling import build_dit, example_inputs, random_dit
from turbocompile.quantization import dequantize_int8_block, quantize_int8_block
from turbocompile.zoo import get_model

TSV = Path("/work/shared/reference/wan_keys_official_vs_diffusers.tsv")
TINY, TINY_I2V = get_model("wan-tiny"), get_model("wan-tiny-i2v")


@pytest.fixture(scope="module")
def tiny():
    return random_dit(TINY, seed=1)


@pytest.fixture(scope="module")
def pair():
    return {"high_noise": random_dit(TINY_I2V, seed=2), "low_noise": random_dit(TINY_I2V, seed=3)}


def _run(model, spec, seed=0):
    x, t, ctx = example_inputs(spec, 160, 96, 17, seed=seed)
    with torch.no_grad():
        return model(x.to(model.dtype), t, ctx.to(model.dtype), return_dict=False)[0].float()


def _same_model(got, ref, spec, outputs=True):
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    assert list(got_sd) == list(ref_sd)
    for k in ref_sd:
        assert got_sd[k].dtype == ref_sd[k].dtype, k
        assert torch.equal(got_sd[k], ref_sd[k]), k
    if not outputs:
        return
    out, want = _run(got, spec, seed=5), _run(ref, spec, seed=5)
    assert torch.isfinite(want).all() and want.abs().mean() > 1e-3
    assert torch.equal(out, want)


# --------------------------------------------------------------------------- key mapping

def test_key_mapping_traps():
    pairs = {
        "blocks.7.norm3.weight": "blocks.7.norm2.weight",
        "blocks.0.cross_attn.k_img.weight": "blocks.0.attn2.add_k_proj.weight",
        "blocks.0.cross_attn.v_img.bias": "blocks.0.attn2.add_v_proj.bias",
        "blocks.3.cross_attn.norm_k_img.weight": "blocks.3.attn2.norm_added_k.weight",
        "head.modulation": "scale_shift_table",
        "blocks.2.modulation": "blocks.2.scale_shift_table",
        "blocks.0.self_attn.o.bias": "blocks.0.attn1.to_out.0.bias",
        "blocks.0.ffn.0.weight": "blocks.0.ffn.net.0.proj.weight",
        "blocks.0.ffn.2.weight": "blocks.0.ffn.net.2.weight",
        "time_projection.1.weight": "condition_embedder.time_proj.weight",
        "text_embedding.2.bias": "condition_embedder.text_embedder.linear_2.bias",
        "head.head.weight": "proj_out.weight",
        "img_emb.proj.4.bias": "condition_embedder.image_embedder.norm2.bias",
        "blocks.1.self_attn.attn_op.local_attn.proj_l.weight": "blocks.1.attn1.proj_l.weight",
        "blocks.1.self_attn.q.int8_weight": "blocks.1.attn1.to_q.int8_weight",
    }
    for off, dif in pairs.items():
        assert official_to_diffusers(off) == dif
        assert diffusers_to_official(dif) == off
    assert official_to_diffusers("blocks.0.norm1.weight") is None  # official norm1 has no parameters
    assert official_to_diffusers("something.else") is None


@pytest.mark.parametrize("model_id,count", [("wan2.1-t2v-1.3b", 825), ("wan2.1-t2v-14b", 1095),
                                            ("wan2.1-i2v-14b-720p", 1303), ("wan2.2-ti2v-5b", 825)])
def test_every_diffusers_key_has_an_official_name(model_id, count):
    keys = list(build_dit(get_model(model_id).dit, "meta").state_dict())
    official = [diffusers_to_official(k) for k in keys]
    assert None not in official and len(set(official)) == len(keys) == count
    assert [official_to_diffusers(k) for k in official] == keys


@pytest.mark.skipif(not TSV.exists(), reason="reference key table not present on this machine")
def test_key_mapping_matches_reference_table():
    rows = list(csv.DictReader(TSV.open(), delimiter="\t"))
    assert len(rows) > 300
    for r in rows:
        assert official_to_diffusers(r["official_key"]) == r["diffusers_key"], r
        assert diffusers_to_official(r["diffusers_key"]) == r["official_key"], r


# --------------------------------------------------------------------------- layouts

SINGLE_LAYOUTS = {
    "official-file": (lambda m, d: write_official(m, d), "official"),
    "official-file-direct": (lambda m, d: write_official(m, d) / "diffusion_pytorch_model.safetensors",
                             "official"),
    "official-sharded": (lambda m, d: write_official(m, d, fmt="sharded"), "official"),
    "official-index-json": (lambda m, d: write_official(m, d, fmt="sharded")
                            / "diffusion_pytorch_model.safetensors.index.json", "official"),
    "official-pth": (lambda m, d: write_official(m, d, fmt="pth"), "official"),
    "diffusers": (lambda m, d: write_diffusers(m, d), "diffusers"),
    "diffusers-flat": (lambda m, d: write_diffusers(m, d, nested=False), "diffusers"),
    "turbodiffusion": (lambda m, d: write_turbodiffusion(m, d), "turbodiffusion"),
    "turbodiffusion-wrapped": (lambda m, d: write_turbodiffusion(m, d, wrap="state_dict", prefix="net."),
                               "turbodiffusion"),
    "turbodiffusion-model-prefix": (lambda m, d: write_turbodiffusion(m, d, wrap="model",
                                                                      prefix="model.diffusion_model."),
                                    "turbodiffusion"),
}


@pytest.mark.parametrize("name", list(SINGLE_LAYOUTS))
def test_single_expert_layouts_load_the_same_model(name, tiny, tmp_path):
    write, layout = SINGLE_LAYOUTS[name]
    path = write(tiny, tmp_path / "ckpt")
    assert detect_layout(path) == layout
    ck = load_checkpoint(path, dtype=torch.float32, progress=False)
    assert ck.layout == layout and ck.spec.id == "wan-tiny" and list(ck.models) == ["main"]
    model = ck.models["main"]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    _same_model(model, tiny, TINY)
    if layout == "turbodiffusion":
        want = turbodiffusion_state_dict(tiny)
        extras = ck.extras["main"]
        assert sorted(extras) == sorted(f"blocks.{i}.attn1.proj_l.{w}" for i in range(2) for w in ("weight", "bias"))
        for i in range(2):
            for w in ("weight", "bias"):
                got = extras[f"blocks.{i}.attn1.proj_l.{w}"]
                ref = want[f"blocks.{i}.self_attn.attn_op.local_attn.proj_l.{w}"]
                assert got.dtype == ref.dtype and torch.equal(got, ref)
    else:
        assert ck.extras["main"] == {}


@pytest.mark.parametrize("name", ["official", "official-sharded", "diffusers", "turbodiffusion",
                                  "turbodiffusion-list"])
def test_two_expert_layouts_load_both_experts(name, pair, tmp_path):
    d = tmp_path / "ckpt"
    path = {"official": lambda: write_official(pair, d),
            "official-sharded": lambda: write_official(pair, d, fmt="sharded"),
            "diffusers": lambda: write_diffusers(pair, d),
            "turbodiffusion": lambda: write_turbodiffusion(pair, d),
            "turbodiffusion-list": lambda: [write_turbodiffusion(pair, d) / "TurboWan-tiny-low.pth",
                                            d / "TurboWan-tiny-high.pth"]}[name]()
    assert detect_layout(path) == ("diffusers" if name == "diffusers" else name.split("-")[0])
    ck = load_checkpoint(path, dtype=torch.float32, progress=False)
    assert ck.spec.id == "wan-tiny-i2v"
    assert sorted(ck.models) == ["high_noise", "low_noise"]
    for expert, ref in pair.items():
        _same_model(ck.models[expert], ref, TINY_I2V)
    if name.startswith("turbodiffusion"):
        # expert i got proj_l seed i: the high/low assignment must follow the file names, not the order
        for i, expert in enumerate(pair):
            want = turbodiffusion_state_dict(pair[expert], seed=i)
            assert torch.equal(ck.extras[expert]["blocks.1.attn1.proj_l.weight"],
                               want["blocks.1.self_attn.attn_op.local_attn.proj_l.weight"])


def test_quant_checkpoint_keeps_int8_bit_exact(tiny, tmp_path):
    path = write_turbodiffusion(tiny, tmp_path, quant=True, wrap="state_dict", prefix="net.")
    assert detect_layout(path) == "turbodiffusion-quant"
    ck = load_checkpoint(path, dtype=torch.float32, progress=False)
    assert ck.layout == "turbodiffusion-quant"
    model, extras = ck.models["main"], ck.extras["main"]
    linears = [k[: -len(".weight")] for k, v in tiny.state_dict().items()
               if k.startswith("blocks.") and k.endswith(".weight") and v.ndim == 2]
    assert len(linears) == 2 * 10  # q k v o (self), q k v o (cross), ffn.0, ffn.2 per block
    sd = model.state_dict()
    for base in linears:
        q_ref, s_ref = quantize_int8_block(tiny.state_dict()[base + ".weight"])
        q, s = extras[base + ".int8_weight"], extras[base + ".scale"]
        assert q.dtype == torch.int8 and torch.equal(q, q_ref)
        assert s.dtype == torch.float32 and torch.equal(s, s_ref)
        assert torch.equal(sd[base + ".weight"], dequantize_int8_block(q_ref, s_ref, torch.float32))
    assert torch.equal(extras["blocks.0.attn1.proj_l.weight"],
                       turbodiffusion_state_dict(tiny)["blocks.0.self_attn.attn_op.local_attn.proj_l.weight"])
    # everything outside the block Linears is exact; the outputs differ only by the int8 error
    for k, v in tiny.state_dict().items():
        if not any(k.startswith(b + ".") for b in linears) or k.endswith(".bias"):
            assert torch.equal(sd[k], v), k
    out, want = _run(model, TINY), _run(tiny, TINY)
    rel = (out - want).norm() / want.norm()
    assert 1e-5 < rel < 0.05, rel

    deq = load_checkpoint(path, dtype=torch.float32, dequantize=True, progress=False)
    assert sorted(deq.extras["main"]) == sorted(k for k in extras if ".proj_l." in k)
    assert torch.equal(_run(deq.models["main"], TINY), out)


def test_bf16_load_keeps_diffusers_fp32_modules(tiny, tmp_path):
    ck = load_checkpoint(write_official(tiny, tmp_path), progress=False)
    model = ck.models["main"]
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert dtypes["proj_out.weight"] == torch.bfloat16
    for k in ("scale_shift_table", "blocks.1.scale_shift_table", "blocks.0.norm2.weight",
              "condition_embedder.time_embedder.linear_1.weight"):
        assert dtypes[k] == torch.float32, k
    assert all(b.dtype == torch.float32 for b in model.rope.buffers())
    # same dtypes as diffusers' own from_pretrained(torch_dtype=bfloat16)
    write_diffusers(tiny, tmp_path / "d")
    ref = type(model).from_pretrained(str(tmp_path / "d" / "transformer"), torch_dtype=torch.bfloat16)
    assert {k: v.dtype for k, v in ref.state_dict().items()} == dtypes
    out, want = _run(model, TINY), _run(ref, TINY)
    assert torch.equal(out, want)


def test_stored_dtypes_and_progress_bar(tiny, tmp_path, monkeypatch):
    from turbocompile.checkpoints import loader

    monkeypatch.setattr(loader, "PROGRESS_BYTES", 0)  # show the bar even for a tiny file
    model = random_dit(TINY, seed=4, dtype=torch.bfloat16)
    ck = load_checkpoint(write_official(model, tmp_path), dtype=None, progress=True)
    # every tensor in its stored dtype (bf16, and fp32 for diffusers' fp32 modules)
    _same_model(ck.models["main"], model, TINY, outputs=False)


def test_small_reopen_budget_reads_the_same(tiny, tmp_path, monkeypatch):
    # the safetensors handle is reopened after every read here; data must not change
    monkeypatch.setattr(reader_mod.SafetensorsFile, "reopen_bytes", 1)
    ck = load_checkpoint(write_official(tiny, tmp_path, fmt="sharded"), dtype=torch.float32, progress=False)
    _same_model(ck.models["main"], tiny, TINY)


def _mapped_files(ptr: int) -> list[str]:
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi and len(parts) > 5:
            out.append(parts[5])
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc to see memory mappings")
def test_pth_weights_stay_memory_mapped(tiny, tmp_path):
    path = write_official(tiny, tmp_path, fmt="pth")
    ck = load_checkpoint(path, dtype=torch.float32, progress=False)
    w = ck.models["main"].blocks[0].attn1.to_q.weight
    assert torch.equal(w, tiny.blocks[0].attn1.to_q.weight)
    # same dtype, CPU: no copy was made, the parameter lives in the file mapping
    assert _mapped_files(w.data_ptr()) == [str(path)]
    ck16 = load_checkpoint(path, progress=False)  # bf16: converted, so a fresh allocation
    assert _mapped_files(ck16.models["main"].blocks[0].attn1.to_q.weight.data_ptr()) != [str(path)]


# --------------------------------------------------------------------------- identification

def test_model_id_is_verified_against_shapes(tiny, tmp_path):
    path = write_official(tiny, tmp_path)
    assert load_checkpoint(path, "wan-tiny", dtype=torch.float32, progress=False).spec.id == "wan-tiny"
    with pytest.raises(CheckpointError, match=r"checkpoint has dim 256, 2 layers, in_dim 16 "
                                              r"\(looks like wan-tiny\), not wan2.1-t2v-1.3b"):
        load_checkpoint(path, "wan2.1-t2v-1.3b", progress=False)
    with pytest.raises(UnknownModelError, match="did you mean"):
        load_checkpoint(path, "wan-tinyy", progress=False)


def test_one_expert_of_a_pair_is_refused(pair, tmp_path):
    write_official(pair, tmp_path)
    with pytest.raises(CheckpointError, match="holds one expert but wan-tiny-i2v has two"):
        load_checkpoint(tmp_path / "high_noise_model", progress=False)


def test_shared_architectures_prefer_matching_expert_count(caplog):
    arch = Arch.of(get_model("wan2.1-t2v-14b").dit)
    with caplog.at_level(logging.INFO):
        assert pick_spec({"main": arch}).id == "wan2.1-t2v-14b"
    assert "wan2.2-t2v-a14b" in caplog.text
    assert pick_spec({"high_noise": arch, "low_noise": arch}).id == "wan2.2-t2v-a14b"
    i2v = Arch.of(get_model("wan2.1-i2v-14b-480p").dit)
    with caplog.at_level(logging.INFO):
        assert pick_spec({"main": i2v}).id in ("wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p")
    assert "pass a model id" in caplog.text
    assert pick_spec({"main": Arch.of(get_model("wan2.2-ti2v-5b").dit)}).id == "wan2.2-ti2v-5b"


def test_architecture_of_a_big_checkpoint_from_headers(tmp_path):
    # a 1.3B-shaped safetensors with empty (0-element) tensors would not load, but shapes alone identify it
    meta = build_dit(get_model("wan2.1-t2v-1.3b").dit, "meta")
    from turbocompile.checkpoints.infer import arch_from_shapes
    from turbocompile.checkpoints.reader import ExpertSource

    small = {diffusers_to_official(k): torch.zeros(v.shape[:1] + (1,) * (v.ndim - 1))
             for k, v in meta.state_dict().items()}
    save_file(small, str(tmp_path / "x.safetensors"))
    src = ExpertSource([tmp_path / "x.safetensors"])
    try:
        arch = arch_from_shapes(src)
    finally:
        src.close()
    assert (arch.dim, arch.num_layers, arch.ffn_dim) == (1536, 30, 8960)


# --------------------------------------------------------------------------- bad input

def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no checkpoint files in"):
        load_checkpoint(tmp_path)


def test_missing_shard_is_named(tiny, tmp_path):
    write_official(tiny, tmp_path, fmt="sharded")
    (tmp_path / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"lists 1 shard\(s\) that are not in .*: "
                                              r"diffusion_pytorch_model-00002-of-00003.safetensors; re-download"):
        load_checkpoint(tmp_path, progress=False)


def test_truncated_safetensors(tiny, tmp_path):
    f = write_official(tiny, tmp_path) / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt: re-download"):
        load_checkpoint(tmp_path, progress=False)


def test_truncated_pth(tiny, tmp_path):
    f = write_official(tiny, tmp_path, fmt="pth")
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt: re-download"):
        load_checkpoint(f, progress=False)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tiny, tmp_path, capsys):
    sd = official_state_dict(tiny)
    sd["evil"] = _Payload()
    torch.save(sd, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused: the file contains pickled code; only plain state dicts"):
        load_checkpoint(tmp_path / "evil.pth", progress=False)
    assert "this must never run" not in capsys.readouterr().out


def _drop_four(sd):
    for k in ["blocks.1.norm3.weight", "blocks.0.cross_attn.q.bias", "head.modulation", "blocks.1.ffn.0.bias"]:
        del sd[k]


def _add_two(sd):
    sd["blocks.0.cross_attn.k_img.weight"] = torch.randn(256, 256)
    sd["blocks.0.mystery.weight"] = torch.randn(3)


def _narrow_q(sd):
    sd["blocks.1.self_attn.q.weight"] = torch.randn(256, 128)


@pytest.mark.parametrize("mutate,message", [
    (_drop_four, r"checkpoint lacks 4 tensor\(s\) wan-tiny needs: "
                 r"head.modulation, blocks.0.cross_attn.q.bias, blocks.1.norm3.weight \.\.\."),
    (_add_two, r"checkpoint has 2 unexpected tensor\(s\) for wan-tiny: "
               r"blocks.0.cross_attn.k_img.weight, blocks.0.mystery.weight"),
    (_narrow_q, r"tensor blocks.1.self_attn.q.weight has shape \[256, 128\], wan-tiny needs \[256, 256\]"),
], ids=["missing", "unexpected", "shape"])
def test_wrong_keys_are_named(mutate, message, tiny, tmp_path):
    sd = official_state_dict(tiny)
    mutate(sd)
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path, progress=False)


def test_not_a_wan_checkpoint(tmp_path):
    save_file({"encoder.weight": torch.randn(4, 4)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not a Wan DiT checkpoint: no patch_embedding.weight"):
        load_checkpoint(tmp_path / "model.safetensors", progress=False)
