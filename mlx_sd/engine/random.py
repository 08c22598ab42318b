"""Gaussian noise that reproduces PyTorch's CPU generator, so a seed gives the same image here as in
diffusers / A1111 (with its RNG source set to "CPU").

PyTorch's CPU generator (torch 2.x, `CPUGeneratorImpl`) is a 32-bit Mersenne Twister seeded with the
standard `init_genrand` from the low 32 bits of the 64-bit seed. `torch.randn` draws float32 in one of
two ways, picked per call:

* numel >= 16 (a contiguous float tensor): `normal_fill`. It draws one 32-bit word per element and keeps
  its low 24 bits as a uniform u = w / 2**24. Each block of 16 uniforms becomes 16 normals by Box-Muller
  in float32: for j < 8, r = sqrt(-2 log(1 - u[j])), theta = 2pi * u[j + 8], out[j] = r cos(theta),
  out[j + 8] = r sin(theta). When numel is not a multiple of 16, 16 more uniforms are drawn and the
  last 16 outputs are recomputed from them (overwriting part of the previous block).
* numel < 16: a scalar path in double precision. Each uniform uses two words (hi << 32 | lo, low 53 bits
  / 2**53); a pair (u1, u2) gives r = sqrt(-2 log1p(-u2)), theta = 2pi * u1; r cos(theta) is returned and
  r sin(theta) is cached in the generator for the next scalar-path draw (the fill path ignores the cache).

The scalar path matches torch bit for bit. The fill path's float32 transcendentals come from SLEEF
(1 ulp) in torch's vectorised kernels; ours are correctly rounded, so about 1 in 6 values differs by
1-2 ulp (at most ~5e-7 absolute), which is far below anything visible in an image.

Batches. diffusers draws a whole batch from one generator (`randn((B, ...), generator=g)`), so image i
depends on the batch size. A1111 gives image i its own generator seeded with seed + i and draws each
item's noise from it, for the initial latent and for every later per-step draw. `BatchGenerator` follows
A1111 so that any image of a batch can be reproduced alone from its seed.

Seed modes (`SEED_MODES`, for `BatchGenerator`), Draw Things' `SeedMode` values:
* "torch_cpu": this generator.
* "nvidia_gpu": torch's CUDA generator (`random_cuda.CudaCompatibleGenerator`).
* "scale_alike": Draw Things' "Scale Alike": torch-CPU noise drawn in (H, W, C) order, whose 8x8 cell
  blocks are laid out in square rings from the centre outwards (draw-things-community,
  LocalImageGenerator.swift `nestSquares`), so the centre of a larger image starts from the same noise
  as a smaller one.
* "legacy": Draw Things' first mode draws on the GPU with its own graph library's generator, which no
  public source pins down; it is served as "torch_cpu".
Draw Things draws a batch from one generator ("torch_cpu", "nvidia_gpu") or chains per-image seeds by
xorshift ("scale_alike"); here every image keeps its own seed in every mode, so the seed recorded with
an image reproduces it alone. For a batch of one both give the same noise.

Layout: torch draws latents as (B, C, H, W). Latents in another layout must be drawn in that shape and
transposed (`sampling.samplers.noise_source` does this for NHWC), or the values land on other pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from mlx_sd.engine.random_cuda import CudaCompatibleGenerator

_MT_STATE_WORDS = 624
_FILL_BLOCK = 16
_U64 = 1 << 64


def _mt_key(seed32: int) -> np.ndarray:
    """MT19937 `init_genrand` state for a 32-bit seed."""
    key = np.empty(_MT_STATE_WORDS, dtype=np.uint32)
    word = seed32
    key[0] = word
    for i in range(1, _MT_STATE_WORDS):
        word = (1812433253 * (word ^ (word >> 30)) + i) & 0xFFFFFFFF
        key[i] = word
    return key


def _box_muller_blocks(u: np.ndarray) -> np.ndarray:
    """torch's `normal_fill_16` on rows of 16 float32 uniforms, with its float32 rounding order."""
    u1 = np.float32(1.0) - u[:, :8]
    u2 = u[:, 8:]
    radius = np.sqrt(np.float32(-2.0) * np.log(u1.astype(np.float64)).astype(np.float32))
    theta = (np.float32(2.0 * np.pi) * u2).astype(np.float64)
    cos = np.cos(theta).astype(np.float32)
    sin = np.sin(theta).astype(np.float32)
    return np.concatenate([radius * cos, radius * sin], axis=1)


