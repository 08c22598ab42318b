"""Image upscaling with a Real-ESRGAN network, tiled so that memory stays bounded at any size.

`load_upscaler(path)` reads `upscaler/model.safetensors` (or any Real-ESRGAN safetensors file),
detects RRDBNet or SRVGGNetCompact from its keys, and returns an `Upscaler`:

    Upscaler.upscale(pixels: HxWx3 uint8, scale=None) -> uint8

runs the network at its own factor, then resamples with Lanczos when another factor (or an exact
size) is asked for, as A1111 does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from convert.esrgan_keys import build_upscaler
from convert.loader import resolve_dtype
from convert.restoration import load_strict, read_weights
from mlx_sd.engine.backends import Backend
from mlx_sd.models.esrgan import RRDBNet, SRVGGNetCompact

UPSCALER_FILE = "upscaler/model.safetensors"  # relative to the model directory
# Input pixels per tile side, and context added around each tile. The context covers most of the
# networks' receptive field, so a tile's centre matches the untiled result and no seam shows.
DEFAULT_TILE = 192
DEFAULT_PAD = 24


def tiled(fn: Callable[[mx.array], mx.array], x: mx.array, scale: int, tile: int, pad: int) -> mx.array:
    """`fn` (an image-to-image network that scales by `scale`) over (1, H, W, C) `x`, one tile at a
    time: each `tile`-sided piece runs with up to `pad` pixels of surrounding context, and only the
    output of the piece itself is kept (Real-ESRGAN's own tiling)."""
    _, height, width, _ = x.shape
    if height <= tile and width <= tile:
        return fn(x)
    rows = []
    for top in range(0, height, tile):
        row = []
        for left in range(0, width, tile):
            t0, l0 = max(top - pad, 0), max(left - pad, 0)
            t1, l1 = min(top + tile + pad, height), min(left + tile + pad, width)
            out = fn(x[:, t0:t1, l0:l1])
            oy, ox = (top - t0) * scale, (left - l0) * scale
            h, w = (min(top + tile, height) - top) * scale, (min(left + tile, width) - left) * scale
            piece = out[:, oy:oy + h, ox:ox + w]
            mx.eval(piece)  # evaluate per tile, so only one tile's activations are ever alive
            row.append(piece)
        rows.append(mx.concatenate(row, axis=2))
    return mx.concatenate(rows, axis=1)


@dataclass
class Upscaler:
    network: RRDBNet | SRVGGNetCompact
    dtype: mx.Dtype = mx.float32  # the weights' dtype, which the network is fed in
    tile: int = DEFAULT_TILE
    pad: int = DEFAULT_PAD

    @property
    def scale(self) -> int:
        return self.network.scale

    def upscale(self, pixels: np.ndarray, scale: float | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
        """Upscale an HxWx3 uint8 image by the network's factor, then to `scale` times the input or
        to `size` (width, height) with Lanczos when either is given and differs."""
        height, width, _ = pixels.shape
        out = self._run(pixels)
        if size is None and scale is not None:
            size = (round(width * scale), round(height * scale))
        if size is not None and size != (out.shape[1], out.shape[0]):
            out = np.asarray(Image.fromarray(out).resize(size, Image.LANCZOS))
        return out

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        height, width, _ = pixels.shape
        m = self.network.size_multiple
        # x2/x1 models fold m x m pixels into channels: pad to a multiple of m, crop afterwards.
        padded = np.pad(pixels, ((0, -height % m), (0, -width % m), (0, 0)), mode="edge")
        x = (mx.array(padded)[None].astype(mx.float32) / 255.0).astype(self.dtype)
        tile = max(m, self.tile // m * m)  # tiles must be whole multiples too
        y = tiled(self.network, x, self.scale, tile, self.pad)
        y = y[0, : height * self.scale, : width * self.scale].astype(mx.float32)
        return np.array(mx.round(mx.clip(y, 0.0, 1.0) * 255).astype(mx.uint8))


def load_upscaler(path: str | Path, dtype: mx.Dtype | str | None = None, tile: int = DEFAULT_TILE,
                  pad: int = DEFAULT_PAD, backend: Backend = Backend.MLX) -> Upscaler:
    """The Real-ESRGAN network in a safetensors file (see `convert.pth` for the released .pth),
    prepared for `backend`."""
    path = Path(path)
    weights = read_weights(path)
    network, dtype = build_upscaler(weights, path), resolve_dtype(dtype)
    load_strict(network, weights, dtype, path)
    return Upscaler(backend.prepare(network), dtype, tile, pad)


def upscale_file(source: Path, destination: Path | None, weights: Path, scale: float | None = None,
                 backend: Backend = Backend.MLX) -> Path:
    """Upscale an image file (any format Pillow reads) into a PNG; returns the file written.
    Without `destination` it is written beside the source as `<name>_x<scale>.png`."""
    upscaler = load_upscaler(weights, backend=backend)
    with Image.open(source) as image:
        pixels = np.asarray(image.convert("RGB"))
    out = upscaler.upscale(pixels, scale)
    destination = destination or source.with_name(f"{source.stem}_x{scale or upscaler.scale:g}.png")
    Image.fromarray(out).save(destination)
    return destination
