"""VAE decoding in overlapping tiles, so large images fit in memory.

Each latent tile (with `overlap` latents shared with its neighbours) is decoded on its own and
the pixels are blended with weights that ramp linearly across the shared band, so no seams
show. The result is close to, not equal to, a whole decode: the decoder's GroupNorms see one
tile's statistics instead of the image's (tests/test_vae_tiling.py measures how close).
"""

from __future__ import annotations

import mlx.core as mx

from mlx_sd.models.vae import AutoencoderKL

SCALE = 8  # pixels per latent


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]  # the last tile ends at the edge


def _ramp(length: int, lead: int, trail: int) -> mx.array:
    """1 in the middle, rising over `lead` pixels and falling over `trail` pixels."""
    pos = mx.arange(length, dtype=mx.float32) + 0.5
    up = mx.minimum(pos / lead, 1.0) if lead else mx.ones(length)
    down = mx.minimum((length - pos) / trail, 1.0) if trail else mx.ones(length)
    return up * down


def decode_tiled(vae: AutoencoderKL, latents: mx.array, tile: int = 64, overlap: int = 16) -> mx.array:
    """`vae.decode(latents)` for (B, h, w, C) latents, `tile` latents square at a time."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
    b, h, w, _ = latents.shape
    if h <= tile and w <= tile:
        return vae.decode(latents)
    rows, cols = _starts(h, tile, tile - overlap), _starts(w, tile, tile - overlap)
    out = weights = None
    for top in rows:
        for left in cols:
            piece = vae.decode(latents[:, top:top + tile, left:left + tile]).astype(mx.float32)
            ph, pw = piece.shape[1:3]
            # Ramp only across bands shared with a neighbour, as wide as the actual overlap.
            lead_r = (rows[rows.index(top) - 1] + tile - top) * SCALE if top != rows[0] else 0
            lead_c = (cols[cols.index(left) - 1] + tile - left) * SCALE if left != cols[0] else 0
            trail_r = (top + tile - rows[rows.index(top) + 1]) * SCALE if top != rows[-1] else 0
            trail_c = (left + tile - cols[cols.index(left) + 1]) * SCALE if left != cols[-1] else 0
            weight = _ramp(ph, lead_r, trail_r)[:, None] * _ramp(pw, lead_c, trail_c)[None, :]
            if out is None:
                out = mx.zeros((b, h * SCALE, w * SCALE, piece.shape[-1]))
                weights = mx.zeros((h * SCALE, w * SCALE))
            y, x = top * SCALE, left * SCALE
            out = out.at[:, y:y + ph, x:x + pw].add(piece * weight[None, :, :, None])
            weights = weights.at[y:y + ph, x:x + pw].add(weight)
            mx.eval(out, weights)  # free this tile's activations before the next
    return (out / weights[None, :, :, None]).astype(latents.dtype)