class TorchCompatibleGenerator:
    """Stands in for `torch.Generator("cpu").manual_seed(seed)`; successive `randn` calls continue the
    stream exactly as successive `torch.randn(..., generator=g)` calls do."""

    def __init__(self, seed: int) -> None:
        if not -(1 << 63) <= seed < _U64:
            raise ValueError(f"seed {seed} is outside torch's range [-2**63, 2**64)")
        self.seed = seed % _U64  # torch keeps negative seeds as their two's-complement uint64
        self._mt = np.random.MT19937()
        # pos = 624 makes the first draw regenerate the whole state, as torch's engine does.
        self._mt.state = {
            "bit_generator": "MT19937",
            "state": {"key": _mt_key(self.seed & 0xFFFFFFFF), "pos": _MT_STATE_WORDS},
        }
        self._cached_normal: float | None = None

    def _words(self, n: int) -> np.ndarray:
        return self._mt.random_raw(n).astype(np.uint32)

    def _fill_normals(self, n: int) -> np.ndarray:
        whole = n - n % _FILL_BLOCK
        extra = _FILL_BLOCK if n % _FILL_BLOCK else 0
        uniforms = (self._words(n + extra) & 0xFFFFFF).astype(np.float32) * np.float32(2.0**-24)
        out = np.empty(n, dtype=np.float32)
        out[:whole] = _box_muller_blocks(uniforms[:whole].reshape(-1, _FILL_BLOCK)).ravel()
        if extra:
            out[n - _FILL_BLOCK :] = _box_muller_blocks(uniforms[n:].reshape(1, _FILL_BLOCK)).ravel()
        return out

    def _uniform_double(self) -> float:
        hi, lo = (int(w) for w in self._words(2))
        return (((hi << 32) | lo) & ((1 << 53) - 1)) * 2.0**-53

    def _scalar_normal(self) -> float:
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        u1 = self._uniform_double()
        u2 = self._uniform_double()
        radius = np.sqrt(-2.0 * np.log1p(-u2))
        theta = 2.0 * np.pi * u1
        self._cached_normal = float(radius * np.sin(theta))
        return float(radius * np.cos(theta))

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        """Standard normal float32 array, the same values `torch.randn(shape, generator=g)` gives."""
        shape = tuple(int(d) for d in shape)
        n = int(np.prod(shape, dtype=np.int64))
        if n >= _FILL_BLOCK:
            flat = self._fill_normals(n)
        else:
            flat = np.array([self._scalar_normal() for _ in range(n)], dtype=np.float32)
        return flat.reshape(shape)


_CELL = 8  # scale_alike's block side, in latent cells


def _ring_order(rows: int, cols: int) -> list[tuple[int, int]]:
    """The (row, col) blocks of a rows x cols grid in Draw Things' nestSquares order: square rings of
    side 2, 4, 6, ... around the centre, each walked clockwise from its top-left corner (top edge,
    right edge, bottom edge, left edge), skipping blocks outside the grid."""
    order = []
    for k in range((max(rows, cols) + 1) // 2):
        side = 2 * k + 2
        top, left = (rows + 1) // 2 - k - 1, (cols + 1) // 2 - k - 1
        edges = (
            [(top, left + i) for i in range(side - 1)],
            [(top + i, left + side - 1) for i in range(side - 1)],
            [(top + side - 1, left + side - 1 - i) for i in range(side - 1)],
            [(top + side - 1 - i, left) for i in range(side - 1)],
        )
        order += [(r, c) for edge in edges for r, c in edge if 0 <= r < rows and 0 <= c < cols]
    return order


def nest_squares(noise: np.ndarray) -> np.ndarray:
    """Draw Things' scale-alike layout of (H, W, C) noise: consecutive 8 x 8 x C chunks of the flat
    noise become 8 x 8 blocks placed in `_ring_order`. Sizes that are not whole blocks, or less than
    two blocks on a side, keep the plain layout."""
    height, width, channels = noise.shape
    rows, cols = height // _CELL, width // _CELL
    if height % _CELL or width % _CELL or min(rows, cols) < 2:
        return noise
    rows_at, cols_at = np.array(_ring_order(rows, cols)).T
    out = np.empty_like(noise)
    blocks = out.reshape(rows, _CELL, cols, _CELL, channels)
    blocks[rows_at, :, cols_at] = noise.reshape(-1, _CELL, _CELL, channels)
    return out


class ScaleAlikeGenerator:
    """Draw Things' "Scale Alike" noise: a torch CPU generator whose (C, H, W) draws are made in
    (H, W, C) order and nested (`nest_squares`); other shapes are drawn as torch draws them."""

    def __init__(self, seed: int) -> None:
        self._torch = TorchCompatibleGenerator(seed)

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        if len(shape) != 3:
            return self._torch.randn(shape)
        channels, height, width = (int(d) for d in shape)
        flat = self._torch.randn((height * width * channels,))
        return nest_squares(flat.reshape(height, width, channels)).transpose(2, 0, 1)


class Generator(Protocol):
    def randn(self, shape: Sequence[int]) -> np.ndarray: ...


SEED_MODES: dict[str, Callable[[int], Generator]] = {
    "legacy": TorchCompatibleGenerator,
    "torch_cpu": TorchCompatibleGenerator,
    "scale_alike": ScaleAlikeGenerator,
    "nvidia_gpu": CudaCompatibleGenerator,
}
DEFAULT_SEED_MODE = "torch_cpu"


class BatchGenerator:
    """One generator per batch item (A1111's convention): item i's noise comes only from seeds[i]."""

    def __init__(self, seeds: Sequence[int], seed_mode: str = DEFAULT_SEED_MODE) -> None:
        if not seeds:
            raise ValueError("at least one seed is needed")
        self.generators = [SEED_MODES[seed_mode](s) for s in seeds]

    @classmethod
    def consecutive(cls, seed: int, batch_size: int, seed_mode: str = DEFAULT_SEED_MODE) -> BatchGenerator:
        """Seeds seed, seed + 1, ... for the images of one request, as A1111 numbers them."""
        return cls([seed + i for i in range(batch_size)], seed_mode)

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        """Noise of `shape` (batch first); each item draws shape[1:] from its own generator."""
        if shape[0] != len(self.generators):
            raise ValueError(f"batch dimension {shape[0]} != {len(self.generators)} seeds")
        return np.stack([g.randn(shape[1:]) for g in self.generators])
