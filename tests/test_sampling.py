"""rCM and original (UniPC + CFG) samplers: schedules, update rules, expert switching, reproducibility."""
from __future__ import annotations

import math

import pytest
import torch

from turbocompile.engine import EagerEngine
from turbocompile.errors import InputError
from turbocompile.modeling import random_dit
from turbocompile.sampling import (NoiseSource, expert_plan, flow_shift, make_scheduler, net_timestep,
                                   rcm_timesteps, sample_original, sample_rcm)
from turbocompile.zoo import get_model

# Small shapes: 64x32 pixels, 5 frames -> latent 16x2x4x8 (16 tokens).
W, H, FRAMES = 64, 32, 5


class RecordingEngine:
    """An engine whose experts are plain functions; records every call, prefetch and release."""

    def __init__(self, spec, fns, width=W, height=H, frames=FRAMES):
        self.spec, self.width, self.height, self.frames = spec, width, height, frames
        self.device, self.dtype = torch.device("cpu"), torch.float64
        self._fns = fns
        self.events: list[tuple] = []

    @property
    def expert_names(self):
        return tuple(self._fns)

    def expert(self, name):
        def call(x, t, ctx):
            self.events.append(("call", name, float(t[0]), x.shape[1], ctx.clone()))
            return self._fns[name](x, t, ctx)
        return call

    def prefetch(self, name):
        self.events.append(("prefetch", name))

    def release(self, name):
        self.events.append(("release", name))

    def calls(self):
        return [e for e in self.events if e[0] == "call"]


class ListNoise:
    """Hands out a known sequence of noise tensors."""

    def __init__(self, tensors):
        self.tensors = list(tensors)
        self.drawn = 0

    def __call__(self, shape):
        out = self.tensors[self.drawn]
        assert tuple(out.shape) == tuple(shape)
        self.drawn += 1
        return out


def test_rcm_timesteps_match_turbodiffusion_table():
    expect = [0.987654, 0.933781, 0.852895, 0.608979, 0.0]
    got = rcm_timesteps(4, 80)
    assert len(got) == 5 and got[-1] == 0.0
    assert got == pytest.approx(expect, abs=1e-6)
    assert got[0] == pytest.approx(80 / 81, abs=1e-12)  # sigma/(1+sigma), float64 math
    assert rcm_timesteps(4, 200)[0] == pytest.approx(0.995025, abs=1e-6)
    assert rcm_timesteps(4, 1600)[0] == pytest.approx(0.999375, abs=1e-6)
    for n in (1, 2, 3):
        assert rcm_timesteps(n, 80) == pytest.approx(expect[:n] + [0.0], abs=1e-6)


def test_net_timestep_is_bf16_rounded_like_turbodiffusion():
    assert [net_timestep(t) for t in rcm_timesteps(4, 80)[:-1]] == [988.0, 932.0, 852.0, 608.0]
    assert net_timestep(rcm_timesteps(1, 200)[0]) == 996.0
    assert net_timestep(rcm_timesteps(1, 1600)[0]) == 1000.0


@pytest.mark.parametrize("steps", [0, 5, 8, -1])
def test_rcm_steps_out_of_range_is_one_line_input_error(steps):
    with pytest.raises(InputError) as err:
        rcm_timesteps(steps, 80)
    msg = str(err.value)
    assert "1 to 4" in msg and str(steps) in msg and "\n" not in msg


def _known_denoiser(x, t, ctx):
    # v depends on x, on the timestep value and on the context, so each is checked.
    return 0.5 * x + 1e-3 * t.view(-1, 1, 1, 1, 1) + ctx.mean()


