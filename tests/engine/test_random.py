"""TorchCompatibleGenerator against torch 2.13's CPU generator (fixtures/samplers/rng.npz, made by
fixtures/make_sampler_fixtures.py).

Tolerances: the scalar path (fewer than 16 values) must match bit for bit. The vectorised path's
float32 log/sin/cos come from SLEEF in torch and are correctly rounded here, so values may differ by
1-2 ulp: at most 1e-6 absolute (measured: 4.8e-7)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlx_sd.engine.random import BatchGenerator, TorchCompatibleGenerator

FIXTURES = np.load(Path(__file__).parents[1] / "fixtures" / "samplers" / "rng.npz")
FILL_ATOL = 1e-6


def keys(prefix: str) -> list[str]:
    return [k for k in FIXTURES.files if k.startswith(prefix)]


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split("x"))


def assert_matches_torch(ours: np.ndarray, expected: np.ndarray) -> None:
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    if ours.size < 16:
        np.testing.assert_array_equal(ours, expected)
    else:
        np.testing.assert_allclose(ours, expected, rtol=0, atol=FILL_ATOL)


@pytest.mark.parametrize("key", keys("single/"))
def test_fresh_generator_matches_torch(key: str) -> None:
    _, seed, shape = key.split("/")
    assert_matches_torch(TorchCompatibleGenerator(int(seed)).randn(parse_shape(shape)), FIXTURES[key])


@pytest.mark.parametrize("key", keys("large/"))
def test_latent_sized_draws_match_torch(key: str) -> None:
    _, seed, shape = key.split("/")
    ours = TorchCompatibleGenerator(int(seed)).randn(parse_shape(shape)).ravel()
    expected = FIXTURES[key]
    np.testing.assert_allclose(ours[:16], expected[:16], rtol=0, atol=FILL_ATOL)
    np.testing.assert_allclose(ours[-16:], expected[16:32], rtol=0, atol=FILL_ATOL)
    assert ours.astype(np.float64).sum() == pytest.approx(expected[32], abs=1e-3)


def test_successive_draws_continue_the_stream_like_torch() -> None:
    generator = TorchCompatibleGenerator(2024)
    for key in sorted(keys("sequence/"), key=lambda k: int(k.split("/")[1])):
        assert_matches_torch(generator.randn(parse_shape(key.split("/")[2])), FIXTURES[key])


def test_batch_generator_gives_each_item_its_own_seed() -> None:
    generator = BatchGenerator.consecutive(77, 3)
    for draw in range(2):
        expected = FIXTURES[f"batch/77/{draw}"]
        np.testing.assert_allclose(generator.randn((3, 4, 4, 4)), expected, rtol=0, atol=FILL_ATOL)
    # an item is reproducible alone from its seed
    alone = BatchGenerator([78]).randn((1, 4, 4, 4))[0]
    np.testing.assert_array_equal(alone, BatchGenerator.consecutive(77, 3).randn((3, 4, 4, 4))[1])


def test_batch_dimension_must_match_the_seeds() -> None:
    with pytest.raises(ValueError, match="batch dimension"):
        BatchGenerator([1, 2]).randn((3, 4))


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_seed_outside_torch_range_is_rejected(seed: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        TorchCompatibleGenerator(seed)
