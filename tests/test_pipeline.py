"""The video pipeline: generate() end to end on the tiny models, errors, text encoder, VAE keys, I2V, mp4."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from turbocompile.engine import EagerEngine
from turbocompile.errors import CheckpointError, InputError, UnsupportedShapeError
from turbocompile.modeling import random_dit
from turbocompile.pipeline import (closest_size, convert_umt5_official_keys, convert_wan_vae_keys, encode_video,
                                   generate, i2v_condition, i2v_mask, load_components, load_umt5, load_vae,
                                   read_mp4, tiny_text_encoder, tiny_vae, write_mp4)
from turbocompile.pipeline.text_encoder import TextEncoder
from turbocompile.zoo import get_model

# Small engines keep the tiny VAE's CPU decode well under a second: 64x32 pixels, 5 frames.
W, H, FRAMES = 64, 32, 5


def one_line(err) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def t2v():
    spec = get_model("wan-tiny")
    return EagerEngine(spec, {"main": random_dit(spec, seed=0)}, W, H, FRAMES), load_components(spec)


@pytest.fixture(scope="module")
def i2v():
    spec = get_model("wan-tiny-i2v")
    models = {name: random_dit(spec, seed=i) for i, name in enumerate(spec.experts)}
    return EagerEngine(spec, models, W, H, FRAMES), load_components(spec)


def random_image(w, h, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_generate_t2v_writes_a_playable_mp4_and_same_seed_gives_same_video(t2v, tmp_path):
    engine, comps = t2v
    a = generate(engine, "a red fox runs through snow", seed=3, out=tmp_path / "a.mp4", components=comps,
                 progress=False)
    b = generate(engine, "a red fox runs through snow", seed=3, out=tmp_path / "b.mp4", components=comps,
                 progress=False)
    c = generate(engine, "a red fox runs through snow", seed=4, out=tmp_path / "c.mp4", components=comps,
                 progress=False)
    assert a.path == tmp_path / "a.mp4" and a.path.stat().st_size > 0
    assert a.frames.shape == (FRAMES, H, W, 3) and a.frames.dtype == torch.uint8
    assert torch.equal(a.frames, b.frames)
    assert not torch.equal(a.frames, c.frames)
    decoded = read_mp4(a.path)
    assert decoded.shape == (FRAMES, H, W, 3)
    assert a.experts == ["main"] * 4 and a.steps == 4
    assert len(a.timings["steps_s"]) == 4
    for key in ("text_encode_s", "sample_s", "vae_decode_s", "total_s"):
        assert a.timings[key] >= 0.0
    assert a.peak_memory_bytes is None  # CPU
    assert "rcm 4 steps" in a.summary() and "VAE decode" in a.summary()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4", "c.mp4"]  # no temp files left


def test_generate_with_a_cached_prompt_does_not_move_the_encoder(t2v, tmp_path, monkeypatch):
    engine, comps = t2v
    comps.text_encoder.encode("a quiet lake")
    moves = []
    monkeypatch.setattr(comps.text_encoder, "to", lambda device: moves.append(device))
    generate(engine, "a quiet lake", steps=1, out=tmp_path / "v.mp4", components=comps, progress=False)
    assert moves == []


def test_generate_embedded_default_builds_tiny_components_itself(tmp_path):
    spec = get_model("wan-tiny")
    engine = EagerEngine(spec, {"main": random_dit(spec, seed=0)}, W, H, FRAMES)
    res = generate(engine, "waves", steps=1, out=tmp_path / "v.mp4", progress=True)
    assert read_mp4(res.path).shape == (FRAMES, H, W, 3)


class CountingEngine:
    """Wraps an engine and counts denoiser calls with the contexts they got."""

    def __init__(self, inner):
        self._inner = inner
        self.calls: list[torch.Tensor] = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def expert(self, name):
        fn = self._inner.expert(name)

        def call(x, t, ctx):
            self.calls.append(ctx.clone())
            return fn(x, t, ctx)
        return call


def test_generate_original_unipc_sampler_uses_cfg(t2v, tmp_path):
    engine, comps = t2v
    counting = CountingEngine(engine)
    res = generate(counting, "a boat", sampler="original", steps=2, out=tmp_path / "o.mp4", components=comps,
                   progress=False)
    assert len(counting.calls) == 4  # 2 steps x (prompt, negative prompt)
    pos, neg = counting.calls[0], counting.calls[1]
    assert not torch.equal(pos, neg)
    expected_neg = comps.text_encoder.encode(
        "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
        "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
        "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走", truncate=True)
    torch.testing.assert_close(neg.float(), expected_neg)  # Wan's default negative prompt, truncated to text_len
    assert res.frames.shape == (FRAMES, H, W, 3) and res.sampler == "original"


def test_generate_i2v_two_experts_switch_and_condition(i2v, tmp_path):
    engine, comps = i2v
    res = generate(engine, "a dog", image=random_image(128, 64), seed=1, out=tmp_path / "i.mp4",
                   components=comps, progress=False)
    assert res.experts == ["high_noise", "high_noise", "low_noise", "low_noise"]
    assert "vae_encode_s" in res.timings
    assert read_mp4(res.path).shape == (FRAMES, H, W, 3)


def test_i2v_condition_is_mask_then_normalized_image_latent(i2v):
    engine, comps = i2v
    spec = engine.spec
    img = random_image(W, H, seed=5)
    cond = i2v_condition(comps.vae, img, spec, W, H, FRAMES)
    _, f, h, w = spec.latent_shape(W, H, FRAMES)
    assert cond.shape == (1, 20, f, h, w)
    assert torch.equal(cond[:, :4, 0], torch.ones(1, 4, h, w))
    assert torch.equal(cond[:, :4, 1:], torch.zeros(1, 4, f - 1, h, w))
    pixels = torch.zeros(1, 3, FRAMES, H, W)
    pixels[0, :, 0] = torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1
    mu = comps.vae.encode(pixels).latent_dist.mode()
    mean = torch.tensor(comps.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(comps.vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(cond[:, 4:], (mu - mean) / std, rtol=1e-5, atol=1e-5)


def test_i2v_mask_folds_four_pixel_frames_per_latent_frame():
    m = i2v_mask(9, 2, 3)
    assert m.shape == (1, 4, 3, 2, 3)
    assert m[:, :, 0].eq(1).all() and m[:, :, 1:].eq(0).all()


# ---- errors: one line, raised before anything is written ----------------------------------------------


def test_i2v_without_image_is_input_error(i2v, tmp_path):
    engine, comps = i2v
    with pytest.raises(InputError) as err:
        generate(engine, "a dog", out=tmp_path / "x.mp4", components=comps, progress=False)
    assert "--image" in one_line(err)
    assert not (tmp_path / "x.mp4").exists()


def test_wan21_i2v_with_clip_image_features_is_refused(tmp_path):
    spec = get_model("wan2.1-i2v-14b-480p")
    engine = EagerEngine(spec, {"main": torch.nn.Identity()}, 832, 480, 81)
    with pytest.raises(InputError) as err:
        generate(engine, "x", image=random_image(832, 480), out=tmp_path / "x.mp4", components=object(),
                 progress=False)
    assert "CLIP" in one_line(err) and "wan2.2-i2v-a14b" in one_line(err)


def test_image_for_t2v_model_is_input_error(t2v, tmp_path):
    engine, comps = t2v
    with pytest.raises(InputError) as err:
        generate(engine, "x", image=random_image(W, H), out=tmp_path / "x.mp4", components=comps, progress=False)
    assert "text-to-video" in one_line(err)


def test_wrong_image_aspect_is_unsupported_shape(i2v, tmp_path):
    engine, comps = i2v
    with pytest.raises(UnsupportedShapeError) as err:
        generate(engine, "x", image=random_image(60, 60), out=tmp_path / "x.mp4", components=comps, progress=False)
    msg = one_line(err)
    assert "60x60" in msg and f"{W}x{H}" in msg
    assert not list(tmp_path.iterdir())


def test_adaptive_resolution_picks_closest_zoo_size_and_refuses_another_shape():
    assert closest_size(1920, 1080, 160, 96) == (160, 96)
    assert closest_size(1080, 1920, 160, 96) == (96, 160)
    assert closest_size(1000, 1000, 832, 480) == (640, 640)
    spec = get_model("wan-tiny-i2v")
    engine = EagerEngine(spec, {n: torch.nn.Identity() for n in spec.experts}, 160, 96, 17)
    with pytest.raises(UnsupportedShapeError) as err:
        generate(engine, "x", image=random_image(96, 160), adaptive_resolution=True, components=object(),
                 progress=False)
    assert "96x160" in one_line(err) and "160x96" in one_line(err)


def test_prompt_longer_than_text_len_is_input_error(t2v, tmp_path):
    engine, comps = t2v
    long_prompt = " ".join(f"word{i}" for i in range(engine.spec.text_len + 5))
    with pytest.raises(InputError) as err:
        generate(engine, long_prompt, out=tmp_path / "x.mp4", components=comps, progress=False)
    assert re.search(r"\b38 tokens\b", one_line(err)) and "at most 32" in one_line(err)


@pytest.mark.parametrize("frames", [4, 18, 0])
def test_frames_not_4k_plus_1_is_rejected(t2v, tmp_path, frames):
    engine, comps = t2v
    with pytest.raises(UnsupportedShapeError) as err:
        generate(engine, "x", frames=frames, out=tmp_path / "x.mp4", components=comps, progress=False)
    assert "4k+1" in one_line(err)


def test_frames_other_than_the_engine_is_rejected(t2v, tmp_path):
    engine, comps = t2v
    with pytest.raises(UnsupportedShapeError) as err:
        generate(engine, "x", frames=9, out=tmp_path / "x.mp4", components=comps, progress=False)
    assert "built for 5 frames" in one_line(err)


@pytest.mark.parametrize("steps", [0, 5])
def test_rcm_steps_outside_1_to_4_is_input_error(t2v, tmp_path, steps):
    engine, comps = t2v
    with pytest.raises(InputError) as err:
        generate(engine, "x", steps=steps, out=tmp_path / "x.mp4", components=comps, progress=False)
    assert "1 to 4" in one_line(err)


def test_unknown_sampler_and_bad_output_are_input_errors(t2v, tmp_path):
    engine, comps = t2v
    with pytest.raises(InputError, match="unknown sampler"):
        generate(engine, "x", sampler="ddim", out=tmp_path / "x.mp4", components=comps, progress=False)
    with pytest.raises(InputError, match=r"\.mp4"):
        generate(engine, "x", out=tmp_path / "x.gif", components=comps, progress=False)
    with pytest.raises(InputError, match="does not exist"):
        generate(engine, "x", out=tmp_path / "nope" / "x.mp4", components=comps, progress=False)


def test_real_model_without_component_paths_names_the_flag(tmp_path):
    spec = get_model("wan2.1-t2v-1.3b")
    with pytest.raises(InputError) as err:
        load_components(spec)
    assert "--text-encoder" in one_line(err)
    with pytest.raises(InputError) as err:
        load_components(spec, text_encoder_path=tmp_path / "t5.pth")
    assert "--tokenizer" in one_line(err)
    with pytest.raises(CheckpointError) as err:
        load_vae(tmp_path / "missing.pth")
    assert "--vae" in one_line(err)


def test_mp4_write_is_atomic(tmp_path, monkeypatch):
    import imageio.v2 as imageio

    real = imageio.get_writer

    class Boom:
        def __init__(self, w):
            self.w = w
            self.n = 0

        def append_data(self, frame):
            self.n += 1
            if self.n == 3:
                raise RuntimeError("disk full")
            self.w.append_data(frame)

        def close(self):
            self.w.close()

    monkeypatch.setattr(imageio, "get_writer", lambda *a, **k: Boom(real(*a, **k)))
    frames = (np.random.default_rng(0).random((5, 32, 64, 3)) * 255).astype(np.uint8)
    with pytest.raises(RuntimeError, match="disk full"):
        write_mp4(frames, tmp_path / "v.mp4", fps=16)
    assert list(tmp_path.iterdir()) == []


def test_mp4_without_imageio_ffmpeg_is_a_one_line_error_and_leaves_nothing(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ffmpeg(name, *args, **kwargs):
        if name == "imageio_ffmpeg":
            raise ImportError("No module named 'imageio_ffmpeg'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ffmpeg)
    frames = np.zeros((2, 16, 16, 3), dtype=np.uint8) + 7
    with pytest.raises(InputError, match="needs the imageio-ffmpeg package: pip install imageio-ffmpeg"):
        write_mp4(frames, tmp_path / "v.mp4", fps=16)
    assert list(tmp_path.iterdir()) == []


def test_mp4_roundtrip_keeps_count_size_and_content(tmp_path):
    frames = np.zeros((9, 32, 48, 3), np.uint8)
    for i in range(9):
        frames[i, :, : 5 * (i + 1)] = 200  # a growing bar: compressible, frame-distinct
    write_mp4(frames, tmp_path / "v.mp4", fps=16)
    back = read_mp4(tmp_path / "v.mp4")
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 6


# ---- text encoder ---------------------------------------------------------------------------------------


def test_text_encoder_trims_to_valid_tokens_zero_pads_and_caches(tmp_path):
    spec = get_model("wan-tiny")
    enc = tiny_text_encoder(spec, seed=0, cache_dir=tmp_path)
    ids = enc.token_ids("A cat   plays piano!")
    assert ids[-1] == enc.tokenizer.eos_token_id and len(ids) == 6
    emb = enc.encode("A cat   plays piano!")
    assert emb.shape == (1, spec.text_len, spec.dit.text_dim)
    ref = enc.model(input_ids=torch.tensor([ids])).last_hidden_state
    torch.testing.assert_close(emb[:, : len(ids)], ref)
    assert emb[:, len(ids):].eq(0).all() and emb[:, : len(ids)].abs().sum(-1).gt(0).all()
    # whitespace is cleaned as Wan does; different prompts differ
    assert torch.equal(enc.encode("A cat plays piano!"), emb)
    assert not torch.equal(enc.encode("A dog plays piano!"), emb)

    calls = []
    enc.model.register_forward_hook(lambda *a: calls.append(1))
    assert enc.encode("A cat   plays piano!") is emb and not calls  # in-memory cache
    fresh = TextEncoder(enc.model, enc.tokenizer, enc.text_len, enc.encoder_id, cache_dir=tmp_path)
    torch.testing.assert_close(fresh.encode("A cat   plays piano!"), emb)
    assert not calls  # on-disk cache, keyed by sha256 of encoder id + prompt
    other = TextEncoder(enc.model, enc.tokenizer, enc.text_len, "another-encoder", cache_dir=tmp_path)
    other.encode("A cat   plays piano!")
    assert calls  # another encoder id does not hit that entry


def test_tiny_components_are_seeded():
    spec = get_model("wan-tiny")
    a, b = tiny_text_encoder(spec, seed=0), tiny_text_encoder(spec, seed=0)
    assert torch.equal(a.encode("hello world"), b.encode("hello world"))
    va, vb = tiny_vae(1), tiny_vae(1)
    assert all(torch.equal(x, y) for x, y in zip(va.state_dict().values(), vb.state_dict().values()))


def _t5_bucket(rel: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    # T5's bidirectional relative-position bucketing, written out from the paper's definition
    half = num_buckets // 2
    out = (rel > 0).long() * half
    n = rel.abs()
    exact = half // 2
    large = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (half - exact)).long()
    return out + torch.where(n < exact, n, large.clamp(max=half - 1))


def _official_t5_forward(sd: dict, ids: torch.Tensor, heads: int) -> torch.Tensor:
    """Wan's umT5 encoder math on an official-layout state dict: pre-RMSNorm blocks, unscaled attention with a
    per-block relative bias, FFN fc2(fc1(x) * gelu_tanh(gate(x)))."""
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    x = sd["token_embedding.weight"][ids]
    L = ids.shape[1]
    rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(layers):
        p = f"blocks.{i}."
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = (h @ sd[p + f"attn.{n}.weight"].T for n in "qkv")
        q, k, v = (t.view(1, L, heads, -1).transpose(1, 2) for t in (q, k, v))
        bias = sd[p + "pos_embedding.embedding.weight"][_t5_bucket(rel)].permute(2, 0, 1)[None]
        a = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1) @ v
        x = x + a.transpose(1, 2).reshape(1, L, -1) @ sd[p + "attn.o.weight"].T
        h = rms(x, sd[p + "norm2.weight"])
        gate = torch.nn.functional.gelu(h @ sd[p + "ffn.gate.0.weight"].T, approximate="tanh")
        x = x + ((h @ sd[p + "ffn.fc1.weight"].T) * gate) @ sd[p + "ffn.fc2.weight"].T
    return rms(x, sd["norm.weight"])


def test_official_umt5_checkpoint_loads_into_transformers_and_matches_wan_math(tmp_path):
    gen = torch.Generator().manual_seed(0)
    vocab, d, heads, ff, layers = 300, 32, 4, 48, 2
    sd = {"token_embedding.weight": torch.randn(vocab, d, generator=gen), "norm.weight": 1 + 0.1 * torch.randn(d, generator=gen)}
    for i in range(layers):
        p = f"blocks.{i}."
        for n in "qkvo":
            sd[p + f"attn.{n}.weight"] = torch.randn(d, d, generator=gen) / d ** 0.5
        sd[p + "norm1.weight"] = 1 + 0.1 * torch.randn(d, generator=gen)
        sd[p + "norm2.weight"] = 1 + 0.1 * torch.randn(d, generator=gen)
        sd[p + "pos_embedding.embedding.weight"] = torch.randn(32, heads, generator=gen)
        sd[p + "ffn.gate.0.weight"] = torch.randn(ff, d, generator=gen) / d ** 0.5
        sd[p + "ffn.fc1.weight"] = torch.randn(ff, d, generator=gen) / d ** 0.5
        sd[p + "ffn.fc2.weight"] = torch.randn(d, ff, generator=gen) / ff ** 0.5
    torch.save(sd, tmp_path / "t5.pth")
    model = load_umt5(tmp_path / "t5.pth", dtype=torch.float32)
    ids = torch.randint(0, vocab, (1, 150), generator=gen)  # > 128 positions: exercises the log buckets
    got = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, _official_t5_forward(sd, ids, heads), rtol=1e-4, atol=1e-4)
    assert set(convert_umt5_official_keys(sd)) == set(model.state_dict())
    with pytest.raises(CheckpointError) as err:
        convert_umt5_official_keys({"blocks.0.attn.x.weight": torch.zeros(1)})
    assert "blocks.0.attn.x.weight" in one_line(err)


# ---- VAE -------------------------------------------------------------------------------------------------


def _official_vae_candidates(levels: int = 4, nrb: int = 2) -> list[str]:
    """Every name the official Wan2.1 VAE layout can have (flat Sequentials), shortcuts and time convs included."""
    def res(prefix):
        return [f"{prefix}.residual.{i}.{leaf}" for i, leaf in
                (("0", "gamma"), ("2", "weight"), ("2", "bias"), ("3", "gamma"), ("6", "weight"), ("6", "bias"))] + \
               [f"{prefix}.shortcut.weight", f"{prefix}.shortcut.bias"]

    def sample(prefix):
        return [f"{prefix}.resample.1.weight", f"{prefix}.resample.1.bias",
                f"{prefix}.time_conv.weight", f"{prefix}.time_conv.bias"]

    keys = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"]
    for part in ("encoder", "decoder"):
        keys += [f"{part}.conv1.weight", f"{part}.conv1.bias", f"{part}.head.0.gamma", f"{part}.head.2.weight",
                 f"{part}.head.2.bias", f"{part}.middle.1.norm.gamma", f"{part}.middle.1.to_qkv.weight",
                 f"{part}.middle.1.to_qkv.bias", f"{part}.middle.1.proj.weight", f"{part}.middle.1.proj.bias"]
        keys += res(f"{part}.middle.0") + res(f"{part}.middle.2")
    for j in range(levels * (nrb + 1)):
        keys += res(f"encoder.downsamples.{j}") + sample(f"encoder.downsamples.{j}")
    for j in range(levels * (nrb + 2)):
        keys += res(f"decoder.upsamples.{j}") + sample(f"decoder.upsamples.{j}")
    return keys


def test_vae_key_conversion_agrees_with_diffusers_converter_and_loads(tmp_path):
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, num_res_blocks=2).eval()  # Wan2.1 layout, small width
    target = vae.state_dict()
    # invert diffusers' own converter (the oracle) over every possible official name
    official = {}
    for name in _official_vae_candidates():
        mapped = next(iter(convert_wan_vae_to_diffusers({name: None})))
        if mapped in target:
            official[name] = target[mapped]
    assert len(official) == len(target)
    assert "decoder.upsamples.3.resample.1.weight" in official and "decoder.upsamples.4.shortcut.weight" in official
    ours = convert_wan_vae_keys(official)
    assert ours.keys() == target.keys()
    assert all(ours[k] is official[o] for o, k in zip(official, convert_wan_vae_to_diffusers(official)))

    torch.save(official, tmp_path / "Wan_VAE.pth")
    with pytest.raises(CheckpointError):  # diffusers' default (full-size) config: shapes differ
        load_vae(tmp_path / "Wan_VAE.pth")
    # an official dict for the tiny VAE loads into its own config and decodes identically
    tiny = tiny_vae(seed=2)
    with pytest.raises(CheckpointError, match="unexpected key"):
        convert_wan_vae_keys({"decoder.upsamples.0.residual.5.weight": torch.zeros(1)}, num_res_blocks=1)
    z = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    inv = {}
    for name in _official_vae_candidates(nrb=1):
        try:
            key = next(iter(convert_wan_vae_keys({name: None}, num_res_blocks=1)))
        except CheckpointError:  # e.g. a resample name at a resnet slot: not a real official name
            continue
        if key in tiny.state_dict():
            inv[name] = tiny.state_dict()[key]
    assert len(inv) == len(tiny.state_dict())
    fresh = AutoencoderKLWan(base_dim=8, z_dim=16, num_res_blocks=1).eval()
    fresh.load_state_dict(convert_wan_vae_keys(inv), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.decode(z).sample, tiny.decode(z).sample)


def test_vae_encode_then_decode_shapes_match_the_zoo_strides():
    spec = get_model("wan-tiny")
    vae = tiny_vae()
    video = torch.rand(1, 3, FRAMES, H, W) * 2 - 1
    lat = encode_video(vae, video)
    assert lat.shape == (1, *spec.latent_shape(W, H, FRAMES))
    from turbocompile.pipeline import decode_latents
    out = decode_latents(vae, lat)
    assert out.shape == video.shape and out.min() >= -1 and out.max() <= 1


# ---- GPU -------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generate_on_gpu_reports_peak_memory_and_tiles_under_a_small_budget(tmp_path):
    pytest.importorskip("imageio_ffmpeg", reason="writing the .mp4 needs imageio-ffmpeg (a 68 MB wheel the GPU "
                                              "machine lacks and its 64 MiB carry cannot take)")
    spec = get_model("wan-tiny")
    engine = EagerEngine(spec, {"main": random_dit(spec, seed=0)}, 160, 96, 17, device="cuda")
    comps = load_components(spec)
    big = generate(engine, "a cat", out=tmp_path / "a.mp4", components=comps, progress=False)
    assert big.peak_memory_bytes and big.peak_memory_bytes > 0 and not big.timings["vae_tiled"]
    small = generate(engine, "a cat", out=tmp_path / "b.mp4", components=comps, progress=False,
                     gpu_memory_budget=1)
    assert small.timings["vae_tiled"]
    assert next(comps.vae.parameters()).device.type == "cpu"  # components go back to the host
    assert read_mp4(small.path).shape == (17, 96, 160, 3)


def test_diffusers_component_folders_load(tmp_path):
    spec = get_model("wan-tiny")
    enc = tiny_text_encoder(spec, seed=3)
    enc.model.save_pretrained(tmp_path / "text_encoder")
    vae = tiny_vae(seed=3)
    vae.save_pretrained(tmp_path / "vae")
    te = load_umt5(tmp_path, dtype=torch.float32)  # the repo root: finds text_encoder/
    assert all(torch.equal(a, b) for a, b in zip(te.state_dict().values(), enc.model.state_dict().values()))
    loaded = load_vae(tmp_path / "vae")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vae.state_dict().values()))
    with pytest.raises(CheckpointError) as err:
        load_umt5(tmp_path / "vae" / "nothing")
    assert "--text-encoder" in one_line(err)
