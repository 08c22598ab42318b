"""The SD-1 AutoencoderKL (VAE) in MLX, NHWC; parameter names follow diffusers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_sd.models.layers import Attention, ResnetBlock2D, upsample_nearest

# The VAE's norms all use this epsilon in diffusers and in the original LDM code.
_EPS = 1e-6


@dataclass(frozen=True)
class VAEConfig:
    """Keyed like diffusers' `vae/config.json`; defaults are SD-1.5's."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 512
    # diffusers' flag (its default, True, where a config.json lacks it): the VAE overflows fp16 and
    # runs in fp32. Only SDXL's pipelines heed it (see mlx_sd.engine.vae_precision); SDXL's fp16-fix
    # VAE says False.
    force_upcast: bool = True

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> VAEConfig:
        """Build from a diffusers config dict; unknown keys are ignored."""
        if config.get("act_fn", "silu") != "silu":
            raise ValueError(f"unsupported VAE config: act_fn={config['act_fn']!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names}
        return cls(**values)


class SpatialSelfAttention(Attention):
    """Single-head self-attention over all pixels, with its own GroupNorm and a residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__(channels, heads=1, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=_EPS, pytorch_compatible=True)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        return x + super().__call__(self.group_norm(x).reshape(b, h * w, c)).reshape(b, h, w, c)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool) -> None:
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, None, groups, _EPS) for _ in range(2)]
        self.attentions = [SpatialSelfAttention(channels, groups)] if add_attention else []

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class EncoderDownsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        # The VAE pads only bottom and right before its stride-2 conv (unlike the UNet's symmetric pad).
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class DecoderUpsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(upsample_nearest(x, (2 * x.shape[1], 2 * x.shape[2])))


class ResolutionBlock(nn.Module):
    """Resnets at one resolution, then an optional resampler (`downsamplers` or `upsamplers`)."""

    def __init__(self, channels: list[tuple[int, int]], groups: int, resampler: str | None) -> None:
        super().__init__()
        self.resnets = [ResnetBlock2D(i, o, None, groups, _EPS) for i, o in channels]
        out = channels[-1][1]
        if resampler == "down":
            self.downsamplers = [EncoderDownsample(out)]
        elif resampler == "up":
            self.upsamplers = [DecoderUpsample(out)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        for resampler in self.get("downsamplers", []) + self.get("upsamplers", []):
            x = resampler(x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        last = len(channels) - 1
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = [
            ResolutionBlock(
                [(channels[max(i - 1, 0)] if j == 0 else out, out) for j in range(config.layers_per_block)],
                groups,
                "down" if i < last else None,
            )
            for i, out in enumerate(channels)
        ]
        self.mid_block = MidBlock(channels[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=_EPS, pytorch_compatible=True)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels, groups = config.block_out_channels[::-1], config.norm_num_groups
        last = len(channels) - 1
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups, config.mid_block_add_attention)
        self.up_blocks = [
            ResolutionBlock(
                [(channels[max(i - 1, 0)] if j == 0 else out, out) for j in range(config.layers_per_block + 1)],
                groups,
                "up" if i < last else None,
            )
            for i, out in enumerate(channels)
        ]
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=_EPS, pytorch_compatible=True)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """Images (B, H, W, 3) in [-1, 1] <-> latents (B, H/8, W/8, 4); latent scaling is the caller's."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent = config.latent_channels
        if config.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        if config.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(latent, latent, 1)

    def encode(self, images: mx.array) -> tuple[mx.array, mx.array]:
        """The mean and log-variance of the latent distribution (unscaled)."""
        moments = self.encoder(images)
        if "quant_conv" in self:
            moments = self.quant_conv(moments)
        mean, logvar = mx.split(moments, 2, axis=-1)
        return mean, mx.clip(logvar, -30.0, 20.0)

    def decode(self, latents: mx.array) -> mx.array:
        """Images from unscaled latents."""
        if "post_quant_conv" in self:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)
