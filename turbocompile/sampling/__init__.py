"""Samplers that drive an :class:`~turbocompile.engine.Engine`: rCM (few-step, the default) and the
original Wan flow-matching UniPC sampler with classifier-free guidance (for comparison)."""
from .experts import ExpertStepper, expert_plan
from .noise import NoiseSource
from .original import WAN_NEGATIVE_PROMPT, flow_shift, make_scheduler, sample_original
from .rcm import (MAX_RCM_STEPS, RCM_MID_ANGLES, check_dense_steps, check_rcm_steps, net_timestep, rcm_timesteps,
                  rcm_update, sample_rcm)

__all__ = [
    "ExpertStepper", "MAX_RCM_STEPS", "NoiseSource", "RCM_MID_ANGLES", "WAN_NEGATIVE_PROMPT",
    "check_dense_steps", "check_rcm_steps", "expert_plan", "flow_shift", "make_scheduler", "net_timestep",
    "rcm_timesteps", "rcm_update", "sample_original", "sample_rcm",
]
