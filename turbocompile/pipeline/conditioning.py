"""Image-to-video conditioning: the 20 channels (4 mask + 16 image latent) concatenated to the noise latent.

As Wan2.1/2.2 I2V and TurboDiffusion do it: the image becomes pixel frame 0 of an otherwise black clip,
the clip is VAE-encoded (normalized latents), and a 4-channel mask folds the 4 pixel frames of each
latent frame (latent frame 0 = ones, the rest zeros). The engine was built for one static size, so the
image must have (about) the engine's aspect; it is resized to the engine's size.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError, UnsupportedShapeError
from ..zoo import RESOLUTIONS, ModelSpec

#: largest relative aspect difference accepted without --adaptive-resolution (the zoo's 832x480 is 1.733, not 16/9)
ASPECT_TOLERANCE = 0.05


def load_image(image: Any):
    """A PIL RGB image from a path, a PIL image, an ``[H, W, 3]`` uint8 array or a ``[3, H, W]`` tensor in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        p = Path(image)
        if not p.is_file():
            raise InputError(f"image not found: {p}; pass an existing PNG/JPEG to --image")
        try:
            with Image.open(p) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError):
            raise InputError(f"cannot read {p} as an image; pass a PNG or JPEG to --image") from None
    if isinstance(image, torch.Tensor):
        arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(arr, "RGB")
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 3:
        return Image.fromarray(image.astype(np.uint8), "RGB")
    raise InputError(f"unsupported image of type {type(image).__name__}; pass a path, a PIL image or an array")


def _tier_sizes(width: int, height: int) -> list[tuple[int, int]]:
    for sizes in RESOLUTIONS.values():
        if (width, height) in sizes.values():
            return list(sizes.values())
    return [(width, height)]


def closest_size(image_w: int, image_h: int, width: int, height: int) -> tuple[int, int]:
    """The zoo size of the engine's resolution tier whose aspect is closest to the image's."""
    ar = math.log(image_w / image_h)
    return min(_tier_sizes(width, height), key=lambda s: abs(math.log(s[0] / s[1]) - ar))


def check_image_size(image_w: int, image_h: int, width: int, height: int, adaptive_resolution: bool = False) -> None:
    """Raise :class:`UnsupportedShapeError` when the image cannot be fitted to the engine's static size."""
    if adaptive_resolution:
        best = closest_size(image_w, image_h, width, height)
        if best != (width, height):
            raise UnsupportedShapeError(
                f"the {image_w}x{image_h} image's aspect picks {best[0]}x{best[1]}, but this engine was built for "
                f"{width}x{height}; build an engine at {best[0]}x{best[1]} or crop the image to {width}:{height}")
        return
    if abs((image_w / image_h) / (width / height) - 1.0) > ASPECT_TOLERANCE:
        raise UnsupportedShapeError(
            f"the image is {image_w}x{image_h} but this engine makes {width}x{height} video; crop the image to "
            f"a {width}:{height} aspect, or pass --adaptive-resolution with an engine built for the image's aspect")


def image_to_tensor(image, width: int, height: int) -> torch.Tensor:
    """Resize (bicubic) to the engine's size and scale to [-1, 1]: ``[3, H, W]`` float32."""
    from PIL import Image

    img = image.resize((width, height), Image.BICUBIC) if image.size != (width, height) else image
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return arr / 127.5 - 1.0


def i2v_mask(frames: int, lat_h: int, lat_w: int, stride_t: int = 4) -> torch.Tensor:
    """``[1, 4, F_lat, h, w]``: which pixel frames are given (frame 0), 4 pixel frames per latent frame."""
    msk = torch.zeros(1, frames, lat_h, lat_w)
    msk[:, 0] = 1.0
    msk = torch.cat([msk[:, :1].repeat_interleave(stride_t, dim=1), msk[:, 1:]], dim=1)
    lat_f = msk.shape[1] // stride_t
    return msk.view(1, lat_f, stride_t, lat_h, lat_w).transpose(1, 2)


@torch.no_grad()
def i2v_condition(vae, image, spec: ModelSpec, width: int, height: int, frames: int,
                  adaptive_resolution: bool = False) -> torch.Tensor:
    """The I2V conditioning ``[1, 20, F_lat, h, w]`` (mask then image latent), float32 on the VAE's device."""
    from .vae import encode_video

    img = load_image(image)
    check_image_size(img.width, img.height, width, height, adaptive_resolution)
    _, lat_f, lat_h, lat_w = spec.latent_shape(width, height, frames)
    pixels = torch.zeros(1, 3, frames, height, width)
    pixels[0, :, 0] = image_to_tensor(img, width, height)
    latent = encode_video(vae, pixels)
    if tuple(latent.shape[2:]) != (lat_f, lat_h, lat_w):
        raise UnsupportedShapeError(f"the VAE gave a {tuple(latent.shape[2:])} latent, the engine expects "
                                    f"{(lat_f, lat_h, lat_w)}; is --vae the model's VAE?")
    mask = i2v_mask(frames, lat_h, lat_w, spec.vae_stride[0]).to(latent.device, latent.dtype)
    return torch.cat([mask, latent], dim=1)
