"""The CPU attention (one (batch, head) slice at a time, in place in the token-major
projections, normalised after the value product) against float64 softmax attention and MLX's
fused kernel.

Tolerance: fp32 attention over <= 1024 keys agrees with float64 to ~1e-6 relative; 1e-5
(atol and rtol) leaves room for summation order and still catches any formula error, which
shows up at 1e-2 or more.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_sd.cpu import kernels
from mlx_sd.cpu.attention import attention
from mlx_sd.models import layers

TOL = 1e-5


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k.astype(np.float64)) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), v.astype(np.float64))


def inputs(shape_q: tuple[int, ...], kv_tokens: int, spread: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    b, h, _, d = shape_q
    shapes = (shape_q, (b, h, kv_tokens, d), (b, h, kv_tokens, d))
    return [rng.standard_normal(s, dtype=np.float32) * spread for s in shapes]


def tokens(x: np.ndarray) -> mx.array:
    """(batch, heads, tokens, dim) as the models' token-major projections (batch, tokens, heads * dim)."""
    b, h, n, d = x.shape
    return mx.array(x.transpose(0, 2, 1, 3).reshape(b, n, h * d))


def per_head(out: mx.array, heads: int) -> np.ndarray:
    b, n, width = out.shape
    return np.array(out.astype(mx.float32)).reshape(b, n, heads, width // heads).transpose(0, 2, 1, 3)


def run(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, **options) -> np.ndarray:
    return per_head(attention(tokens(q), tokens(k), tokens(v), q.shape[1], scale, **options), q.shape[1])


@pytest.mark.parametrize(
    ("shape_q", "kv_tokens"),
    [((2, 8, 256, 40), 256), ((2, 8, 256, 40), 77), ((1, 1, 1024, 64), 1024), ((2, 3, 5, 8), 7)],
    ids=["self", "cross", "vae-like", "odd"],
)
def test_cpu_attention_matches_float64_softmax(shape_q: tuple[int, ...], kv_tokens: int) -> None:
    q, k, v = inputs(shape_q, kv_tokens, spread=1.0)
    scale = shape_q[-1] ** -0.5
    out = attention(tokens(q), tokens(k), tokens(v), shape_q[1], scale)
    b, h, n, d = shape_q
    assert out.shape == (b, n, h * d) and out.dtype == mx.float32
    np.testing.assert_allclose(per_head(out, h), reference(q, k, v, scale), rtol=TOL, atol=TOL)


def test_blocks_of_query_rows_give_the_same_result() -> None:
    q, k, v = inputs((1, 2, 100, 8), 30, spread=1.0)
    whole = run(q, k, v, 0.3)
    blocked = run(q, k, v, 0.3, rows=7)  # the last block is short
    np.testing.assert_allclose(blocked, whole, rtol=1e-6, atol=1e-7)


def test_large_logits_do_not_overflow() -> None:
    # Logits in the hundreds: exp without the max subtraction would overflow to inf.
    q, k, v = inputs((1, 2, 64, 16), 64, spread=6.0)
    out = run(q, k, v, 1.0)
    assert np.isfinite(out).all()
    # fp32 logits of ~300 are themselves rounded by ~2e-5, which exp turns into ~1e-4 in the
    # weights: a property of fp32 inputs (MLX's fused kernel differs as much), not of the formula.
    np.testing.assert_allclose(out, reference(q, k, v, 1.0), rtol=1e-3, atol=1e-3)


def test_cpu_attention_matches_mlx_fused_kernel() -> None:
    q, k, v = inputs((2, 4, 128, 40), 128, spread=1.0, seed=1)
    fused = mx.fast.scaled_dot_product_attention(*(mx.array(t) for t in (q, k, v)), scale=40**-0.5)
    np.testing.assert_allclose(run(q, k, v, 40**-0.5), np.array(fused), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_inputs_keep_their_dtype(dtype: mx.Dtype) -> None:
    q, k, v = (tokens(a).astype(dtype) for a in inputs((1, 2, 32, 16), 32, spread=1.0))
    out = attention(q, k, v, 2, 0.25)
    assert out.dtype == dtype
    full = [per_head(t, 2) for t in (q, k, v)]
    np.testing.assert_allclose(per_head(out, 2), reference(*full, 0.25), atol=2e-2)


def bf16_rounded(x: np.ndarray) -> np.ndarray:
    """x rounded to bf16 (nearest even), as float64."""
    bits = x.astype(np.float32).view(np.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.view(np.float32).astype(np.float64)


@pytest.mark.usefixtures("each_bf16_gemm")
def test_bf16_attention_rounds_q_k_weights_and_values_only(monkeypatch) -> None:
    """Exactly the rounding the bf16 path without AMX promises, the AMX form's
    (test_amx_attention.py): q and k to bf16 for the scores, the unnormalised softmax weights and
    v to bf16 for the value product, sums in fp32, normalised by the sum of the unrounded weights."""
    monkeypatch.setattr(kernels, "amx_ready", lambda: False)
    q, k, v = inputs((2, 3, 200, 40), 300, spread=1.0, seed=3)
    out = run(q, k, v, 40**-0.5, bf16_products=True)
    s = np.einsum("bhqd,bhkd->bhqk", bf16_rounded(q), bf16_rounded(k)) * 40**-0.5
    p = np.exp(s - s.max(-1, keepdims=True))
    expected = np.einsum("bhqk,bhkd->bhqd", bf16_rounded(p), bf16_rounded(v)) / p.sum(-1, keepdims=True)
    error, off_fp32 = np.abs(out - expected), np.abs(out - reference(q, k, v, 40**-0.5))
    # A weight within fp32 rounding of a bf16 midpoint may round the other way (the scores'
    # summation order differs), so a few outputs differ by a bf16 step: measured mean 2.5e-7,
    # max 1.7e-4; the fp32 result is ~700x further off on average (mean 1.7e-4, max 1.2e-3).
    assert error.mean() < 2e-6 and error.max() < 5e-4
    assert off_fp32.mean() > 50 * error.mean()


def test_both_forms_take_and_give_the_token_major_layout() -> None:
    q, k, v = (tokens(a) for a in inputs((2, 4, 24, 8), 10, spread=1.0, seed=4))
    with mx.stream(mx.cpu):
        ours = attention(q, k, v, 4, 8**-0.5)
        theirs = layers.attention(q, k, v, 4)  # the networks' own: MLX's fused op
    assert ours.shape == theirs.shape == q.shape
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=TOL, atol=TOL)


def causal_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k.astype(np.float64)) * scale
    s[..., np.triu_indices(s.shape[-1], 1)[0], np.triu_indices(s.shape[-1], 1)[1]] = -np.inf
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), v.astype(np.float64))


def test_causal_attention_sees_only_earlier_keys() -> None:
    q, k, v = inputs((2, 3, 77, 16), 77, spread=2.0, seed=5)
    expected = causal_reference(q, k, v, 0.25)
    np.testing.assert_allclose(run(q, k, v, 0.25, causal=True), expected, rtol=TOL, atol=TOL)
    # In blocks: each block's rows are queries first_query + r, not r.
    np.testing.assert_allclose(run(q, k, v, 0.25, causal=True, rows=10), expected, rtol=TOL, atol=TOL)
    with mx.stream(mx.cpu):
        fused = mx.fast.scaled_dot_product_attention(*(mx.array(t) for t in (q, k, v)), scale=0.25, mask="causal")
    np.testing.assert_allclose(np.array(fused), expected, rtol=TOL, atol=TOL)


def test_both_forms_agree_on_the_causal_mask() -> None:
    q, k, v = (tokens(a) for a in inputs((1, 4, 30, 8), 30, spread=1.0, seed=6))
    with mx.stream(mx.cpu):
        ours = attention(q, k, v, 4, 8**-0.5, causal=True)
        theirs = layers.attention(q, k, v, 4, causal=True)
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=TOL, atol=TOL)
