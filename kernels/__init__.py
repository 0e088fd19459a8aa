"""Custom ops: each kernel family in its own file, with its torch.library op, fake impl and reference.

Importing this package registers every ``torch.ops.turbocompile.*`` op. A family whose module fails to
import (e.g. no Triton) still registers its reference implementation.
"""
from __future__ import annotations

import importlib
import logging

log = logging.getLogger(__name__)

#: Modules that register ops. Each helper appends its own; order does not matter.
OP_MODULES: list[str] = []
OP_MODULES += ["sage_attention", "sla", "sage_sla"]
OP_MODULES += ["linear_w8a8", "norms", "rms_norm_rope"]


def load_ops() -> list[str]:
    """Import every op module (idempotent); returns the names loaded."""
    loaded = []
    for name in OP_MODULES:
        importlib.import_module(f"{__name__}.{name}")
        loaded.append(name)
    return loaded
