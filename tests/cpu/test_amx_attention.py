"""The fused AMX attention kernel (amx_attention.c) against float64 attention on the same
bf16-rounded operands.

The kernel's contract: q, k, v and the unnormalised softmax weights rounded to bf16 (nearest
even), products summed in fp32, each row normalised by the sum of its unrounded fp32 weights,
as torch's bf16 attention does. The reference applies exactly that rounding in float64. A weight
within fp32 rounding of a bf16 midpoint may round the other way (the kernel's exp and its sums'
order differ from float64's), so a few outputs differ by a bf16 step: measured mean errors 2e-8
to 2e-7, and 1.8e-6 at dim 512 (fp32 sums of 512 products), maxima up to 5e-4, where plain fp32
attention is 2.4e-4 to 9e-4 away on average. Anything else wrong (a layout, a padded key or dim
counted, the wrong scale) shows up at 1e-2.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_sd.cpu import attention as attention_module
from mlx_sd.cpu import kernels
from mlx_sd.cpu.attention import attention

pytestmark = pytest.mark.skipif(not kernels.amx_ready(), reason="no AMX-BF16 on this processor")


def bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to bf16 (nearest even), as float64."""
    bits = x.astype(np.float32).view(np.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.view(np.float32).astype(np.float64)


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, causal: bool = False) -> np.ndarray:
    """The kernel's rounding in float64, for (..., tokens, dim) operands."""
    s = np.einsum("...qd,...kd->...qk", bf16(q), bf16(k)) * scale
    if causal:
        s = np.where(np.arange(s.shape[-1]) > np.arange(s.shape[-2])[:, None], -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("...qk,...kd->...qd", bf16(p), bf16(v)) / p.sum(-1, keepdims=True)


def assert_close(out: np.ndarray, expected: np.ndarray) -> None:
    error = np.abs(out - expected)
    assert error.mean() < 5e-6 and error.max() < 1e-3, (error.mean(), error.max())


def heads(batch: int, n: int, keys: int, count: int, dim: int, spread: float = 1.0, seed: int = 0):
    """Token-major projections q (batch, n, count * dim), k and v (batch, keys, count * dim)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, t, count * dim), dtype=np.float32) * spread for t in (n, keys, keys)]


def split(x: np.ndarray, count: int) -> np.ndarray:
    b, n, width = x.shape
    return x.reshape(b, n, count, width // count).transpose(0, 2, 1, 3)


@pytest.mark.parametrize(
    ("batch", "n", "keys", "count", "dim"),
    [(2, 200, 300, 8, 40), (2, 100, 77, 8, 80), (1, 64, 64, 1, 512), (2, 5, 7, 3, 8), (1, 33, 50, 2, 24)],
    ids=["self-40", "cross-80", "vae-512", "tiny", "unpadded"],
)
def test_matches_bf16_rounded_float64(batch: int, n: int, keys: int, count: int, dim: int) -> None:
    """Token-major views straight from the projections; dims, keys and queries that are not
    multiples of the tiles (16, 32) are padded inside the kernel and must not count."""
    q, k, v = heads(batch, n, keys, count, dim)
    out = attention(mx.array(q), mx.array(k), mx.array(v), count, dim**-0.5, bf16_products=True)
    assert out.shape == q.shape and out.dtype == mx.float32
    expected = reference(split(q, count), split(k, count), split(v, count), dim**-0.5)
    assert_close(split(np.array(out), count), expected)


def test_is_further_from_fp32_than_from_its_own_rounding() -> None:
    """The test above cannot pass by accident: the kernel does round (fp32 attention is ~100x
    further from it than the bf16 reference)."""
    q, k, v = heads(2, 128, 128, 2, 40, seed=1)
    out = split(np.array(attention(mx.array(q), mx.array(k), mx.array(v), 2, 40**-0.5, bf16_products=True)), 2)
    q, k, v = (split(t, 2) for t in (q, k, v))
    s = np.einsum("...qd,...kd->...qk", q.astype(np.float64), k.astype(np.float64)) * 40**-0.5
    p = np.exp(s - s.max(-1, keepdims=True))
    fp32 = np.einsum("...qk,...kd->...qd", p / p.sum(-1, keepdims=True), v)
    own = np.abs(out - reference(q, k, v, 40**-0.5)).mean()
    assert np.abs(out - fp32).mean() > 100 * own


@pytest.mark.parametrize("queries", [77, 300])
def test_causal_mask_over_runs_of_query_rows(queries: int) -> None:
    """One head and more pool threads than heads: the head is split into runs of query rows,
    each of which must mask the keys from its own first query on."""
    q, k, v = heads(1, queries, queries, 1, 64, spread=2.0, seed=2)
    out = attention(mx.array(q), mx.array(k), mx.array(v), 1, 0.125, bf16_products=True, causal=True)
    assert_close(np.array(out)[0], reference(q[0], k[0], v[0], 0.125, causal=True))


def test_large_logits_stay_finite() -> None:
    q, k, v = heads(1, 64, 64, 2, 16, spread=6.0, seed=4)
    out = split(np.array(attention(mx.array(q), mx.array(k), mx.array(v), 2, 1.0, bf16_products=True)), 2)
    assert np.isfinite(out).all()
    # Logits in the hundreds, where one bf16 step of q or k moves a logit by ~1: compared on the
    # same rounded operands, the kernel still agrees.
    error = np.abs(out - reference(*(split(t, 2) for t in (q, k, v)), 1.0))
    assert error.mean() < 1e-4


@pytest.mark.parametrize("bad", ["keys", "strided", "dtype", "shape", "heads"])
def test_refuses_what_it_cannot_read(bad: str) -> None:
    q, k, v = heads(1, 8, 8, 2, 16)
    out, count = np.zeros_like(q), 2
    if bad == "keys":
        k, v = k[:, :0], v[:, :0]
    elif bad == "strided":
        v = np.concatenate([v, v], axis=2)[:, :, :32]  # rows 64 values apart
    elif bad == "dtype":
        q = q.astype(np.float64)
    elif bad == "shape":
        out = np.zeros((1, 8, 16), np.float32)
    else:
        count = 3  # 32 columns do not split into 3 heads
    with pytest.raises(ValueError):
        kernels.amx_attention(q, k, v, count, 0.25, False, out)


def test_the_models_bf16_attention_uses_it(monkeypatch) -> None:
    """attention() with bf16 products goes to the kernel (not the BLAS form) wherever AMX is."""
    calls = []
    monkeypatch.setattr(attention_module, "_amx_attention", lambda *a: calls.append(a) or mx.zeros((1, 4, 8)))
    q = mx.zeros((1, 4, 8))
    with mx.stream(mx.cpu):
        attention_module.attention(q, q, q, 2, 0.5, bf16_products=True)
    assert len(calls) == 1
