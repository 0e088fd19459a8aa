"""GPU targets: what each ``--gpu`` value means for kernel choices, and how to check the local device."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import GPUError


@dataclass(frozen=True)
class Target:
    name: str  # "sm_90", "cpu", ...
    family: str
    attn_blocks: tuple[int, int]  # (query block, key block) for SLA/Sage kernels
    has_fp8: bool
    description: str

    @property
    def is_gpu(self) -> bool:
        return self.name != "cpu"

    @property
    def capability(self) -> tuple[int, int] | None:
        if not self.is_gpu:
            return None
        n = int(self.name.split("_")[1])
        return (n // 10, n % 10)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target("sm_80", "ampere", (128, 64), False, "A100 / A800"),
        Target("sm_89", "ada", (128, 64), True, "RTX 4090 / L40S"),
        Target("sm_90", "hopper", (64, 128), True, "H100 / H200 / H20"),
        Target("sm_100", "blackwell", (128, 64), True, "B200"),
        Target("sm_120", "blackwell-consumer", (128, 64), True, "RTX 5090"),
        Target("cpu", "cpu", (128, 64), False, "CPU (reference implementations; tests and demos)"),
    ]
}


def get_target(name: str) -> Target:
    key = name.strip().lower().replace("sm", "sm_").replace("sm__", "sm_") if name.lower() != "cpu" else "cpu"
    if key not in TARGETS:
        raise GPUError(f"unknown --gpu '{name}'; choose one of {', '.join(TARGETS)}")
    return TARGETS[key]


def local_target() -> Target:
    """The target matching this machine's first CUDA device, or cpu."""
    if not torch.cuda.is_available():
        return TARGETS["cpu"]
    major, minor = torch.cuda.get_device_capability(0)
    name = f"sm_{major}{minor}"
    return TARGETS.get(name, Target(name, "other", (128, 64), major >= 9, torch.cuda.get_device_name(0)))


def check_runnable(target_name: str) -> torch.device:
    """The device an artifact built for ``target_name`` runs on here, or a GPUError naming both archs."""
    target = get_target(target_name)
    if not target.is_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise GPUError(
            f"this artifact was built for {target.name} ({target.description}) but no CUDA GPU is visible; "
            "run it on that GPU or rebuild with --gpu cpu"
        )
    here = local_target()
    if here.name != target.name:
        raise GPUError(
            f"this artifact was built for {target.name} but this GPU is {here.name} "
            f"({torch.cuda.get_device_name(0)}); rebuild with --gpu {here.name}"
        )
    return torch.device("cuda")
