"""The fused-kernel rule on a table of head sizes, and head padding's exactness."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_sd.models import fused_attention as fa
from mlx_sd.models.layers import Attention, attention, pad_attention_heads
from mlx_sd.models.unet import UNet2DConditionModel, UNetConfig


@pytest.mark.parametrize(("version", "queries", "head_dim", "fused", "padded"), [
    # SD 1.x at 512²: the UNet's levels (4096, 1024, 256 and 64 queries) and the VAE's one head.
    ("0.32.4", 4096, 40, False, 64),
    ("0.32.4", 1024, 80, True, 80),
    ("0.32.4", 256, 160, False, 160),  # no full-kernel size above 128
    ("0.32.4", 4096, 512, False, 512),
    ("0.32.4", 4096, 64, True, 64),  # SD 2.x, SDXL
    ("0.32.4", 77, 72, True, 72),
    ("0.32.4", 77, 90, False, 96),
    ("0.32.4", 77, 100, False, 128),
    ("0.33.0.dev20260901", 4096, 96, True, 96),
    # Before 0.32.1 the full kernel had 64, 80 and 128 only.
    ("0.31.2", 4096, 72, False, 80),
    ("0.31.2", 4096, 96, False, 128),
    ("0.32.0", 4096, 40, False, 64),
    # At most 8 queries: the vector kernel, which has 256 and lacks 80.
    ("0.32.4", 8, 200, False, 256),
    ("0.32.4", 8, 256, True, 256),
    ("0.32.4", 4, 80, False, 96),
])
def test_the_rule_on_a_table_of_head_sizes(version: str, queries: int, head_dim: int, fused: bool,
                                           padded: int) -> None:
    call = fa.AttentionCall(batch=2, heads=8, queries=queries, keys=queries, head_dim=head_dim)
    reason = fa.fallback_reason(call, version)
    assert (reason is None) is fused, reason
    assert fa.padded_head_dim(call, version) == padded
    if padded != head_dim:  # the padded shape is one the kernel runs
        assert fa.fallback_reason(fa.AttentionCall(2, 8, queries, queries, padded), version) is None


def test_masks_and_key_counts() -> None:
    # CLIP's causal self-attention runs fused; a causal mask with more queries than keys does not.
    assert fa.fallback_reason(fa.AttentionCall(1, 12, 77, 77, 64, causal=True)) is None
    assert "causal" in fa.fallback_reason(fa.AttentionCall(1, 12, 77, 10, 64, causal=True))
    assert "more queries than keys" in fa.fallback_reason(fa.AttentionCall(1, 1, 8, 4, 64))
    # Padding is left out where it would not make the call fused.
    assert fa.padded_head_dim(fa.AttentionCall(1, 12, 77, 10, 40, causal=True)) == 40
    assert fa.padded_head_dim(fa.AttentionCall(1, 1, 8, 4, 40)) == 40
    assert fa.padded_head_dim(fa.AttentionCall(1, 12, 77, 77, 40, causal=True)) == 64


def test_version_numbers() -> None:
    assert fa.version_tuple("0.32.4") == (0, 32, 4)
    assert fa.version_tuple("0.33.0.dev20260901") == (0, 33, 0)
    assert fa.version_tuple("1.0") == (1, 0, 0)


def _projections(heads: int, head_dim: int, queries: int, keys: int) -> tuple[mx.array, mx.array, mx.array]:
    rng = np.random.default_rng(head_dim)
    q = rng.standard_normal((2, queries, heads * head_dim), dtype=np.float32)
    k, v = (rng.standard_normal((2, keys, heads * head_dim), dtype=np.float32) for _ in range(2))
    return mx.array(q), mx.array(k), mx.array(v)


# Each size padding reaches with the installed MLX, with the head sizes padded to it (40: SD 1.x).
PADDED = sorted({(fa.padded_head_dim(fa.AttentionCall(2, 3, 64, 64, d)), d) for d in (8, 40, 70, 76, 90, 100)})


@pytest.mark.parametrize(("target", "head_dim"), PADDED)
@pytest.mark.parametrize("causal", [False, True])
def test_padding_is_exact(target: int, head_dim: int, causal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = _projections(heads=3, head_dim=head_dim, queries=64, keys=64 if causal else 77)
    kernel, sizes = mx.fast.scaled_dot_product_attention, []

    def seen(q: mx.array, k: mx.array, v: mx.array, **kwargs: object) -> mx.array:
        sizes.append((q.shape[-1], k.shape[-1], v.shape[-1], kwargs["scale"]))
        return kernel(q, k, v, **kwargs)

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", seen)
    with fa.recording() as calls:
        plain = attention(q, k, v, heads=3, causal=causal)
        padded = attention(q, k, v, heads=3, causal=causal, pad_heads=True)
    assert sizes == [(head_dim,) * 3 + (head_dim**-0.5,), (target,) * 3 + (head_dim**-0.5,)]
    assert {call.head_dim for call in calls} == {head_dim}  # calls are recorded with their real size
    assert plain.shape == padded.shape == q.shape
    np.testing.assert_allclose(np.array(padded), np.array(plain), rtol=1e-5, atol=1e-6)


def test_the_sizes_padding_reaches_are_tested() -> None:
    assert all(target > head_dim for target, head_dim in PADDED)
    assert {target for target, _ in PADDED} == set(fa.full_head_dims())


def test_padding_is_exact_through_a_unet_and_switches_per_module() -> None:
    config = UNetConfig(block_out_channels=(80, 160), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
                        cross_attention_dim=32, norm_num_groups=16, layers_per_block=1)
    unet = UNet2DConditionModel(config)  # heads of 40 at its first level, as SD 1.x's
    x = mx.random.normal((2, 8, 8, 4), key=mx.random.key(1))
    context = mx.random.normal((2, 7, 32), key=mx.random.key(2))
    t = mx.array([500.0, 500.0])
    plain = unet(x, t, context)
    pad_attention_heads(unet, True)
    assert all(m.pad_heads for m in unet.modules() if isinstance(m, Attention))
    padded = unet(x, t, context)
    np.testing.assert_allclose(np.array(padded), np.array(plain), rtol=1e-4, atol=1e-5)
    pad_attention_heads(unet, False)
    assert not any(m.pad_heads for m in unet.modules() if isinstance(m, Attention))


@pytest.mark.parametrize("version", ["0.31.2", "0.32.4"])
@pytest.mark.parametrize("side", [512, 768])
def test_every_sd2_attention_call_is_fused_so_fp16_scores_need_no_upcast(version: str, side: int) -> None:
    # diffusers upcasts SD 2.1's attention scores to fp32 (`upcast_attention`); the fused kernel computes
    # them and their softmax in fp32 anyway (docs/models.md). SD 2.x: 64-wide heads at three UNet
    # levels and the mid block, self- and cross-attention (77 keys), and OpenCLIP-H's causal self-attention.
    latent = side // 8
    calls = [fa.AttentionCall(batch=2, heads=heads, queries=(latent >> level) ** 2, keys=keys, head_dim=64)
             for level, heads in ((0, 5), (1, 10), (2, 20), (3, 20))
             for keys in ((latent >> level) ** 2, 77)]
    calls.append(fa.AttentionCall(batch=2, heads=16, queries=77, keys=77, head_dim=64, causal=True))
    assert [fa.fallback_reason(call, version) for call in calls] == [None] * len(calls)
