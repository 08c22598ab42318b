"""The CPU kernels' forms of the networks' layers and blocks, which `accelerate` (apply.py) puts in
place of the plain ones in a loaded network. Each is a subclass of the module it replaces with the
same parameters (checkpoint keys are unchanged); only `__call__` differs.

Where a block ends in a residual, its CPU form adds the residual inside the last layer's output
pass (`add=`: the GEMM accumulates onto it, or the convolution's crop adds it with the bias), which
saves a pass over the block's output: about 5% of a 512² UNet step. Layers the seam did not make
ours (an `nn.QuantizedLinear` put in place by quantization) add it afterwards (`output_plus`).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sd.cpu import activations, gemm
from mlx_sd.cpu.attention import attention
from mlx_sd.cpu.buffers import as_fp32, new_array
from mlx_sd.models import clip, layers, unet, vae


def _plus(y: mx.array, add: mx.array | None) -> mx.array:
    return y if add is None else y + add


class Linear(nn.Linear):
    """`nn.Linear` that computes bf16-stored layers with bf16 products (see gemm.py). `add`, of the
    result's shape (a residual), is added to the result by accumulating the products onto it."""

    def __call__(self, x: mx.array, add: mx.array | None = None) -> mx.array:
        if gemm.uses_bf16(self.weight) and (add is None or add.shape == (*x.shape[:-1], self.weight.shape[0])):
            return gemm.linear(x, self.weight, self.get("bias"), add)
        return _plus(super().__call__(x), add)


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` that runs stride-1 "same" convolutions straight on the BLAS and 1x1 convolutions
    of bf16-stored layers as bf16 products (see gemm.py). `add` is added to the result with the
    bias, when it is a residual (the result's shape) or one vector per image (B, 1, 1, out)."""

    def __call__(self, x: mx.array, add: mx.array | None = None) -> mx.array:
        shape = (*x.shape[:-1], self.weight.shape[0])
        if self._plain_same() and gemm.fast_blas():
            kernel = self.weight.shape[1]
            if kernel > 1 and (add is None or add.shape in (shape, (shape[0], 1, 1, shape[-1]))):
                return gemm.conv2d(x, self.weight, self.get("bias"), kernel // 2, add)
            if kernel == 1 and gemm.uses_bf16(self.weight) and (add is None or add.shape == shape):
                return gemm.linear(x, self.weight, self.get("bias"), add)
        return _plus(super().__call__(x), add)

    def reads_bf16(self, shape: tuple[int, ...]) -> bool:
        """Whether this layer reads an input of this shape as bf16 (gemm.reads_bf16), so that the
        layer before may hand it over rounded."""
        return self._plain_same() and gemm.reads_bf16(self.weight, shape)

    def _plain_same(self) -> bool:
        """A stride-1, undilated, ungrouped convolution with a square kernel and "same" padding."""
        kernel = self.weight.shape[1]
        return (self.groups == 1 and self.dilation in (1, (1, 1)) and self.stride == (1, 1)
                and kernel == self.weight.shape[2] and self.padding == (kernel // 2,) * 2)


def output_plus(layer: nn.Module, x: mx.array, add: mx.array | None) -> mx.array:
    """layer(x) + add: folded into the layer's output pass where the layer is ours."""
    if isinstance(layer, (Linear, Conv2d)):
        return layer(x, add=add)
    return _plus(layer(x), add)


class SiLU(nn.SiLU):
    def __call__(self, x: mx.array) -> mx.array:
        return activations.silu(x)


class QuickGELU(clip.QuickGELU):
    def __call__(self, x: mx.array) -> mx.array:
        return activations.quick_gelu(x)


class ResnetBlock2D(layers.ResnetBlock2D):
    """The time embedding (one vector per image) and the shortcut join the convolutions' outputs;
    each GroupNorm applies the SiLU that follows it in the same pass (norms.GroupNorm.with_silu),
    rounded to bf16 where the convolution reads bf16, and each map is dropped as soon as it has
    been read. At the 1024² VAE decoder's last level, whose input is 1 GiB in fp32, that holds a
    0.5 GiB bf16 map where an fp32 one and the convolution's rounded copy of it took 1.5 GiB, and
    no longer keeps the first convolution's output (0.5 GiB) through the second."""

    def __call__(self, x: mx.array, temb: mx.array | None = None) -> mx.array:
        step = None if temb is None else self.time_emb_proj(self.nonlinearity(temb))[:, None, None, :]
        h = self.norm1.with_silu(x, bf16=self.conv1.reads_bf16(x.shape))
        h = output_plus(self.conv1, h, step)
        h = self.norm2.with_silu(h, bf16=self.conv2.reads_bf16(h.shape))
        shortcut = self.conv_shortcut(x) if "conv_shortcut" in self else x
        return output_plus(self.conv2, h, shortcut)


def _upsampled_conv(conv: Conv2d, x: mx.array, size: tuple[int, int]) -> mx.array:
    """conv(upsample_nearest(x, size)): where the convolution reads bf16 and the resize is 2x, the
    upsampled map is written as bf16 straight from x's rounded pixels (numpy's broadcast copy),
    never as fp32 (1 GiB at a 1024² VAE's last upsampling)."""
    b, height, width, c = x.shape
    if size != (2 * height, 2 * width) or not conv.reads_bf16((b, *size, c)):
        return conv(layers.upsample_nearest(x, size))
    up, bits = new_array((b, *size, c), mx.bfloat16)
    np.copyto(bits.reshape(b, height, 2, width, 2, c), gemm.bf16_bits(as_fp32(x))[:, :, None, :, None, :])
    return conv(up)


class DecoderUpsample(vae.DecoderUpsample):
    def __call__(self, x: mx.array) -> mx.array:
        return _upsampled_conv(self.conv, x, (2 * x.shape[1], 2 * x.shape[2]))


class Upsample2D(unet.Upsample2D):
    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        return _upsampled_conv(self.conv, x, size)


def _attend(module: layers.Attention, x: mx.array, context: mx.array, add: mx.array | None,
            causal: bool = False) -> mx.array:
    """`module`'s attention (diffusers' names) on the CPU kernels, plus `add` (a residual) if given."""
    q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
    out = attention(q, k, v, module.heads, scale=(x.shape[-1] // module.heads) ** -0.5,
                    bf16_products=gemm.uses_bf16(module.to_v.weight), causal=causal)
    return output_plus(module.to_out[0], out, add)


class Attention(layers.Attention):
    def __call__(self, x: mx.array, context: mx.array | None = None, add: mx.array | None = None) -> mx.array:
        """The attention's output, plus `add` (a residual) if given."""
        return _attend(self, x, x if context is None else context, add)


class SpatialSelfAttention(vae.SpatialSelfAttention):
    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        return _attend(self, tokens, tokens, x.reshape(b, h * w, c)).reshape(b, h, w, c)


class CLIPAttention(clip.CLIPAttention):
    def __call__(self, x: mx.array) -> mx.array:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        out = attention(q, k, v, self.heads, scale=(x.shape[-1] // self.heads) ** -0.5, causal=True,
                        bf16_products=gemm.uses_bf16(self.v_proj.weight))
        return self.out_proj(out)


class CLIPEmbeddings(clip.CLIPEmbeddings):
    """The text encoder's activations in fp32 whatever its weights' dtype: MLX's fp16 and bf16
    elementwise ops and products are slow on the CPU (bf16 layers still take bf16 products)."""

    def __call__(self, input_ids: mx.array, token_embeddings: mx.array | None = None) -> mx.array:
        return super().__call__(input_ids, token_embeddings).astype(mx.float32)


class GEGLU(unet.GEGLU):
    def __call__(self, x: mx.array) -> mx.array:
        return activations.geglu(self.proj(x))


class FeedForward(unet.FeedForward):
    def __call__(self, x: mx.array, add: mx.array | None = None) -> mx.array:
        """The feed-forward's output, plus `add` (a residual) if given: where gemm.py computes both
        layers, one fused kernel call that never holds the projection whole (gemm.feed_forward)."""
        proj, out = self.net[0].proj, self.net[2]
        if (isinstance(proj, Linear) and isinstance(out, Linear) and gemm.computes(proj.weight)
                and out.weight.dtype == proj.weight.dtype):
            return gemm.feed_forward(x, proj.weight, proj.get("bias"), out.weight, out.get("bias"), add)
        return output_plus(out, self.net[1](self.net[0](x)), add)


class BasicTransformerBlock(unet.BasicTransformerBlock):
    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        x = self.attn1(self.norm1(x), add=x)
        x = self.attn2(self.norm2(x), context, add=x)
        return self.ff(self.norm3(x), add=x)


class Transformer2DModel(unet.Transformer2DModel):
    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        b, h, w, c = x.shape
        y = self.proj_in(self.norm(x).reshape(b, h * w, c))
        for block in self.transformer_blocks:
            y = block(y, context)
        return output_plus(self.proj_out, y, x.reshape(b, h * w, c)).reshape(b, h, w, c)