@pytest.mark.parametrize("ode", [False, True])
def test_rcm_two_step_trajectory_by_hand(ode):
    spec = get_model("wan-tiny")
    eng = RecordingEngine(spec, {"main": _known_denoiser})
    shape = (1, *spec.latent_shape(W, H, FRAMES))
    gen = torch.Generator().manual_seed(123)
    noises = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    ctx = torch.randn(1, spec.text_len, spec.dit.text_dim, generator=gen, dtype=torch.float64)
    source = ListNoise(noises)
    out = sample_rcm(eng, ctx, steps=2, sigma_max=80, ode=ode, noise=source)

    # by hand: t0 = 80/81, t1 = sin(1.5)/(sin(1.5)+cos(1.5)), t2 = 0
    t0 = 80.0 / 81.0
    t1 = math.sin(1.5) / (math.sin(1.5) + math.cos(1.5))
    c = ctx.mean()
    x = noises[0] * t0
    v = 0.5 * x + 1e-3 * 988.0 + c
    if ode:
        x = x - (t0 - t1) * v
    else:
        x = (1 - t1) * (x - t0 * v) + t1 * noises[1]
    v = 0.5 * x + 1e-3 * 932.0 + c
    x = x - t1 * v  # last step: x0 prediction (ODE to t=0 is the same formula)
    torch.testing.assert_close(out, x.float(), rtol=1e-6, atol=1e-6)
    assert source.drawn == (1 if ode else 2)  # initial noise + one fresh draw per re-noising step
    calls = eng.calls()
    assert [c[2] for c in calls] == [988.0, 932.0]
    assert all(c[3] == spec.dit.in_channels for c in calls)


def test_rcm_one_network_call_per_step_and_no_cfg():
    spec = get_model("wan-tiny")
    eng = RecordingEngine(spec, {"main": _known_denoiser})
    ctx = torch.randn(1, spec.text_len, spec.dit.text_dim, dtype=torch.float64)
    sample_rcm(eng, ctx, steps=3, seed=0)
    calls = eng.calls()
    assert len(calls) == 3
    assert all(torch.equal(c[4], ctx) for c in calls)


@pytest.mark.parametrize("steps,expected", [
    (4, ["high_noise", "high_noise", "low_noise", "low_noise"]),
    (3, ["high_noise", "high_noise", "low_noise"]),
    (2, ["high_noise", "high_noise"]),
    (1, ["high_noise"]),
])
def test_two_expert_switching_follows_turbodiffusion_table(steps, expected):
    spec = get_model("wan-tiny-i2v")  # boundary 0.9, sigma_max 200
    fns = {"high_noise": lambda x, t, c: torch.ones_like(x[:, :16]),
           "low_noise": lambda x, t, c: -torch.ones_like(x[:, :16])}
    eng = RecordingEngine(spec, fns)
    _, f, h, w = spec.latent_shape(W, H, FRAMES)
    cond = torch.randn(1, 20, f, h, w, dtype=torch.float64)
    ctx = torch.randn(1, spec.text_len, spec.dit.text_dim, dtype=torch.float64)
    sample_rcm(eng, ctx, condition=cond, steps=steps, seed=3)
    assert [c[1] for c in eng.calls()] == expected
    assert all(c[3] == 36 for c in eng.calls())  # 16 noise + 20 conditioning channels
    kinds = [e[0] if e[0] != "call" else f"call:{e[1]}" for e in eng.events]
    if steps >= 3:
        # prefetch the low-noise expert while the last high-noise step runs; release the high one at the switch
        assert kinds[:5] == ["call:high_noise", "prefetch", "call:high_noise", "release", "call:low_noise"]
        assert eng.events[1] == ("prefetch", "low_noise") and eng.events[3] == ("release", "high_noise")
        assert kinds.count("prefetch") == 1 and kinds.count("release") == 1
    else:
        assert "prefetch" not in kinds and "release" not in kinds


def test_expert_plan_uses_unrounded_rf_time():
    spec = get_model("wan2.2-t2v-a14b")  # boundary 0.875
    assert expert_plan(spec, [0.9, 0.875, 0.8749999]) == ["high_noise", "high_noise", "low_noise"]
    assert expert_plan(get_model("wan-tiny"), [0.9, 0.1]) == ["main", "main"]


def test_noise_source_is_seeded_and_sequential():
    a, b = NoiseSource(7), NoiseSource(7)
    first = a((2, 3))
    assert torch.equal(first, b((2, 3)))
    assert not torch.equal(first, a((2, 3)))
    assert torch.equal(first, torch.randn(2, 3, generator=torch.Generator().manual_seed(7)))


@pytest.fixture(scope="module")
def tiny_engine():
    spec = get_model("wan-tiny")
    return EagerEngine(spec, {"main": random_dit(spec, seed=0)}, W, H, FRAMES)


