"""The original Wan sampler, for comparison: flow matching with UniPC and classifier-free guidance.

diffusers' ``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
flow_shift=spec.sample_shift)`` gives the shifted schedule ``s' = shift*s / (1 + (shift - 1)*s)`` and the
UniPC (bh2, order 2) update Wan uses. Each step makes two network calls, one with the prompt and one
with the negative prompt, combined as ``v = v_neg + g*(v_pos - v_neg)``; ``spec.original_steps`` steps by
default (50 for T2V). Two-expert models switch at ``t/1000 >= spec.boundary`` like the rCM sampler.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..engine import Engine
from ..errors import InputError
from .experts import ExpertStepper, expert_plan
from .noise import NoiseSource
from .rcm import StepCallback

#: Wan's default negative prompt (``sample_neg_prompt`` of the Wan2.1/2.2 shared config).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def flow_shift(sigma: float, shift: float) -> float:
    """Wan's time shift of a flow-matching sigma."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def make_scheduler(shift: float, steps: int, device: torch.device | str = "cpu"):
    """diffusers' UniPC scheduler configured as Wan's flow-matching solver, with ``steps`` timesteps set."""
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                    use_flow_sigmas=True, flow_shift=shift, solver_order=2,
                                    solver_type="bh2", lower_order_final=True)
    sched.set_timesteps(steps, device=device)
    return sched


@torch.no_grad()
def sample_original(engine: Engine, context: torch.Tensor, negative_context: torch.Tensor | None, *,
                    condition: torch.Tensor | None = None, steps: int | None = None,
                    guidance_scale: float | None = None, shift: float | None = None, seed: int = 0,
                    noise: Callable[[Sequence[int]], torch.Tensor] | None = None,
                    on_step: StepCallback | None = None) -> torch.Tensor:
    """Sample one latent video ``[1, C, F, H, W]`` (float32) with UniPC + CFG.

    ``guidance_scale <= 1`` (or no ``negative_context``) makes one conditional call per step.
    """
    spec = engine.spec
    steps = spec.original_steps if steps is None else steps
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"the original sampler needs at least 1 step, got {steps}")
    g = spec.guide_scale if guidance_scale is None else float(guidance_scale)
    sched = make_scheduler(spec.sample_shift if shift is None else shift, steps, engine.device)
    shape = (1, *spec.latent_shape(engine.width, engine.height, engine.frames))
    draw = noise or NoiseSource(seed, engine.device, torch.float32)
    ctx = context.to(engine.device, engine.dtype)
    use_cfg = g > 1.0 and negative_context is not None
    neg = negative_context.to(engine.device, engine.dtype) if use_cfg else None
    cond = condition.to(engine.device, engine.dtype) if condition is not None else None
    timesteps = [float(t) for t in sched.timesteps]
    stepper = ExpertStepper(engine, expert_plan(spec, [t / 1000.0 for t in timesteps], engine.expert_names))

    x = draw(shape).to(device=engine.device, dtype=torch.float32) * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        fn = stepper.denoiser(i)
        inp = x.to(engine.dtype)
        if cond is not None:
            inp = torch.cat([inp, cond], dim=1)
        t_in = t.reshape(1).to(device=engine.device, dtype=torch.float32)
        v = fn(inp, t_in, ctx).float()
        if use_cfg:
            v_neg = fn(inp, t_in, neg).float()
            v = v_neg + g * (v - v_neg)
        x = sched.step(v, t, x, return_dict=False)[0]
        if on_step is not None:
            on_step(i, steps, timesteps[i] / 1000.0, stepper.plan[i])
    return x.to(torch.float32)
