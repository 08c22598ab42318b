"""The CPU GroupNorm against a float64 reference of torch's GroupNorm and against `nn.GroupNorm`.

Tolerance: fp32 over these sizes agrees with float64 to ~1e-6; 1e-5 (atol and rtol) leaves room
for summation order and still catches a wrong grouping or formula, which shows up at 1e-1.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_sd.cpu.activations import silu
from mlx_sd.cpu.norms import GroupNorm, group_moments

TOL = 1e-5


def reference(x: np.ndarray, groups: int, eps: float, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """torch.nn.GroupNorm on channels-last input: groups are runs of consecutive channels."""
    b, c = x.shape[0], x.shape[-1]
    g = x.astype(np.float64).reshape(b, -1, groups, c // groups)
    g = (g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(g.var(axis=(1, 3), keepdims=True) + eps)
    return g.reshape(x.shape) * weight.astype(np.float64) + bias.astype(np.float64)


def modules(groups: int, channels: int, eps: float = 1e-6, seed: int = 0) -> tuple[GroupNorm, nn.GroupNorm]:
    rng = np.random.default_rng(seed)
    new = GroupNorm(groups, channels, eps=eps, pytorch_compatible=True)
    new.update({"weight": mx.array(rng.standard_normal(channels, dtype=np.float32)),
                "bias": mx.array(rng.standard_normal(channels, dtype=np.float32))})
    old = nn.GroupNorm(groups, channels, eps=eps, pytorch_compatible=True)
    old.update(new.parameters())
    return new, old


def normal(shape: tuple[int, ...], mean: float = 0.0, std: float = 1.0, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * std + mean).astype(np.float32)


@pytest.mark.parametrize(
    ("shape", "groups"),
    [
        # From 32Ki values on, the kernels spread the rows over the pool (an image in pieces, if
        # there are more threads than images); below, on the calling thread.
        ((1, 16, 16, 128), 32),  # the VAE's layout, scaled down
        ((2, 8, 8, 320), 32),  # the UNet's, batch 2 for CFG
        ((2, 4, 4, 1280), 32),
        ((1, 37, 41, 128), 32),  # an odd row count: pieces of unequal length
        ((3, 37, 41, 64), 32),  # more images than two threads
        ((2, 50, 64), 8),  # (B, N, C)
        ((3, 64), 4),  # (B, C): statistics over the group's channels only
    ],
)
def test_matches_float64_reference_and_nn_group_norm(shape: tuple[int, ...], groups: int) -> None:
    new, old = modules(groups, shape[-1])
    x = normal(shape, mean=0.5, std=2.0)
    out = new(mx.array(x))
    assert out.shape == shape and out.dtype == mx.float32
    expected = reference(x, groups, new.eps, np.array(new.weight), np.array(new.bias))
    np.testing.assert_allclose(np.array(out), expected, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(np.array(out), np.array(old(mx.array(x))), rtol=TOL, atol=TOL)


def test_large_mean_small_std_does_not_cancel() -> None:
    # E[x²] - E[x]² in fp32 would lose all digits here (1e4 against a variance of 1e-4).
    x = normal((2, 24, 24, 64), mean=100.0, std=0.01)
    mean, var = group_moments(x.reshape(2, -1, 64), 8)
    g = x.astype(np.float64).reshape(2, -1, 8, 8)
    np.testing.assert_allclose(mean, g.mean(axis=(1, 3)), rtol=1e-7)
    np.testing.assert_allclose(var, g.var(axis=(1, 3)), rtol=TOL)

    new, _ = modules(8, 64)
    out = np.array(new(mx.array(x)))
    expected = reference(x, 8, new.eps, np.array(new.weight), np.array(new.bias))
    # Output is limited by fp32 itself: x * (weight / std) is ~1e4 * |weight|, rounded to its
    # ulp, before the shift brings it back to ~1 (nn.GroupNorm is off by ~3e-2 here).
    bound = 2 * np.finfo(np.float32).eps * 100.0 / 0.01 * np.abs(np.array(new.weight)).max()
    assert np.abs(out - expected).max() < bound


def test_eps_is_added_to_the_variance() -> None:
    x = normal((1, 8, 8, 32), std=0.1)
    new, _ = modules(4, 32, eps=0.5)
    expected = reference(x, 4, 0.5, np.array(new.weight), np.array(new.bias))
    np.testing.assert_allclose(np.array(new(mx.array(x))), expected, rtol=TOL, atol=TOL)
    # A constant group has zero variance: the output is the bias, finite.
    constant = np.full((1, 4, 4, 32), 3.0, np.float32)
    np.testing.assert_allclose(np.array(new(mx.array(constant))), np.broadcast_to(np.array(new.bias), constant.shape),
                               atol=1e-6)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_weights_give_float32_output_like_nn_group_norm(dtype: mx.Dtype) -> None:
    new, old = modules(8, 64)
    for module in (new, old):
        module.update({k: v.astype(dtype) for k, v in new.parameters().items()})
    x = mx.array(normal((2, 8, 8, 64)))
    out, expected = new(x), old(x)
    assert out.dtype == expected.dtype == mx.float32
    np.testing.assert_allclose(np.array(out), np.array(expected), rtol=TOL, atol=TOL)


def test_without_affine() -> None:
    new = GroupNorm(4, 32, affine=False, pytorch_compatible=True)
    x = normal((2, 6, 6, 32))
    expected = reference(x, 4, new.eps, np.ones(32), np.zeros(32))
    np.testing.assert_allclose(np.array(new(mx.array(x))), expected, rtol=TOL, atol=TOL)


def test_strided_input() -> None:
    new, _ = modules(8, 64)
    x = normal((2, 10, 12, 64))
    view = mx.array(x.transpose(0, 2, 1, 3).copy()).transpose(0, 2, 1, 3)  # H and W swapped back: not contiguous
    expected = reference(x, 8, new.eps, np.array(new.weight), np.array(new.bias))
    np.testing.assert_allclose(np.array(new(view)), expected, rtol=TOL, atol=TOL)


def test_other_inputs_fall_back_to_nn_group_norm() -> None:
    new, old = modules(8, 64)
    x = mx.array(normal((2, 8, 8, 64))).astype(mx.float16)
    assert mx.array_equal(new(x), old(x)) and new(x).dtype == old(x).dtype
    new.pytorch_compatible = old.pytorch_compatible = False
    x = mx.array(normal((2, 8, 8, 64)))
    assert mx.array_equal(new(x), old(x))


@pytest.mark.parametrize("shape", [(1, 37, 41, 128), (2, 8, 8, 320)])
def test_with_silu_fuses_the_activation(shape: tuple[int, ...]) -> None:
    new, _ = modules(32, shape[-1])
    x = normal(shape, mean=0.5, std=2.0)
    normed = reference(x, 32, new.eps, np.array(new.weight), np.array(new.bias))
    expected = normed / (1 + np.exp(-normed))
    np.testing.assert_allclose(np.array(new.with_silu(mx.array(x))), expected, rtol=TOL, atol=TOL)
    half = mx.array(x).astype(mx.float16)  # the fallback path
    assert mx.array_equal(new.with_silu(half), silu(new(half)))


def test_with_silu_rounds_to_bf16_for_a_convolution_that_reads_bf16() -> None:
    new, _ = modules(32, 128)
    x = mx.array(normal((1, 37, 41, 128), mean=0.5, std=2.0))
    rounded = new.with_silu(x, bf16=True)
    assert rounded.dtype == mx.bfloat16
    assert mx.array_equal(rounded, new.with_silu(x).astype(mx.bfloat16))
