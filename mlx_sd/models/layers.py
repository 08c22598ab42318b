"""Building blocks shared by the UNet and the VAE (NHWC; parameter names follow diffusers)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlx_sd.models import cpu_gemm
from mlx_sd.models.activations import silu
from mlx_sd.models.attention import attention
from mlx_sd.models.group_norm import GroupNorm


def activation_dtype(weights: mx.Dtype) -> mx.Dtype:
    """The dtype of the activations for weights stored as `weights`: the same on the GPU, but fp32
    on the CPU, where MLX's fp16/bf16 elementwise ops and products are slow. Ops promote the stored
    weights as they go, so fp16 storage still halves the memory the weights hold; bf16 layers run
    their products in bf16 through cpu_gemm."""
    return weights if mx.default_device() == mx.gpu else mx.float32


def _plus(y: mx.array, add: mx.array | None) -> mx.array:
    return y if add is None else y + add


class Linear(nn.Linear):
    """`nn.Linear` that, on the CPU, computes bf16-stored layers with bf16 products (see cpu_gemm).
    `add`, of the result's shape (a residual), is added to the result: on the CPU by
    accumulating the products onto it."""

    def __call__(self, x: mx.array, add: mx.array | None = None) -> mx.array:
        if cpu_gemm.uses_bf16(self.weight) and (add is None or add.shape == (*x.shape[:-1], self.weight.shape[0])):
            return cpu_gemm.linear(x, self.weight, self.get("bias"), add)
        return _plus(super().__call__(x), add)


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` that, on the CPU, runs stride-1 "same" convolutions straight on the BLAS and 1x1
    convolutions of bf16-stored layers as bf16 products (see cpu_gemm). `add` is added to the
    result: on the CPU with the bias, when it is a residual (the result's shape) or one vector
    per image (B, 1, 1, out)."""

    def __call__(self, x: mx.array, add: mx.array | None = None) -> mx.array:
        kernel = self.weight.shape[1]
        plain = self.groups == 1 and self.dilation in (1, (1, 1)) and self.stride == (1, 1)
        same = kernel == self.weight.shape[2] and self.padding == (kernel // 2,) * 2
        shape = (*x.shape[:-1], self.weight.shape[0])
        if plain and same and cpu_gemm.on_cpu():
            if kernel > 1 and (add is None or add.shape in (shape, (shape[0], 1, 1, shape[-1]))):
                return cpu_gemm.conv2d(x, self.weight, self.get("bias"), kernel // 2, add)
            if kernel == 1 and cpu_gemm.uses_bf16(self.weight) and (add is None or add.shape == shape):
                return cpu_gemm.linear(x, self.weight, self.get("bias"), add)
        return _plus(super().__call__(x), add)


def output_plus(layer: nn.Module, x: mx.array, add: mx.array | None) -> mx.array:
    """layer(x) + add: folded into the layer's output pass where the layer is ours (not, say, an
    `nn.QuantizedLinear` that quantization put in its place)."""
    if isinstance(layer, (Linear, Conv2d)):
        return layer(x, add=add)
    return _plus(layer(x), add)


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
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, pytorch_compatible=True)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps, pytorch_compatible=True)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array, temb: mx.array | None = None) -> mx.array:
        # The time embedding (one vector per image) and the shortcut join the convolutions' outputs.
        step = None if temb is None else self.time_emb_proj(silu(temb))[:, None, None, :]
        h = output_plus(self.conv1, self.norm1.with_silu(x), step)
        shortcut = self.conv_shortcut(x) if "conv_shortcut" in self else x
        return output_plus(self.conv2, self.norm2.with_silu(h), shortcut)


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
        self.to_q = Linear(query_dim, query_dim, bias=qkv_bias)
        self.to_k = Linear(context_dim, query_dim, bias=qkv_bias)
        self.to_v = Linear(context_dim, query_dim, bias=qkv_bias)
        self.to_out = [Linear(query_dim, query_dim)]

    def __call__(self, x: mx.array, context: mx.array | None = None, add: mx.array | None = None) -> mx.array:
        """The attention's output, plus `add` (a residual) if given."""
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        out = attention(q, k, v, self.heads, scale=(x.shape[-1] // self.heads) ** -0.5,
                        bf16_products=cpu_gemm.uses_bf16(self.to_v.weight))
        return output_plus(self.to_out[0], out, add)
