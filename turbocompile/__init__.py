"""turbocompile: capture a Wan video DiT as a graph, rewrite it with passes, lower it, sample it with rCM."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load", "build"]


def load(path, **kwargs):
    """Open a built artifact as an engine; see :func:`turbocompile.runtime.load`."""
    from .runtime import load as _load

    return _load(path, **kwargs)


def build(options):
    """Build an artifact from :class:`turbocompile.build.BuildOptions`; see :func:`turbocompile.build.build`."""
    from .build import build as _build

    return _build(options)
