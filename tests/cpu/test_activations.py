"""SiLU, CLIP's quick GELU and GEGLU on the CPU kernels against float64 references, including the
tails where exp under/overflows; and the networks' own quick GELU on MLX ops."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_sd.cpu import activations
from mlx_sd.models.clip import QuickGELU

X = np.concatenate([np.linspace(-12, 12, 20002, dtype=np.float32),
                    np.array([-1e4, -100, -89, -87, 87, 89, 100, 1e4, 0.0, -0.0], dtype=np.float32)])
# erf's approximation error is <= 1.5e-7 absolute; |x| scales it, and fp32 rounding adds 1 ulp.
RTOL, ATOL = 2e-6, 1e-6


def sigmoid_gate(x: np.ndarray, slope: float) -> np.ndarray:
    x = x.astype(np.float64)
    with np.errstate(over="ignore"):
        return x / (1 + np.exp(-slope * x))


def gelu(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x * 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


# (The gates' 20k values run on the calling thread, GEGLU's on the kernels' pool.)
@pytest.mark.parametrize(("fn", "slope"), [(activations.silu, 1.0), (activations.quick_gelu, 1.702),
                                           (QuickGELU(), 1.702)],
                         ids=["silu", "quick_gelu", "quick_gelu on MLX ops"])
def test_sigmoid_gates_match_float64(fn, slope: float) -> None:
    got = np.array(fn(mx.array(X.reshape(-1, 1))))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got.reshape(-1), sigmoid_gate(X, slope), rtol=RTOL, atol=ATOL)


def test_geglu_gates_the_first_half_with_the_exact_gelu_of_the_second() -> None:
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 300, 48), dtype=np.float32) * 3
    gate = np.concatenate([X, rng.standard_normal(2 * 300 * 48 - X.size, dtype=np.float32) * 3])
    gate = gate.reshape(hidden.shape)
    got = activations.geglu(mx.array(np.concatenate([hidden, gate], axis=-1)))
    assert got.shape == (2, 300, 48) and got.dtype == mx.float32
    expected = hidden * gelu(gate)
    np.testing.assert_allclose(np.array(got), expected, rtol=RTOL, atol=ATOL * np.abs(hidden).max())


@pytest.mark.parametrize("fn", [activations.silu, activations.quick_gelu, activations.geglu],
                         ids=["silu", "quick_gelu", "geglu"])
def test_dtype_is_kept(fn) -> None:
    x = mx.random.normal((2, 3, 4, 6)).astype(mx.bfloat16)
    out = fn(x)
    assert out.dtype == mx.bfloat16 and out.shape[:-1] == x.shape[:-1]
