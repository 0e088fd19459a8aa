"""Which expert denoises each step, and moving experts on and off the device around the switch.

Wan2.2 A14B has two full DiTs: the high-noise expert runs while the rectified-flow time ``t`` (0..1,
unrounded) is at or above ``spec.boundary``, the low-noise expert afterwards. The plan is known before
sampling starts, so the next expert can be prefetched one step ahead and the previous one released
right after the switch.
"""
from __future__ import annotations

import logging
from typing import Sequence

from ..engine import Denoiser, Engine
from ..zoo import ModelSpec

log = logging.getLogger(__name__)


def expert_plan(spec: ModelSpec, times: Sequence[float], expert_names: Sequence[str] | None = None) -> list[str]:
    """The expert name for each step; ``times`` are the RF times (0..1) at which the net is called."""
    names = tuple(expert_names) if expert_names is not None else spec.experts
    if len(names) == 1:
        return [names[0]] * len(times)
    if spec.boundary is None:
        raise ValueError(f"{spec.id} has {len(names)} experts but no boundary")
    high = "high_noise" if "high_noise" in names else names[0]
    low = "low_noise" if "low_noise" in names else names[1]
    return [high if t >= spec.boundary else low for t in times]


class ExpertStepper:
    """Hands out each step's denoiser: prefetches the next expert one step before a switch and releases
    the previous one once the switch happened."""

    def __init__(self, engine: Engine, plan: Sequence[str], dense_steps: int = 0):
        self.engine = engine
        self.plan = list(plan)
        self.dense_steps = dense_steps  # validated by the caller (rcm.check_dense_steps)

    def denoiser(self, step: int) -> Denoiser:
        """Step ``step``'s denoiser; the first ``dense_steps`` steps get the dense-attention variant."""
        name = self.plan[step]
        fn = self.engine.dense_expert(name) if step < self.dense_steps else self.engine.expert(name)
        if step > 0 and self.plan[step - 1] != name:
            log.info("step %d: switched expert %s -> %s", step + 1, self.plan[step - 1], name)
            self.engine.release(self.plan[step - 1])
        if step + 1 < len(self.plan) and self.plan[step + 1] != name:
            self.engine.prefetch(self.plan[step + 1])
        return fn
