"""A1111's hires fix: a first pass at the model's native area, upscaled, then refined img2img."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from mlx_sd.engine import img2img

DEFAULT_STRENGTH = 0.7  # A1111's default hires denoising strength, used when the request sends 0
_MULTIPLE = 64


def first_pass_size(width: int, height: int, native: int) -> tuple[int, int] | None:
    """The first pass's size for a `width`x`height` hires request, or None when the request is not
    larger than the native area (then hires fix is a no-op and one pass runs at the requested size).

    The first pass keeps the requested aspect ratio at the native area, each side rounded to 64.
    """
    if width * height <= native * native:
        return None
    scale = math.sqrt(native * native / (width * height))
    return (max(_MULTIPLE, round(width * scale / _MULTIPLE) * _MULTIPLE),
            max(_MULTIPLE, round(height * scale / _MULTIPLE) * _MULTIPLE))


def img2img_start(steps: int, strength: float) -> int:
    """Index into a `steps`-step schedule at which img2img starts: A1111 runs the last
    int(strength * steps) steps (at least one) of the full schedule."""
    return min(steps - 1, img2img.start_index(steps, strength))


def resize_lanczos(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a batch of (B, H, W, 3) uint8 images with Lanczos, the fallback without an upscaler."""
    return np.stack([np.asarray(Image.fromarray(p).resize((width, height), Image.LANCZOS)) for p in pixels])
