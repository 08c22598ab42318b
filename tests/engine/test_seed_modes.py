"""Seed modes: the CUDA-compatible Philox generator against Random123's published known-answer vectors,
values derived from cuRAND's Box-Muller on them, and torch CUDA outputs published in PyTorch issues;
Draw Things' scale-alike layout against its definition (draw-things-community, `nestSquares`)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlx_sd.engine.random import SEED_MODES, BatchGenerator, TorchCompatibleGenerator, _ring_order, nest_squares
from mlx_sd.engine.random_cuda import CudaCompatibleGenerator, philox4x32_10

# Random123 tests/kat_vectors, philox4x32 with 10 rounds: (counter, key) -> output
RANDOM123_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def box_muller_sin(x0: int, x1: int) -> float:
    """cuRAND's `_curand_box_muller` first output, from its definition."""
    u = x0 * 2.0**-32 + 2.0**-33
    v = x1 * 2.0 * math.pi * 2.0**-32 + math.pi * 2.0**-32
    return math.sqrt(-2.0 * math.log(u)) * math.sin(v)


@pytest.mark.parametrize(("counter", "key", "expected"), RANDOM123_KAT)
def test_philox_matches_random123_known_answers(counter, key, expected) -> None:
    out = philox4x32_10([np.array([c], dtype=np.uint32) for c in counter], key)
    assert tuple(int(word[0]) for word in out) == expected


def test_cuda_randn_follows_curand_layout() -> None:
    # element i is thread i's first normal: Philox counter (offset / 4, 0, i, 0), key = the seed's words
    seed = 0x299F31D0_A4093822
    first = CudaCompatibleGenerator(seed).randn((3,))
    for i, value in enumerate(first):
        x0, x1, _, _ = philox4x32_10([np.array([w], dtype=np.uint32) for w in (0, 0, i, 0)], (0xA4093822, 0x299F31D0))
        assert value == np.float32(box_muller_sin(int(x0[0]), int(x1[0])))
    # seed 0, element 0 comes straight from the all-zero known-answer vector
    assert CudaCompatibleGenerator(0).randn((1,))[0] == np.float32(box_muller_sin(0x6627E8D5, 0xE169C58D))


def test_cuda_randn_second_call_advances_the_offset_by_one_counter_step() -> None:
    generator = CudaCompatibleGenerator(7)
    generator.randn((5,))
    x0, x1, _, _ = philox4x32_10([np.array([w], dtype=np.uint32) for w in (1, 0, 0, 0)], (7, 0))
    assert generator.randn((2,))[0] == np.float32(box_muller_sin(int(x0[0]), int(x1[0])))


@pytest.mark.parametrize(
    ("seed", "shape", "index", "published"),
    [
        # pytorch/pytorch#79496: torch.manual_seed(10); torch.randn(3, device="cuda")
        (10, (3,), np.s_[:], [-0.1029, 1.6810, -0.2708]),
        # pytorch/pytorch#158398: torch.randn([1, 64, 2048], generator=cuda Generator seeded 42), first row
        (42, (1, 64, 2048), np.s_[0, 0, :3], [0.1940, 2.1614, -0.1721]),
        (42, (1, 64, 2048), np.s_[0, 0, -3:], [1.4540, -2.7733, -0.8932]),
    ],
)
def test_cuda_randn_matches_published_torch_cuda_values(seed, shape, index, published) -> None:
    np.testing.assert_allclose(CudaCompatibleGenerator(seed).randn(shape)[index], published, atol=5e-5)


def test_cuda_randn_is_standard_normal_for_a_latent() -> None:
    noise = CudaCompatibleGenerator(1234).randn((4, 128, 128))
    assert noise.dtype == np.float32 and abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02


def test_ring_order_walks_square_rings_clockwise_from_the_centre() -> None:
    assert _ring_order(2, 2) == [(0, 0), (0, 1), (1, 1), (1, 0)]
    # a 4 x 4 grid: the centre 2 x 2, then the 12 blocks of the outer ring from its top-left corner
    assert _ring_order(4, 4)[:4] == [(1, 1), (1, 2), (2, 2), (2, 1)]
    assert _ring_order(4, 4)[4:8] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert _ring_order(4, 4)[-1] == (1, 0)


@pytest.mark.parametrize(("rows", "cols"), [(2, 2), (3, 3), (2, 7), (8, 12), (12, 8), (5, 16), (16, 16), (32, 9)])
def test_ring_order_places_every_block_once(rows: int, cols: int) -> None:
    assert sorted(_ring_order(rows, cols)) == [(r, c) for r in range(rows) for c in range(cols)]


def test_nest_squares_places_consecutive_chunks_in_ring_order() -> None:
    noise = np.arange(16 * 16 * 2, dtype=np.float32).reshape(16, 16, 2)
    nested = nest_squares(noise)
    chunk = 8 * 8 * 2
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 1), (1, 0)]):
        block = nested[r * 8 : r * 8 + 8, c * 8 : c * 8 + 8]
        np.testing.assert_array_equal(block.ravel(), np.arange(k * chunk, (k + 1) * chunk))


def test_scale_alike_centre_is_the_smaller_image() -> None:
    small = BatchGenerator([5], "scale_alike").randn((1, 4, 64, 64))[0]
    large = BatchGenerator([5], "scale_alike").randn((1, 4, 96, 128))[0]
    np.testing.assert_array_equal(small, large[:, 16:80, 32:96])


def test_scale_alike_draws_torch_noise_in_hwc_order() -> None:
    # a latent under two blocks on a side keeps the plain layout: torch's flat draw read as (H, W, C)
    ours = BatchGenerator([9], "scale_alike").randn((1, 4, 8, 24))[0]
    flat = TorchCompatibleGenerator(9).randn((8 * 24 * 4,))
    np.testing.assert_array_equal(ours, flat.reshape(8, 24, 4).transpose(2, 0, 1))


def test_seed_modes_are_draw_things_modes() -> None:
    assert list(SEED_MODES) == ["legacy", "torch_cpu", "scale_alike", "nvidia_gpu"]
    torch_cpu = BatchGenerator([3], "torch_cpu").randn((1, 4, 8, 8))
    np.testing.assert_array_equal(BatchGenerator([3], "legacy").randn((1, 4, 8, 8)), torch_cpu)
    np.testing.assert_array_equal(BatchGenerator([3]).randn((1, 4, 8, 8)), torch_cpu)
    nvidia = BatchGenerator([3, 4], "nvidia_gpu").randn((2, 4, 8, 8))
    np.testing.assert_array_equal(nvidia[1], CudaCompatibleGenerator(4).randn((4, 8, 8)))
