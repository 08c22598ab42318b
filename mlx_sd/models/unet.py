"""The SD UNet (UNet2DConditionModel) of SD-1, SD-2 and SDXL in MLX, NHWC; parameter names follow
diffusers. SDXL's differences are config values: per-level transformer depths and head counts, and
the added `text_time` embedding of the pooled text embedding and the size micro-conditioning."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_sd.models.layers import Attention, ResnetBlock2D, upsample_nearest

# Config values the supported architectures have; anything else in a config.json is another model.
_SUPPORTED = {
    "class_embed_type": (None,),
    "addition_embed_type": (None, "text_time"),
    "time_embedding_type": ("positional",),
    "resnet_time_scale_shift": ("default",),
    "only_cross_attention": (False,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
}


@dataclass(frozen=True)
class UNetConfig:
    """Keyed like diffusers' `unet/config.json`; defaults are SD-1.5's."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    layers_per_block: int = 2
    # diffusers' historical misnomer: for SD-1 this is the number of heads, not their width.
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    transformer_layers_per_block: int | tuple[int, ...] = 1
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    sample_size: int = 64
    # SDXL: "text_time" adds an embedding of the pooled text embedding and the Fourier features
    # (addition_time_embed_dim each) of the size and crop micro-conditioning to the time embedding.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> UNetConfig:
        """Build from a diffusers config dict; unknown keys are ignored, unsupported features refused."""
        for key, supported in _SUPPORTED.items():
            if config.get(key, supported[0]) not in supported:
                raise ValueError(f"unsupported UNet config: {key}={config[key]!r} (supported: {supported!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names}
        return cls(**values)

    def per_block(self, value: int | tuple[int, ...]) -> tuple[int, ...]:
        return (value,) * len(self.block_out_channels) if isinstance(value, int) else tuple(value)

    @property
    def heads(self) -> tuple[int, ...]:
        return self.per_block(self.num_attention_heads or self.attention_head_dim)

    @property
    def transformer_depths(self) -> tuple[int, ...]:
        return self.per_block(self.transformer_layers_per_block)


def timestep_embedding(timesteps: mx.array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> mx.array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM / diffusers."""
    half = dim // 2
    freqs = mx.exp(-math.log(10000) * mx.arange(half, dtype=mx.float32) / (half - freq_shift))
    angles = timesteps.astype(mx.float32)[:, None] * freqs[None]
    sin, cos = mx.sin(angles), mx.cos(angles)
    return mx.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(self.act(self.linear_1(x)))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def __call__(self, x: mx.array) -> mx.array:
        """The first half of the projection gated by the (exact) GELU of the second half."""
        hidden, gate = mx.split(self.proj(x), 2, axis=-1)
        return hidden * nn.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        # The Identity holds diffusers' dropout slot so that `net.2` keeps its checkpoint name.
        self.net = [GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer; `proj_in`/`proj_out` are Linear whether the checkpoint stores 1x1 convs or not."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, pytorch_compatible=True)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = [BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)]
        self.proj_out = nn.Linear(channels, channels)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        b, h, w, c = x.shape
        # Per-pixel linear maps commute with the flattening, so conv-1x1 and linear projections agree.
        y = self.proj_in(self.norm(x).reshape(b, h * w, c))
        for block in self.transformer_blocks:
            y = block(y, context)
        return x + self.proj_out(y).reshape(b, h, w, c)


class Downsample2D(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        return self.conv(upsample_nearest(x, size))


class UNetBlock(nn.Module):
    """One resolution level: resnets, optionally each followed by a transformer, then a resampler.

    Down levels and up levels share this shape; an up level concatenates a skip before each resnet.
    """

    def __init__(
        self,
        resnet_channels: list[tuple[int, int]],
        config: UNetConfig,
        attention: tuple[int, int] | None,
        resample: type[Downsample2D] | type[Upsample2D] | None,
    ) -> None:
        super().__init__()
        temb = 4 * config.block_out_channels[0]
        groups, eps = config.norm_num_groups, config.norm_eps
        self.resnets = [ResnetBlock2D(i, o, temb, groups, eps) for i, o in resnet_channels]
        if attention is not None:
            heads, depth = attention
            self.attentions = [
                Transformer2DModel(o, heads, depth, config.cross_attention_dim, groups)
                for _, o in resnet_channels
            ]
        out = resnet_channels[-1][1]
        if resample is Downsample2D:
            self.downsamplers = [Downsample2D(out)]
        elif resample is Upsample2D:
            self.upsamplers = [Upsample2D(out)]

    def layers(self) -> Iterator[tuple[ResnetBlock2D, Transformer2DModel | None]]:
        attentions = self.get("attentions") or [None] * len(self.resnets)
        return zip(self.resnets, attentions, strict=True)


class UNetMidBlock(nn.Module):
    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        channels = config.block_out_channels[-1]
        temb = 4 * config.block_out_channels[0]
        groups, eps = config.norm_num_groups, config.norm_eps
        self.resnets = [ResnetBlock2D(channels, channels, temb, groups, eps) for _ in range(2)]
        self.attentions = [
            Transformer2DModel(
                channels, config.heads[-1], config.transformer_depths[-1], config.cross_attention_dim, groups
            )
        ]

    def __call__(self, x: mx.array, temb: mx.array, context: mx.array) -> mx.array:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UNet2DConditionModel(nn.Module):
    """Predicts the noise `eps` of NHWC latents at the given timesteps, conditioned on text states."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        levels, per_level = len(channels), config.layers_per_block
        cross_attn_down = [t.startswith("CrossAttn") for t in config.down_block_types]
        cross_attn_up = [t.startswith("CrossAttn") for t in config.up_block_types]

        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], 4 * channels[0])
        if config.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, 4 * channels[0])

        self.down_blocks = []
        for i, out in enumerate(channels):
            ins = [channels[max(i - 1, 0)]] + [out] * (per_level - 1)
            self.down_blocks.append(
                UNetBlock(
                    [(c, out) for c in ins],
                    config,
                    (config.heads[i], config.transformer_depths[i]) if cross_attn_down[i] else None,
                    Downsample2D if i < levels - 1 else None,
                )
            )

        self.mid_block = UNetMidBlock(config)

        # An up level's resnet j takes the previous output plus the skip saved by the mirrored down
        # level; its last resnet's skip comes from one level further down (or conv_in).
        self.up_blocks = []
        reversed_channels = channels[::-1]
        for i, out in enumerate(reversed_channels):
            prev = reversed_channels[max(i - 1, 0)]
            skip_last = reversed_channels[min(i + 1, levels - 1)]
            pairs = [
                ((prev if j == 0 else out) + (skip_last if j == per_level else out), out)
                for j in range(per_level + 1)
            ]
            down_index = levels - 1 - i
            self.up_blocks.append(
                UNetBlock(
                    pairs,
                    config,
                    (config.heads[down_index], config.transformer_depths[down_index]) if cross_attn_up[i] else None,
                    Upsample2D if i < levels - 1 else None,
                )
            )

        self.conv_norm_out = nn.GroupNorm(
            config.norm_num_groups, channels[0], eps=config.norm_eps, pytorch_compatible=True
        )
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    def __call__(self, x: mx.array, timesteps: mx.array, context: mx.array, text_embeds: mx.array | None = None,
                 time_ids: mx.array | None = None) -> mx.array:
        """x: (B, H, W, C) latents; timesteps: (B,) or scalar; context: (B, tokens, cross_attention_dim);
        for a `text_time` UNet (SDXL) also text_embeds (B, pooled) and time_ids (B, n): original
        size, crop top-left and target size (base), or the aesthetic score in place of the target (refiner)."""
        config = self.config
        timesteps = mx.broadcast_to(mx.array(timesteps), (x.shape[0],))
        t = timestep_embedding(timesteps, config.block_out_channels[0], config.flip_sin_to_cos, config.freq_shift)
        temb = self.time_embedding(t.astype(x.dtype))
        if "add_embedding" in self:
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet is conditioned on text_embeds and time_ids as well")
            times = timestep_embedding(time_ids.reshape(-1), config.addition_time_embed_dim, config.flip_sin_to_cos,
                                       config.freq_shift).reshape(x.shape[0], -1)
            temb = temb + self.add_embedding(mx.concatenate([text_embeds, times.astype(text_embeds.dtype)],
                                                            axis=-1).astype(x.dtype))

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            for resnet, attention in block.layers():
                x = resnet(x, temb)
                if attention is not None:
                    x = attention(x, context)
                skips.append(x)
            if "downsamplers" in block:
                x = block.downsamplers[0](x)
                skips.append(x)

        x = self.mid_block(x, temb, context)

        for block in self.up_blocks:
            for resnet, attention in block.layers():
                x = resnet(mx.concatenate([x, skips.pop()], axis=-1), temb)
                if attention is not None:
                    x = attention(x, context)
            if "upsamplers" in block:
                # Upsample to the next skip's size so odd latent sizes round-trip like diffusers.
                x = block.upsamplers[0](x, skips[-1].shape[1:3])

        return self.conv_out(self.conv_act(self.conv_norm_out(x)))
