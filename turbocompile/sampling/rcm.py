"""The rCM few-step sampler (TurboDiffusion's inference loop), driving an :class:`~turbocompile.engine.Engine`.

Schedule: TrigFlow angles ``[atan(sigma_max), 1.5, 1.4, 1.0][:steps] + [0]`` mapped to rectified-flow
time ``t = sin(a) / (sin(a) + cos(a))`` (= sigma / (1 + sigma)). The state starts as ``noise * t0``;
each step calls the network once at ``t * 1000`` for the velocity ``v`` and then either

- re-noises (stochastic, the default): ``x0 = x - t*v``; ``x = (1 - t_next)*x0 + t_next*fresh_noise``, or
- takes an Euler step (``ode=True``): ``x = x - (t - t_next)*v``.

No classifier-free guidance (it was distilled in). The state is kept in float64 as TurboDiffusion does;
the net input is cast to the engine dtype. The timestep value fed to the net is ``t*1000`` rounded to
bfloat16 (TurboDiffusion builds it as a bf16 tensor), e.g. 0.987654 -> 988, 0.933781 -> 932, so a
distilled checkpoint sees exactly the timesteps it was trained and evaluated with.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..engine import Engine
from ..errors import InputError
from .experts import ExpertStepper, expert_plan
from .noise import NoiseSource

#: TrigFlow angles of the steps after the first (TurboDiffusion: "for better visual quality").
RCM_MID_ANGLES: tuple[float, ...] = (1.5, 1.4, 1.0)
MAX_RCM_STEPS = len(RCM_MID_ANGLES) + 1

#: ``on_step(step_index, num_steps, t, expert_name)``, called after each network call.
StepCallback = Callable[[int, int, float, str], None]


def check_rcm_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or not 1 <= num_steps <= MAX_RCM_STEPS:
        raise InputError(f"rCM samples with 1 to {MAX_RCM_STEPS} steps, got {num_steps}; pass --steps 1..4 "
                         "(or --sampler unipc for the original many-step sampler)")


def rcm_timesteps(num_steps: int, sigma_max: float) -> list[float]:
    """Rectified-flow times of the rCM schedule, ``num_steps + 1`` values ending in 0.0 (float64 math)."""
    check_rcm_steps(num_steps)
    if not sigma_max > 0:
        raise InputError(f"sigma_max must be positive, got {sigma_max}")
    angles = [math.atan(sigma_max), *RCM_MID_ANGLES[: num_steps - 1]]
    return [math.sin(a) / (math.sin(a) + math.cos(a)) for a in angles] + [0.0]


def net_timestep(t: float) -> float:
    """The value the network receives for RF time ``t``: ``t*1000`` rounded to bfloat16 (as TurboDiffusion)."""
    return float(torch.tensor(t * 1000.0, dtype=torch.float64).to(torch.bfloat16).item())


def rcm_update(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float, noise: torch.Tensor | None,
               ode: bool = False) -> torch.Tensor:
    """One rCM step from time ``t`` to ``t_next`` given the velocity ``v`` (``noise`` unused for ODE)."""
    if ode:
        return x - (t - t_next) * v
    x0 = x - t * v
    if t_next == 0.0:
        return x0
    return (1.0 - t_next) * x0 + t_next * noise


def check_dense_steps(engine: Engine, steps: int, dense_steps: int) -> None:
    """``dense_steps`` must lie in 0..steps, and any dense step needs an engine that can swap its sparse
    attention for dense (``dense_expert``: the torch backend; lowered graphs are fixed)."""
    if not 0 <= dense_steps <= steps:
        raise InputError(f"--dense-steps must be between 0 and the {steps} steps, got {dense_steps}")
    if dense_steps and not hasattr(engine, "dense_expert"):
        raise InputError("--dense-steps needs the torch backend (it swaps the sparse attention for dense per "
                         "step); drop it for this artifact")


@torch.no_grad()
def sample_rcm(engine: Engine, context: torch.Tensor, *, condition: torch.Tensor | None = None,
               steps: int = 4, sigma_max: float | None = None, ode: bool = False, seed: int = 0,
               noise: Callable[[Sequence[int]], torch.Tensor] | None = None,
               on_step: StepCallback | None = None, dense_steps: int = 0) -> torch.Tensor:
    """Sample one latent video ``[1, C, F, H, W]`` (float32) with the rCM schedule.

    ``context`` is ``[1, text_len, text_dim]``; ``condition`` the I2V channels ``[1, 20, F, H, W]`` that are
    concatenated to the noisy latent on every call. ``noise`` overrides the seeded source (tests use it
    to feed a known sequence); the first draw is the initial noise, then one draw per re-noising step.
    ``dense_steps``: the first N steps run the expert with dense attention (a quality knob: the high-noise
    steps lay out the scene, where sparse attention's dropped blocks matter most).
    """
    spec = engine.spec
    times = rcm_timesteps(steps, spec.sigma_max if sigma_max is None else sigma_max)
    shape = (1, *spec.latent_shape(engine.width, engine.height, engine.frames))
    draw = noise or NoiseSource(seed, engine.device, torch.float64)
    ctx = context.to(engine.device, engine.dtype)
    cond = condition.to(engine.device, engine.dtype) if condition is not None else None
    check_dense_steps(engine, steps, dense_steps)
    stepper = ExpertStepper(engine, expert_plan(spec, times[:-1], engine.expert_names), dense_steps)

    x = draw(shape).to(device=engine.device, dtype=torch.float64) * times[0]
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        fn = stepper.denoiser(i)
        inp = x.to(engine.dtype)
        if cond is not None:
            inp = torch.cat([inp, cond], dim=1)
        t_in = torch.full((1,), net_timestep(t), device=engine.device, dtype=torch.float32)
        v = fn(inp, t_in, ctx).to(torch.float64)
        fresh = None if (ode or t_next == 0.0) else draw(shape).to(device=engine.device, dtype=torch.float64)
        x = rcm_update(x, v, t, t_next, fresh, ode)
        if on_step is not None:
            on_step(i, steps, t, stepper.plan[i])
    return x.to(torch.float32)
