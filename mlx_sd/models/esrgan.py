"""Real-ESRGAN's two generators (NHWC; parameter names follow basicsr/realesrgan's checkpoints).

- `RRDBNet`: ESRGAN's residual-in-residual dense blocks, as in RealESRGAN_x4plus (and x2plus,
  which folds 2x2 pixels into channels first).
- `SRVGGNetCompact`: a plain conv stack ending in a pixel shuffle, as in realesr-general-x4v3;
  it predicts a residual over the nearest-neighbour upscaled input.
Both map [0, 1] RGB to [0, 1] RGB (unclamped) at `scale` times the size.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlx_sd.models.layers import upsample_nearest


def pixel_shuffle(x: mx.array, r: int) -> mx.array:
    """torch's pixel_shuffle in NHWC: channel c*r*r + i*r + j goes to pixel (h*r + i, w*r + j)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, c // (r * r), r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c // (r * r))


def pixel_unshuffle(x: mx.array, r: int) -> mx.array:
    """The inverse of `pixel_shuffle` (basicsr's pixel_unshuffle)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // r, r, w // r, r, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, h // r, w // r, c * r * r)


def _lrelu(x: mx.array) -> mx.array:
    return nn.leaky_relu(x, 0.2)


@dataclass(frozen=True)
class RRDBNetConfig:
    scale: int = 4
    num_feat: int = 64
    num_block: int = 23
    num_grow_ch: int = 32


class ResidualDenseBlock(nn.Module):
    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        # conv k sees the block input and the k-1 growths before it.
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, padding=1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, padding=1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, padding=1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, padding=1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(_lrelu(conv(mx.concatenate(features, axis=-1))))
        return self.conv5(mx.concatenate(features, axis=-1)) * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def __call__(self, x: mx.array) -> mx.array:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    def __init__(self, config: RRDBNetConfig) -> None:
        super().__init__()
        self.config = config
        # x2 and x1 run the x4 body on pixel-unshuffled input, so every variant upsamples 4x.
        self._unshuffle = {4: 1, 2: 2, 1: 4}[config.scale]
        in_channels = 3 * self._unshuffle**2
        f = config.num_feat
        self.conv_first = nn.Conv2d(in_channels, f, 3, padding=1)
        self.body = [RRDB(f, config.num_grow_ch) for _ in range(config.num_block)]
        self.conv_body = nn.Conv2d(f, f, 3, padding=1)
        self.conv_up1 = nn.Conv2d(f, f, 3, padding=1)
        self.conv_up2 = nn.Conv2d(f, f, 3, padding=1)
        self.conv_hr = nn.Conv2d(f, f, 3, padding=1)
        self.conv_last = nn.Conv2d(f, 3, 3, padding=1)

    @property
    def scale(self) -> int:
        return self.config.scale

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this (the pixel unshuffle's factor)."""
        return self._unshuffle

    def __call__(self, x: mx.array) -> mx.array:
        if self._unshuffle > 1:
            x = pixel_unshuffle(x, self._unshuffle)
        feat = self.conv_first(x)
        body = feat
        for block in self.body:
            body = block(body)
        feat = feat + self.conv_body(body)
        for conv in (self.conv_up1, self.conv_up2):
            _, h, w, _ = feat.shape
            feat = _lrelu(conv(upsample_nearest(feat, (2 * h, 2 * w))))
        return self.conv_last(_lrelu(self.conv_hr(feat)))


@dataclass(frozen=True)
class SRVGGNetCompactConfig:
    num_feat: int = 64
    num_conv: int = 32
    upscale: int = 4


class SRVGGNetCompact(nn.Module):
    """`body` alternates conv and PReLU (indices as in the checkpoint): conv, act, (conv, act) *
    num_conv, conv to 3*upscale^2 channels."""

    def __init__(self, config: SRVGGNetCompactConfig) -> None:
        super().__init__()
        self.config = config
        f, r = config.num_feat, config.upscale
        self.body: list[nn.Module] = [nn.Conv2d(3, f, 3, padding=1), nn.PReLU(f)]
        for _ in range(config.num_conv):
            self.body += [nn.Conv2d(f, f, 3, padding=1), nn.PReLU(f)]
        self.body.append(nn.Conv2d(f, 3 * r * r, 3, padding=1))

    @property
    def scale(self) -> int:
        return self.config.upscale

    size_multiple = 1

    def __call__(self, x: mx.array) -> mx.array:
        out = x
        for layer in self.body:
            out = layer(out)
        r = self.config.upscale
        _, h, w, _ = x.shape
        return pixel_shuffle(out, r) + upsample_nearest(x, (h * r, w * r))
