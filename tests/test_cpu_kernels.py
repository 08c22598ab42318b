"""The fused C kernels (mlx_sd/models/cpu_kernels.c) against float64 numpy, and their guards."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from mlx_sd.models import cpu_kernels

pytestmark = pytest.mark.skipif(sys.platform != "linux" and cpu_kernels.kernels() is None,
                                reason="the kernels were not built here (no C compiler)")


def test_the_kernels_are_built_on_linux() -> None:
    # The install compiles them; on Linux a missing library means the build silently failed.
    assert cpu_kernels.kernels() is not None


def test_exp_is_accurate_over_the_whole_range() -> None:
    # A row whose max is 0 gives exp(x) itself; below -87 the input is clamped (e^-87 ~ 1.6e-38).
    x = np.concatenate([[0.0], np.linspace(-87, 0, 200001)]).astype(np.float32)[None].copy()
    expected = np.exp(x.astype(np.float64))
    sums = cpu_kernels.softmax_numerators(x)
    np.testing.assert_allclose(x, expected, rtol=3e-7, atol=0)
    np.testing.assert_allclose(sums, expected.sum(), rtol=1e-6)


def test_softmax_numerators_match_float64() -> None:
    rng = np.random.default_rng(0)
    scores = (rng.standard_normal((37, 4099)) * 8).astype(np.float32)
    scores[3, 5] = 1e4  # one dominant score: the rest of its row underflows to ~0
    scores[4] = -1e4  # a constant row: all ones
    # The subtraction is float32's, as in the kernel; its rounding is not the kernel's error.
    expected = np.exp((scores - scores.max(axis=1, keepdims=True)).astype(np.float64))
    sums = cpu_kernels.softmax_numerators(scores)
    np.testing.assert_allclose(scores, expected, rtol=3e-7, atol=1e-37)
    np.testing.assert_allclose(sums, expected.sum(axis=1), rtol=2e-6)
    assert sums[3] == 1 and sums[4] == 4099


@pytest.mark.parametrize("silu", [False, True])
def test_scale_shift_matches_float64(silu: bool) -> None:
    rng = np.random.default_rng(1)
    x, scale, offset = (rng.standard_normal(shape, dtype=np.float32) * 4 for shape in ((50, 96), (96,), (96,)))
    out = np.empty_like(x)
    cpu_kernels.scale_shift(x, scale, offset, silu, out)
    y = x.astype(np.float64) * scale + offset
    expected = y / (1 + np.exp(-y)) if silu else y
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.float64), np.zeros((8, 16), np.float32)[:, ::2]],
                         ids=["float64", "strided"])
def test_raw_pointer_inputs_must_be_contiguous_float32(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="C-contiguous float32"):
        cpu_kernels.sigmoid_gate(bad, 1.0, np.empty((8, 8), np.float32))


def test_shape_mismatches_are_refused() -> None:
    with pytest.raises(ValueError, match="GEGLU"):
        cpu_kernels.geglu(np.zeros((4, 10), np.float32), np.empty((4, 6), np.float32))
    with pytest.raises(ValueError, match="shape mismatch"):
        cpu_kernels.scale_shift(np.zeros((4, 8), np.float32), np.zeros(8, np.float32), np.zeros(7, np.float32),
                                False, np.empty((4, 8), np.float32))


def test_channel_moments_accumulate_float64_sums_of_deviations() -> None:
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((600, 40)) * 3 + 50).astype(np.float32)  # several runs of 256 rows
    shift = x[::60].mean(axis=0)
    sums, squares = np.full(40, 1.0), np.full(40, 2.0)  # added to, not overwritten
    cpu_kernels.channel_moments(x, shift, sums, squares)
    d = x.astype(np.float64) - shift
    np.testing.assert_allclose(sums - 1.0, d.sum(axis=0), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(squares - 2.0, (d * d).sum(axis=0), rtol=1e-5)


def test_layer_norm_matches_float64() -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((70, 320)) * 5 + 3).astype(np.float32)
    weight, bias = (rng.standard_normal(320, dtype=np.float32) for _ in range(2))
    out = np.empty_like(x)
    cpu_kernels.layer_norm(x, weight, bias, 1e-5, out)
    xd = x.astype(np.float64)
    expected = (xd - xd.mean(1, keepdims=True)) / np.sqrt(xd.var(1, keepdims=True) + 1e-5) * weight + bias
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
