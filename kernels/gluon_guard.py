"""One switch per Gluon kernel: off for the rest of the process when its first launch fails.

Gluon, Triton's lower-level dialect, is experimental and renames things between releases (Triton 3.6's
``tma.async_copy_global_to_shared`` is ``tma.async_load`` in 3.9). A kernel written against one release can fail to
compile on the user's; the plain Triton kernel beside it still works. So the first failed launch, before any launch
has succeeded, switches the Gluon kernel off with one warning and the caller falls back; after a successful launch
a failure is a real error and propagates.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class GluonGuard:
    """State of one Gluon kernel in this process: ``disabled`` (why, or None) and ``launched``."""

    def __init__(self, name: str, env_hint: str = "", fallback: str = "the Triton kernel"):
        self.name = name
        self.env_hint = env_hint
        self.fallback = fallback  # what the callers run instead, for the warning
        self.disabled: str | None = None
        self.launched = False

    def launch_failed(self, exc: BaseException) -> bool:
        """True (and the kernel is now off) if the caller should fall back; False if ``exc`` must propagate."""
        if self.launched or isinstance(exc, torch.cuda.OutOfMemoryError):
            return False
        text = str(exc).strip()
        self.disabled = f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"[:300]
        log.warning("the Gluon %s kernel failed to run on this Triton (%s); using %s from now on%s",
                    self.name, self.disabled, self.fallback, f" ({self.env_hint})" if self.env_hint else "")
        return True

    def succeeded(self) -> None:
        self.launched = True
