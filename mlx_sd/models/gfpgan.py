"""GFPGAN v1.4's generator, the "clean" architecture (NHWC; names follow GFPGANv1Clean's keys).

A U-Net encodes the aligned face into a style code and, at every decoder resolution, spatial
scale/shift maps; a StyleGAN2 generator decodes the code while those maps modulate half of its
channels (SFT). Input and output are RGB in [-1, 1] at `out_size` (512 for the released model).

The StyleGAN2 noise inputs use the maps stored in the checkpoint, so the output is deterministic
(GFPGANer draws fresh noise per call; the learned noise strengths are small).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

SQRT2 = math.sqrt(2.0)


@dataclass(frozen=True)
class GFPGANConfig:
    out_size: int = 512
    num_style_feat: int = 512
    channel_multiplier: float = 2
    narrow: float = 1.0
    different_w: bool = True  # one style vector per decoder layer (v1.4), not one shared
    sft_half: bool = True  # SFT modulates half of the decoder's channels (v1.4)

    @property
    def log_size(self) -> int:
        return int(math.log2(self.out_size))

    @property
    def num_latent(self) -> int:
        return 2 * self.log_size - 2

    def channels(self, resolution: int, unet: bool = False) -> int:
        """StyleGAN2's width at `resolution`; the U-Net uses half of it."""
        narrow = self.narrow * (0.5 if unet else 1.0)
        base = 512 if resolution <= 32 else 256 * 64 // resolution * self.channel_multiplier
        return int(base * narrow)


def _lrelu(x: mx.array) -> mx.array:
    return nn.leaky_relu(x, 0.2)


def _up2_axis(x: mx.array, axis: int) -> mx.array:
    """2x bilinear along `axis` with align_corners=False: each sample splits into 3/4 of itself
    plus 1/4 of its neighbour on that side, edges clamped."""
    n = x.shape[axis]
    take = lambda i: mx.take(x, mx.array(i), axis=axis)  # noqa: E731
    prev = take([0] + list(range(n - 1)))
    nxt = take(list(range(1, n)) + [n - 1])
    pair = mx.stack([0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt], axis=axis + 1)
    shape = list(x.shape)
    shape[axis] *= 2
    return pair.reshape(shape)


def upsample_bilinear2x(x: mx.array) -> mx.array:
    """torch's F.interpolate(scale_factor=2, mode="bilinear", align_corners=False), NHWC."""
    return _up2_axis(_up2_axis(x, 1), 2)


