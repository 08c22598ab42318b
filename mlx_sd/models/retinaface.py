"""RetinaFace with the MobileNet-0.25 backbone, as in facexlib (NHWC; names follow its keys).

Layer groups are lists laid out like facexlib's nn.Sequential blocks (conv, batch norm,
activation, ...), so checkpoint indices address the same layers here. The network takes a BGR
image minus facexlib's channel means and returns, per prior box, box offsets, face/background
probabilities and five-landmark offsets; `mlx_sd.faces.detection` decodes them.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlx_sd.models.layers import upsample_nearest

Layers = list[nn.Module]
ANCHORS = 2  # prior boxes per feature-map cell (two sizes per level)
OUT_CHANNELS = 64  # FPN/SSH width of the mobilenet0.25 configuration


def _run(layers: Layers, x: mx.array) -> mx.array:
    for layer in layers:
        x = layer(x)
    return x


def conv_bn(inp: int, oup: int, stride: int = 1, leaky: float | None = 0.0, kernel: int = 3) -> Layers:
    """Conv (no bias), batch norm and, unless `leaky` is None, a leaky ReLU."""
    layers: Layers = [nn.Conv2d(inp, oup, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm(oup)]
    return layers if leaky is None else layers + [nn.LeakyReLU(leaky)]


def conv_dw(inp: int, oup: int, stride: int, leaky: float = 0.1) -> Layers:
    """Depthwise 3x3 then pointwise 1x1, each with batch norm and a leaky ReLU."""
    return [nn.Conv2d(inp, inp, 3, stride=stride, padding=1, groups=inp, bias=False), nn.BatchNorm(inp),
            nn.LeakyReLU(leaky), *conv_bn(inp, oup, leaky=leaky, kernel=1)]


class MobileNetV1(nn.Module):
    """The 0.25-width MobileNet; its three stages end at strides 8, 16 and 32."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = [conv_bn(3, 8, 2, leaky=0.1), conv_dw(8, 16, 1), conv_dw(16, 32, 2), conv_dw(32, 32, 1),
                       conv_dw(32, 64, 2), conv_dw(64, 64, 1)]
        self.stage2 = [conv_dw(64, 128, 2)] + [conv_dw(128, 128, 1) for _ in range(5)]
        self.stage3 = [conv_dw(128, 256, 2), conv_dw(256, 256, 1)]

    def __call__(self, x: mx.array) -> list[mx.array]:
        features = []
        for stage in (self.stage1, self.stage2, self.stage3):
            for block in stage:
                x = _run(block, x)
            features.append(x)
        return features


class FPN(nn.Module):
    def __init__(self, in_channels: list[int], out_channels: int, leaky: float) -> None:
        super().__init__()
        self.output1, self.output2, self.output3 = (
            conv_bn(c, out_channels, leaky=leaky, kernel=1) for c in in_channels)
        self.merge1 = conv_bn(out_channels, out_channels, leaky=leaky)
        self.merge2 = conv_bn(out_channels, out_channels, leaky=leaky)

    def __call__(self, features: list[mx.array]) -> list[mx.array]:
        out1, out2, out3 = (_run(layers, f) for layers, f in zip((self.output1, self.output2, self.output3), features))
        out2 = _run(self.merge2, out2 + upsample_nearest(out3, out2.shape[1:3]))
        out1 = _run(self.merge1, out1 + upsample_nearest(out2, out1.shape[1:3]))
        return [out1, out2, out3]


class SSH(nn.Module):
    """Context module: 3x3, 5x5 and 7x7 receptive fields (stacked 3x3 convs), concatenated."""

    def __init__(self, channels: int, leaky: float) -> None:
        super().__init__()
        self.conv3X3 = conv_bn(channels, channels // 2, leaky=None)
        self.conv5X5_1 = conv_bn(channels, channels // 4, leaky=leaky)
        self.conv5X5_2 = conv_bn(channels // 4, channels // 4, leaky=None)
        self.conv7X7_2 = conv_bn(channels // 4, channels // 4, leaky=leaky)
        self.conv7x7_3 = conv_bn(channels // 4, channels // 4, leaky=None)

    def __call__(self, x: mx.array) -> mx.array:
        branch5 = _run(self.conv5X5_1, x)
        branch7 = _run(self.conv7x7_3, _run(self.conv7X7_2, branch5))
        return nn.relu(mx.concatenate([_run(self.conv3X3, x), _run(self.conv5X5_2, branch5), branch7], axis=-1))


class Head(nn.Module):
    def __init__(self, channels: int, values: int) -> None:
        super().__init__()
        self.conv1x1 = nn.Conv2d(channels, ANCHORS * values, 1)
        self.values = values

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv1x1(x).reshape(x.shape[0], -1, self.values)  # row-major cells, then anchors


class RetinaFace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # facexlib uses leaky slope 0.1 in FPN and SSH when they are at most 64 wide.
        leaky = 0.1 if OUT_CHANNELS <= 64 else 0.0
        self.body = MobileNetV1()
        self.fpn = FPN([64, 128, 256], OUT_CHANNELS, leaky)
        self.ssh1, self.ssh2, self.ssh3 = (SSH(OUT_CHANNELS, leaky) for _ in range(3))
        self.ClassHead = [Head(OUT_CHANNELS, 2) for _ in range(3)]
        self.BboxHead = [Head(OUT_CHANNELS, 4) for _ in range(3)]
        self.LandmarkHead = [Head(OUT_CHANNELS, 10) for _ in range(3)]

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """(boxes (B, N, 4), scores (B, N, 2) after softmax, landmarks (B, N, 10)) for the N priors."""
        fpn = self.fpn(self.body(x))
        features = [ssh(f) for ssh, f in zip((self.ssh1, self.ssh2, self.ssh3), fpn)]
        heads = lambda hs: mx.concatenate([h(f) for h, f in zip(hs, features)], axis=1)  # noqa: E731
        return heads(self.BboxHead), mx.softmax(heads(self.ClassHead), axis=-1), heads(self.LandmarkHead)
