"""Building blocks shared by the UNet and the VAE (NHWC; parameter names follow diffusers)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlx_sd.models.fused_attention import AttentionCall, padded_head_dim, record


def attention(q: mx.array, k: mx.array, v: mx.array, heads: int, causal: bool = False,
              pad_heads: bool = False) -> mx.array:
    """Multi-head softmax(q kᵀ / √head_dim) v for token-major projections (batch, tokens, heads *
    head_dim), returned in the same layout; `causal` lets query i see keys 0..i only.

    `pad_heads` zero-pads each head of q, k and v to the next size with which MLX's fused Metal
    kernel runs the call (fused_attention.py), e.g. 40 -> 64: the zeros add nothing to q·k, the
    extra output columns (zero) are dropped, and the scale stays that of the real size, so the
    result is unchanged."""
    batch, n, width = q.shape
    head_dim = width // heads
    call = AttentionCall(batch, heads, n, k.shape[1], head_dim, causal)
    record(call)
    padded = padded_head_dim(call) if pad_heads else head_dim

    def split(t: mx.array) -> mx.array:
        t = t.reshape(batch, t.shape[1], heads, head_dim).transpose(0, 2, 1, 3)
        return mx.pad(t, [(0, 0), (0, 0), (0, 0), (0, padded - head_dim)]) if padded > head_dim else t

    out = mx.fast.scaled_dot_product_attention(split(q), split(k), split(v), scale=head_dim**-0.5,
                                               mask="causal" if causal else None)
    if padded > head_dim:
        out = out[..., :head_dim]
    return out.transpose(0, 2, 1, 3).reshape(batch, n, width)


def pad_attention_heads(model: nn.Module, enabled: bool) -> None:
    """Turns head padding (see `attention`) on or off for each of `model`'s attention modules: those
    with a `pad_heads` switch (`Attention` and CLIP's)."""
    for module in model.modules():
        if isinstance(getattr(module, "pad_heads", None), bool):
            module.pad_heads = enabled


def upsample_nearest(x: mx.array, size: tuple[int, int]) -> mx.array:
    """Nearest-neighbour resize of an NHWC tensor to `size` (torch's `mode="nearest"` indexing)."""
    _, height, width, _ = x.shape
    if size == (2 * height, 2 * width):
        # The common exact 2x case as a broadcast, which avoids two gathers.
        b, _, _, c = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, height, 2, width, 2, c))
        return x.reshape(b, 2 * height, 2 * width, c)
    rows = (mx.arange(size[0]) * height) // size[0]
    cols = (mx.arange(size[1]) * width) // size[1]
    return x[:, rows][:, :, cols]


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual; `temb_channels=None` is the VAE's variant."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        groups: int,
        eps: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, pytorch_compatible=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, pytorch_compatible=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nonlinearity = nn.SiLU()
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array, temb: mx.array | None = None) -> mx.array:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(self.nonlinearity(temb))[:, None, None, :]
        h = self.conv2(self.nonlinearity(self.norm2(h)))
        shortcut = self.conv_shortcut(x) if "conv_shortcut" in self else x
        return shortcut + h


class Attention(nn.Module):
    """Multi-head attention with diffusers' names (`to_q`, `to_k`, `to_v`, `to_out.0`)."""

    def __init__(
        self,
        query_dim: int,
        heads: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        context_dim = context_dim or query_dim
        self.heads = heads
        self.pad_heads = False  # see `attention`
        self.to_q = nn.Linear(query_dim, query_dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, query_dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, query_dim, bias=qkv_bias)
        self.to_out = [nn.Linear(query_dim, query_dim)]

    def __call__(self, x: mx.array, context: mx.array | None = None) -> mx.array:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, pad_heads=self.pad_heads)
        return self.to_out[0](out)