def downsample_bilinear2x(x: mx.array) -> mx.array:
    """torch's bilinear 0.5x (align_corners=False) samples halfway between pixel pairs: a 2x2 mean."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ResBlock(nn.Module):
    """The U-Net's residual block; it halves or doubles the resolution between its two convs."""

    def __init__(self, in_channels: int, out_channels: int, up: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self._resample = upsample_bilinear2x if up else downsample_bilinear2x

    def __call__(self, x: mx.array) -> mx.array:
        out = _lrelu(self.conv2(self._resample(_lrelu(self.conv1(x)))))
        return out + self.skip(self._resample(x))


class ModulatedConv2d(nn.Module):
    """StyleGAN2's style-modulated conv. Scaling the input channels by the style and the output
    channels by the demodulation equals convolving with the per-sample modulated weight, without
    building one weight per sample."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_style_feat: int,
                 demodulate: bool = True, upsample: bool = False) -> None:
        super().__init__()
        self.modulation = nn.Linear(num_style_feat, in_channels)
        self.weight = mx.zeros((out_channels, kernel_size, kernel_size, in_channels))
        self.demodulate = demodulate
        self.upsample = upsample

    def __call__(self, x: mx.array, style: mx.array) -> mx.array:
        s = self.modulation(style)  # (B, in)
        x = x * s[:, None, None, :]
        if self.upsample:
            x = upsample_bilinear2x(x)
        out = mx.conv2d(x, self.weight, padding=self.weight.shape[1] // 2)
        if self.demodulate:
            energy = mx.square(s) @ mx.square(self.weight).sum(axis=(1, 2)).T  # (B, out)
            out = out * mx.rsqrt(energy + 1e-8)[:, None, None, :]
        return out


class StyleConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_style_feat: int, upsample: bool = False) -> None:
        super().__init__()
        self.modulated_conv = ModulatedConv2d(in_channels, out_channels, 3, num_style_feat, upsample=upsample)
        self.weight = mx.zeros((1,))  # the noise strength
        self.bias = mx.zeros((out_channels,))

    def __call__(self, x: mx.array, style: mx.array, noise: mx.array) -> mx.array:
        out = self.modulated_conv(x, style) * SQRT2
        return _lrelu(out + self.weight * noise + self.bias)


class ToRGB(nn.Module):
    def __init__(self, in_channels: int, num_style_feat: int) -> None:
        super().__init__()
        self.modulated_conv = ModulatedConv2d(in_channels, 3, 1, num_style_feat, demodulate=False)
        self.bias = mx.zeros((3,))

    def __call__(self, x: mx.array, style: mx.array, skip: mx.array | None) -> mx.array:
        out = self.modulated_conv(x, style) + self.bias
        return out if skip is None else out + upsample_bilinear2x(skip)


class StyleGAN2GeneratorCSFT(nn.Module):
    """StyleGAN2's synthesis network with SFT; the style MLP is unused (the input is a latent)."""

    def __init__(self, config: GFPGANConfig) -> None:
        super().__init__()
        self.config = config
        width, nsf = config.channels, config.num_style_feat
        self.constant_input = nn.Module()
        self.constant_input.weight = mx.zeros((1, 4, 4, width(4)))
        self.style_conv1 = StyleConv(width(4), width(4), nsf)
        self.to_rgb1 = ToRGB(width(4), nsf)
        self.style_convs, self.to_rgbs = [], []
        for level in range(3, config.log_size + 1):
            c_in, c_out = width(2 ** (level - 1)), width(2**level)
            self.style_convs += [StyleConv(c_in, c_out, nsf, upsample=True), StyleConv(c_out, c_out, nsf)]
            self.to_rgbs.append(ToRGB(c_out, nsf))
        self.noises = nn.Module()
        for i in range(2 * (config.log_size - 2) + 1):
            side = 2 ** ((i + 5) // 2)
            setattr(self.noises, f"noise{i}", mx.zeros((1, side, side, 1)))

    def __call__(self, latent: mx.array, conditions: list[mx.array]) -> mx.array:
        noise = [self.noises[f"noise{i}"] for i in range(len(self.style_convs) + 1)]
        batch = latent.shape[0]
        out = mx.broadcast_to(self.constant_input.weight, (batch, *self.constant_input.weight.shape[1:]))
        out = self.style_conv1(out, latent[:, 0], noise[0])
        skip = self.to_rgb1(out, latent[:, 1], None)
        for level, to_rgb in enumerate(self.to_rgbs):
            i = 2 * level + 1
            out = self.style_convs[2 * level](out, latent[:, i], noise[i])
            scale, shift = conditions[2 * level], conditions[2 * level + 1]
            if self.config.sft_half:
                half = out.shape[-1] // 2
                out = mx.concatenate([out[..., :half], out[..., half:] * scale + shift], axis=-1)
            else:
                out = out * scale + shift
            out = self.style_convs[2 * level + 1](out, latent[:, i + 1], noise[i + 1])
            skip = to_rgb(out, latent[:, i + 2], skip)
        return skip


class GFPGANv1Clean(nn.Module):
    def __init__(self, config: GFPGANConfig) -> None:
        super().__init__()
        self.config = config
        unet = lambda resolution: config.channels(resolution, unet=True)  # noqa: E731
        sizes = [2**level for level in range(config.log_size, 1, -1)]  # out_size ... 4
        self.conv_body_first = nn.Conv2d(3, unet(sizes[0]), 1)
        self.conv_body_down = [ResBlock(unet(a), unet(b), up=False) for a, b in zip(sizes, sizes[1:])]
        self.final_conv = nn.Conv2d(unet(4), unet(4), 3, padding=1)
        rising = sizes[::-1]  # 4 ... out_size
        self.conv_body_up = [ResBlock(unet(a), unet(b), up=True) for a, b in zip(rising, rising[1:])]
        styles = config.num_latent if config.different_w else 1
        self.final_linear = nn.Linear(unet(4) * 16, styles * config.num_style_feat)
        self.stylegan_decoder = StyleGAN2GeneratorCSFT(config)
        self.condition_scale, self.condition_shift = [], []
        for resolution in rising[1:]:
            c = unet(resolution)
            sft = c if config.sft_half else 2 * c
            for branch in (self.condition_scale, self.condition_shift):
                branch.append([nn.Conv2d(c, c, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(c, sft, 3, padding=1)])

    def __call__(self, x: mx.array) -> mx.array:
        feat = _lrelu(self.conv_body_first(x))
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.insert(0, feat)
        feat = _lrelu(self.final_conv(feat))
        batch = feat.shape[0]
        # torch flattens NCHW: channel-major, then rows, then columns.
        style = self.final_linear(feat.transpose(0, 3, 1, 2).reshape(batch, -1))
        latent = style.reshape(batch, -1, self.config.num_style_feat)
        if not self.config.different_w:
            latent = mx.broadcast_to(latent, (batch, self.config.num_latent, self.config.num_style_feat))
        conditions = []
        for skip, block, scale, shift in zip(skips, self.conv_body_up, self.condition_scale, self.condition_shift):
            feat = block(feat + skip)
            conditions += [_sequential(scale, feat), _sequential(shift, feat)]
        return self.stylegan_decoder(latent, conditions)


def _sequential(layers: list[nn.Module], x: mx.array) -> mx.array:
    for layer in layers:
        x = layer(x)
    return x
