"""Seeded Gaussian noise that is the same on every device.

CUDA and CPU generators produce different streams for the same seed, so a video made on a GPU could
not be reproduced on a CPU. Drawing every sample from one CPU ``torch.Generator`` and then moving it
costs a host-to-device copy per draw (a few MB per step at 720p) and makes ``seed`` mean the same
thing everywhere.
"""
from __future__ import annotations

from typing import Sequence

import torch


class NoiseSource:
    """Draws ``N(0, 1)`` tensors in sequence from one seeded CPU generator, then moves them."""

    def __init__(self, seed: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.seed = int(seed)
        self.device = torch.device(device)
        self.dtype = dtype
        self._gen = torch.Generator(device="cpu").manual_seed(self.seed)

    def __call__(self, shape: Sequence[int]) -> torch.Tensor:
        sample = torch.randn(tuple(shape), generator=self._gen, dtype=torch.float32)
        # move the float32 draw, then widen on the device: half the bytes over PCIe for float64 states
        return sample.to(self.device).to(self.dtype)