def test_rcm_same_seed_same_latent_on_real_tiny_dit(tiny_engine):
    spec = tiny_engine.spec
    ctx = torch.randn(1, spec.text_len, spec.dit.text_dim, generator=torch.Generator().manual_seed(1))
    a = sample_rcm(tiny_engine, ctx, steps=2, seed=11)
    b = sample_rcm(tiny_engine, ctx, steps=2, seed=11)
    c = sample_rcm(tiny_engine, ctx, steps=2, seed=12)
    assert a.shape == (1, *spec.latent_shape(W, H, FRAMES)) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_original_unipc_with_cfg_matches_direct_scheduler_loop():
    spec = get_model("wan-tiny")
    dit = random_dit(spec, seed=0)
    calls = []

    def fn(x, t, ctx):
        calls.append((float(t[0]), ctx))
        return dit(x.float(), t, ctx.float(), return_dict=False)[0]

    eng = RecordingEngine(spec, {"main": fn})
    eng.dtype = torch.float32
    gen = torch.Generator().manual_seed(5)
    pos = torch.randn(1, spec.text_len, spec.dit.text_dim, generator=gen)
    neg = torch.randn(1, spec.text_len, spec.dit.text_dim, generator=gen)
    out = sample_original(eng, pos, neg, steps=3, seed=9)

    # two calls per step: prompt then negative prompt, at the shifted UniPC timesteps
    sched = make_scheduler(spec.sample_shift, 3)
    ts = [float(t) for t in sched.timesteps]
    assert [c[0] for c in calls] == [t for t in ts for _ in range(2)]
    assert all(torch.equal(c[1], pos) for c in calls[0::2]) and all(torch.equal(c[1], neg) for c in calls[1::2])
    # the schedule is Wan's shift of linear sigmas
    lin = torch.linspace(1.0, 1.0 / 1000, 4)[:-1]
    assert [float(s) for s in sched.sigmas[:-1]] == pytest.approx([flow_shift(float(s), spec.sample_shift) for s in lin],
                                                                  abs=1e-5)

    # reference: the same loop written out with diffusers' scheduler and the CFG formula
    ref_sched = make_scheduler(spec.sample_shift, 3)
    x = torch.randn((1, *spec.latent_shape(W, H, FRAMES)), generator=torch.Generator().manual_seed(9))
    g = spec.guide_scale
    for t in ref_sched.timesteps:
        tt = t.reshape(1).float()
        vp = dit(x, tt, pos, return_dict=False)[0]
        vn = dit(x, tt, neg, return_dict=False)[0]
        x = ref_sched.step(vn + g * (vp - vn), t, x, return_dict=False)[0]
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def test_original_without_guidance_makes_one_call_per_step():
    spec = get_model("wan-tiny")
    eng = RecordingEngine(spec, {"main": _known_denoiser})
    ctx = torch.randn(1, spec.text_len, spec.dit.text_dim, dtype=torch.float64)
    sample_original(eng, ctx, ctx, steps=2, guidance_scale=1.0)
    assert len(eng.calls()) == 2


def test_original_two_experts_switch_on_timestep():
    spec = get_model("wan-tiny-i2v")  # boundary 0.9: t >= 900 -> high noise
    fns = {n: (lambda x, t, c: 0.1 * x[:, :16]) for n in spec.experts}
    eng = RecordingEngine(spec, fns)
    _, f, h, w = spec.latent_shape(W, H, FRAMES)
    cond = torch.randn(1, 20, f, h, w, dtype=torch.float64)
    ctx = torch.randn(1, spec.text_len, spec.dit.text_dim, dtype=torch.float64)
    sample_original(eng, ctx, ctx, condition=cond, steps=6, guidance_scale=2.0)
    seen = [(c[2], c[1]) for c in eng.calls()]
    assert len(seen) == 12
    assert all((name == "high_noise") == (t >= 900.0) for t, name in seen)
    assert {name for _, name in seen} == {"high_noise", "low_noise"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rcm_same_seed_same_noise_on_cpu_and_gpu():
    assert torch.equal(NoiseSource(3, "cuda")((4, 5)).cpu(), NoiseSource(3, "cpu")((4, 5)))
    spec = get_model("wan-tiny")
    ctx = torch.randn(1, spec.text_len, spec.dit.text_dim, generator=torch.Generator().manual_seed(1))
    outs = []
    for dev in ("cpu", "cuda"):
        eng = EagerEngine(spec, {"main": random_dit(spec, seed=0)}, W, H, FRAMES, device=dev)
        outs.append(sample_rcm(eng, ctx, steps=2, seed=4).cpu())
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-3, atol=2e-3)
