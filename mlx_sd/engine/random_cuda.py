"""Gaussian noise that reproduces PyTorch's CUDA generator on the CPU (Draw Things' "NVIDIA GPU
Compatible" seed mode, A1111's "NV" RNG source), so a seed gives the image a CUDA machine gives.

torch's CUDA `randn` (`normal_kernel` -> `distribution_nullary_kernel`) runs Philox4x32-10 through
cuRAND: thread i calls `curand_init(seed, subsequence=i, offset)` and `curand_normal4`, i.e. one
Philox block with key (seed low 32 bits, seed high 32 bits) and counter (offset / 4, 0, i, 0), whose
words (x0, x1) give its first normal by cuRAND's Box-Muller: u = x0 * 2**-32 + 2**-33,
v = x1 * 2pi * 2**-32 + pi * 2**-32, sqrt(-2 log u) * sin(v). Element i of the tensor is thread i's
first normal as long as the launch covers the tensor in one wave of threads (SMs x max threads per
SM: 221,184 on an A100, 270,336 on an H100; a latent of 4 x 128 x 128 has 65,536), and every such
call advances the generator's offset by 4 (one counter step). Larger tensors wrap onto the threads'
other normals in a layout that depends on the GPU's SM count; Draw Things and A1111 keep the one-wave
layout for every size, and so does this.

The transform is computed in float64 and rounded to float32 (as Draw Things and A1111 do); cuRAND's
float32 `logf` / `sinf` may differ from it in the last bit or two.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_U32 = np.uint64(0xFFFFFFFF)
_PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_U64 = 1 << 64


def philox4x32_10(counter: Sequence[np.ndarray], key: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Philox4x32 with 10 rounds (Salmon et al. 2011, Random123) on arrays of counters: `counter` is
    four uint32 arrays (words 0..3), `key` two 32-bit words; returns the four output words."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = key
    for _ in range(10):
        p0, p1 = _PHILOX_M[0] * c0, _PHILOX_M[1] * c2
        high0, high1 = p0 >> np.uint64(32), p1 >> np.uint64(32)
        c0, c1, c2, c3 = high1 ^ c1 ^ np.uint64(k0), p1 & _U32, high0 ^ c3 ^ np.uint64(k1), p0 & _U32
        k0, k1 = (k0 + _PHILOX_W[0]) & 0xFFFFFFFF, (k1 + _PHILOX_W[1]) & 0xFFFFFFFF
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))


def curand_box_muller_sin(x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """The first normal of cuRAND's Box-Muller pair from two uint32 words."""
    u = x0.astype(np.float64) * 2.0**-32 + 2.0**-33
    v = x1.astype(np.float64) * (2.0 * np.pi * 2.0**-32) + np.pi * 2.0**-32
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


class CudaCompatibleGenerator:
    """Stands in for `torch.Generator("cuda").manual_seed(seed)`; successive `randn` calls continue the
    stream as successive `torch.randn(..., generator=g, device="cuda")` calls do."""

    def __init__(self, seed: int) -> None:
        if not -(1 << 63) <= seed < _U64:
            raise ValueError(f"seed {seed} is outside torch's range [-2**63, 2**64)")
        self.seed = seed % _U64
        self._counter = 0  # Philox counter word 0: torch's offset / 4

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        """Standard normal float32 array of `shape`, in torch's (row-major) element order."""
        shape = tuple(int(d) for d in shape)
        n = int(np.prod(shape, dtype=np.int64))
        index = np.arange(n, dtype=np.uint64)
        counter = (
            np.full(n, self._counter & 0xFFFFFFFF, dtype=np.uint64),
            np.full(n, self._counter >> 32, dtype=np.uint64),
            index & _U32,
            index >> np.uint64(32),
        )
        self._counter += 1
        x0, x1, _, _ = philox4x32_10(counter, (self.seed & 0xFFFFFFFF, self.seed >> 32))
        return curand_box_muller_sin(x0, x1).reshape(shape)
