"""The CPU (numpy) SiLU and exact GELU against MLX's own, including the tails."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_sd.models import activations

# Values across the ranges that matter, plus the tails where exp under/overflows.
X = np.concatenate([np.linspace(-12, 12, 20001, dtype=np.float32),
                    np.array([-1e4, -100, -89, -87, 87, 89, 100, 1e4, 0.0, -0.0], dtype=np.float32)])


@pytest.mark.parametrize(("ours", "theirs"), [(activations.silu, nn.silu), (activations.gelu, nn.gelu)],
                         ids=["silu", "gelu"])
def test_cpu_activation_matches_mlx(ours, theirs) -> None:
    x = mx.array(X)
    with mx.stream(mx.cpu):
        got, expected = np.array(ours(x)), np.array(theirs(x))
    assert np.isfinite(got).all()
    # erf's approximation error is <= 1.5e-7 absolute; |x| scales it, and fp32 rounding adds 1 ulp.
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-6)


def test_quick_gelu_matches_float64() -> None:
    with mx.stream(mx.cpu):
        got = np.array(activations.quick_gelu(mx.array(X)))
    x = X.astype(np.float64)
    with np.errstate(over="ignore"):
        expected = x / (1 + np.exp(-1.702 * x))
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("fn", [activations.silu, activations.gelu, activations.quick_gelu],
                         ids=["silu", "gelu", "quick_gelu"])
def test_dtype_and_shape_are_kept(fn) -> None:
    x = mx.random.normal((2, 3, 4, 5)).astype(mx.bfloat16)
    out = fn(x)
    assert out.dtype == mx.bfloat16 and out.shape == x.shape


def test_geglu_gates_the_first_half_with_the_gelu_of_the_second() -> None:
    x = mx.array(np.random.default_rng(0).standard_normal((2, 300, 2 * 48), dtype=np.float32) * 3)
    hidden, gate = mx.split(x, 2, axis=-1)
    with mx.stream(mx.cpu):
        got = activations.geglu(x)
    assert got.shape == (2, 300, 48) and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), np.array(hidden * nn.gelu(gate)), rtol=2e-6, atol=5e-6)
