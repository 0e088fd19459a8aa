"""Shared fixtures: a wan-tiny build made once per session (CPU, fp32)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("diffusers").setLevel(logging.ERROR)
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible); run on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_build_plain(tmp_path_factory) -> Path:
    """wan-tiny built with only the clean-up passes (output must equal the eager model's)."""
    from turbocompile.build import BuildOptions, build

    out = tmp_path_factory.mktemp("builds") / "plain"
    return build(BuildOptions(model="wan-tiny", out=out, verify=True,
                              skip_passes=["attention_to_sagesla", "linear_to_w8a8", "fuse_norms"]))
