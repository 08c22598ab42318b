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

Layout: torch draws latents as (B, C, H, W). Latents in another layout must be drawn in that shape and
transposed (`sampling.samplers.noise_source` does this for NHWC), or the values land on other pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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


class BatchGenerator:
    """One generator per batch item (A1111's convention): item i's noise comes only from seeds[i]."""

    def __init__(self, seeds: Sequence[int]) -> None:
        if not seeds:
            raise ValueError("at least one seed is needed")
        self.generators = [TorchCompatibleGenerator(s) for s in seeds]

    @classmethod
    def consecutive(cls, seed: int, batch_size: int) -> BatchGenerator:
        """Seeds seed, seed + 1, ... for the images of one request, as A1111 numbers them."""
        return cls([seed + i for i in range(batch_size)])

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        """Noise of `shape` (batch first); each item draws shape[1:] from its own generator."""
        if shape[0] != len(self.generators):
            raise ValueError(f"batch dimension {shape[0]} != {len(self.generators)} seeds")
        return np.stack([g.randn(shape[1:]) for g in self.generators])
