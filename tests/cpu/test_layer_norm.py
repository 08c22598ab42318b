"""The CPU LayerNorm against float64 and against `nn.LayerNorm`, and its fallbacks."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_sd.cpu.norms import LayerNorm


@pytest.mark.parametrize("weights", [mx.float32, mx.bfloat16])
def test_matches_float64_and_nn_layer_norm(weights: mx.Dtype) -> None:
    rng = np.random.default_rng(0)
    norm = LayerNorm(320, eps=1e-5)
    norm.update({"weight": mx.array(rng.standard_normal(320, dtype=np.float32)).astype(weights),
                 "bias": mx.array(rng.standard_normal(320, dtype=np.float32)).astype(weights)})
    x = (rng.standard_normal((2, 333, 320)) * 4 + 1).astype(np.float32)  # several blocks of rows
    out = norm(mx.array(x))
    assert out.shape == x.shape and out.dtype == mx.float32
    weight, bias = (np.array(norm[n].astype(mx.float32), np.float64) for n in ("weight", "bias"))
    xd = x.astype(np.float64)
    expected = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + 1e-5) * weight + bias
    np.testing.assert_allclose(np.array(out), expected, rtol=1e-5, atol=1e-5)
    plain = nn.LayerNorm(320, eps=1e-5)
    plain.update(norm.parameters())
    np.testing.assert_allclose(np.array(out), np.array(plain(mx.array(x))), rtol=1e-4, atol=1e-4)


def test_without_affine_parameters_it_is_nn_layer_norm() -> None:
    x = mx.random.normal((3, 64))
    assert mx.allclose(LayerNorm(64, affine=False)(x), nn.LayerNorm(64, affine=False)(x))
