"""GroupNorm and LayerNorm on the CPU kernels, with `nn.GroupNorm`'s and `nn.LayerNorm`'s
parameters and results.

GroupNorm: `nn.GroupNorm(..., pytorch_compatible=True)` transposes the channels into groups and back around
`mx.fast.layer_norm` (composed ops on the CPU), then applies the affine map: several
single-threaded passes over the tensor, ~17 ns per element at 512x512x128. On the CPU this form
reads the evaluated input once for per-channel sums of the deviations from a rough per-channel
mean (a fused kernel, kernels.py, on every core); combines them into group moments in float64;
and applies mean, variance, weight and bias together as `x * a + b` with per-(batch, channel)
a, b, in one pass of a fused kernel (kernels.py) that also applies the SiLU that usually follows.
benchmarks/group_norm_cpu.py (Xeon, 2 cores): 6.8x faster at (1, 512, 512, 128), 3.8x at
(1, 64, 64, 512), 1.5x at (2, 16, 16, 1280); at (2, 8, 8, 1280) its fixed costs make it slower
(1.0 ms against 0.6 ms), a few milliseconds per UNet step.

Summing deviations keeps the variance exact where float32 E[x²] - E[x]² would cancel. Against
float64 it is also more accurate than nn.GroupNorm: 9e-7 against 3e-3 at (1, 512, 512, 128), and
2e-3 against 3e-2 at mean 100, std 0.01 (where float32 inputs themselves limit both). Like the
CPU attention, the fast form evaluates its input, so it cannot be traced by `mx.compile`; for
non-float32 input it is `nn.GroupNorm` itself.

LayerNorm: `mx.fast.layer_norm` runs on one thread on the CPU at about 3 ns per value: 0.23 s of a
512² UNet step, whose transformer blocks normalise ~70M values. This form runs a fused kernel (per
row, the mean and variance in two passes over the cache-resident row, then the affine map) over
blocks of rows spread over the cores. For non-float32 input and without both affine parameters,
it is `nn.LayerNorm`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sd.cpu import kernels
from mlx_sd.cpu.activations import silu
from mlx_sd.cpu.buffers import as_fp32, new_array

# About this many rows give the rough per-channel mean the deviations are taken from: it only
# has to be within a few standard deviations of the true mean for the sums not to cancel.
SHIFT_SAMPLES = 64


def group_moments(x: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 mean and (biased) variance, each (B, groups), of x: (B, N, C) float32, whose
    groups are runs of C // groups consecutive channels over all N positions."""
    b, n, c = x.shape
    shift = np.ascontiguousarray(x[:, :: max(1, n // SHIFT_SAMPLES)].mean(axis=1))
    s1, s2 = kernels.channel_moments(x, shift)
    # x - mean = (x - shift) + (shift - mean), summed per channel, then over the group's channels.
    s1, s2 = s1.reshape(b, groups, -1), s2.reshape(b, groups, -1)
    shift = shift.reshape(b, groups, -1).astype(np.float64)
    count = n * s1.shape[-1]
    mean = (n * shift + s1).sum(-1) / count
    offset = shift - mean[..., None]
    var = (s2 + 2 * offset * s1 + n * offset**2).sum(-1) / count
    return mean, var


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` on the CPU kernels for float32 input (see the module docstring)."""

    def __call__(self, x: mx.array) -> mx.array:
        return self._normalize(x, then_silu=False)

    def with_silu(self, x: mx.array, bf16: bool = False) -> mx.array:
        """silu(self(x)); on the CPU the SiLU is applied in the same pass as the normalisation.
        With `bf16`, for a convolution that reads bf16 (layers.Conv2d.reads_bf16), an fp32 input's
        result comes rounded to bf16 as that convolution would round it, so that the fp32 map,
        twice the size, is never held."""
        return self._normalize(x, then_silu=True, bf16=bf16)

    def _normalize(self, x: mx.array, then_silu: bool, bf16: bool = False) -> mx.array:
        if x.dtype != mx.float32 or not self.pytorch_compatible:
            y = super().__call__(x)
            return silu(y) if then_silu else y
        b, c = x.shape[0], x.shape[-1]
        flat = as_fp32(x).reshape(b, -1, c)
        mean, var = group_moments(flat, self.num_groups)
        # Per-(batch, channel) scale and shift: y = (x - mean) * rstd * weight + bias.
        rstd = np.repeat(1 / np.sqrt(var + self.eps), c // self.num_groups, axis=1)
        mean = np.repeat(mean, c // self.num_groups, axis=1)
        weight, bias = ((as_fp32(self[n]).astype(np.float64) if n in self else d)
                        for n, d in (("weight", 1.0), ("bias", 0.0)))
        scale = (rstd * weight).astype(np.float32)
        offset = (bias - mean * rstd * weight).astype(np.float32)
        result, out = new_array(x.shape, mx.bfloat16 if bf16 else mx.float32)
        kernels.scale_shift(flat, scale, offset, then_silu, out.reshape(flat.shape))
        return result


class GroupNormSiLU(GroupNorm):
    """silu(GroupNorm(x)) in one pass: a GroupNorm followed by a SiLU module, fused."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.with_silu(x)


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` on the CPU kernels for float32 input (see the module docstring)."""

    def __call__(self, x: mx.array) -> mx.array:
        if x.dtype != mx.float32 or "weight" not in self or "bias" not in self:
            return super().__call__(x)
        weight, bias = (as_fp32(self[name]) for name in ("weight", "bias"))
        return kernels.map_rows(lambda rows, out: kernels.layer_norm(rows, weight, bias, self.eps, out),
                                x, x.shape[-1])
