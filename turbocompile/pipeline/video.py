"""Writing the decoded video as an .mp4 (H.264 through imageio-ffmpeg), atomically.

The file is written under a temporary name in the target folder and renamed into place only when the
encoder finished, so an error or an interrupt never leaves a truncated video at ``path``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

log = logging.getLogger(__name__)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """``[1, 3, F, H, W]`` or ``[3, F, H, W]`` in [-1, 1] -> ``[F, H, W, 3]`` uint8."""
    if video.dim() == 5:
        video = video[0]
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected [3, F, H, W] pixels, got {tuple(video.shape)}")
    frames = ((video.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def require_ffmpeg() -> None:
    """Raise a one-line :class:`InputError` when imageio-ffmpeg (the H.264 encoder's binary) is missing; without
    it imageio would hand the .mp4 to another plugin and fail with an unrelated error."""
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError as exc:
        raise InputError("writing an .mp4 needs the imageio-ffmpeg package: pip install imageio-ffmpeg") from exc


def write_mp4(frames: np.ndarray, path: str | Path, fps: int, quality: float = 8.0) -> Path:
    """Write ``[F, H, W, 3]`` uint8 frames to ``path`` at ``fps``; returns the final path."""
    import imageio.v2 as imageio

    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise InputError(f"the output must be an .mp4 file, got {path}")
    if not path.parent.exists():
        raise InputError(f"the output folder {path.parent} does not exist; create it or pass another --out")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected [F, H, W, 3] uint8 frames, got {frames.shape} {frames.dtype}")
    require_ffmpeg()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial.mp4")
    try:
        # macro_block_size=1: keep the exact size (the zoo sizes are multiples of 16 anyway)
        writer = imageio.get_writer(str(tmp), format="FFMPEG", fps=fps, codec="libx264", quality=quality,
                                    pixelformat="yuv420p", macro_block_size=1,
                                    ffmpeg_log_level="error")
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %s (%d frames, %dx%d, %d fps)", path, len(frames), frames.shape[2], frames.shape[1], fps)
    return path


def read_mp4(path: str | Path) -> np.ndarray:
    """All frames of a video as ``[F, H, W, 3]`` uint8 (for checks and tests)."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path))
    try:
        return np.stack([np.asarray(f) for f in reader])
    finally:
        reader.close()
