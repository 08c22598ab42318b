"""The seam: `accelerate(model)` puts the CPU kernels' forms (layers.py) in place of a loaded
network's plain MLX layers and blocks, in the spirit of `nn.quantize`.

Each replacement is a subclass of the module it replaces and takes over its parameters, so the
weights and their names are unchanged. Modules of other types are left as they are: quantized
layers (`nn.QuantizedLinear`, which quantization put in place before) keep MLX's quantized
products. A GroupNorm followed by a SiLU module at a network's head (`conv_norm_out`, `conv_act`)
becomes one GroupNorm that applies the SiLU in the same pass, the SiLU module an identity.
"""

from __future__ import annotations

import functools
import logging
from typing import TypeVar

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_sd.cpu import kernels, layers as cpu
from mlx_sd.cpu.blas import gemm
from mlx_sd.cpu.norms import GroupNorm, GroupNormSiLU, LayerNorm
from mlx_sd.models import clip, layers, unet, vae

REPLACEMENTS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: cpu.Linear,
    nn.Conv2d: cpu.Conv2d,
    nn.GroupNorm: GroupNorm,
    nn.LayerNorm: LayerNorm,
    nn.SiLU: cpu.SiLU,
    clip.QuickGELU: cpu.QuickGELU,
    clip.CLIPAttention: cpu.CLIPAttention,
    clip.CLIPEmbeddings: cpu.CLIPEmbeddings,
    layers.ResnetBlock2D: cpu.ResnetBlock2D,
    layers.Attention: cpu.Attention,
    vae.SpatialSelfAttention: cpu.SpatialSelfAttention,
    vae.DecoderUpsample: cpu.DecoderUpsample,
    unet.Upsample2D: cpu.Upsample2D,
    unet.GEGLU: cpu.GEGLU,
    unet.FeedForward: cpu.FeedForward,
    unet.BasicTransformerBlock: cpu.BasicTransformerBlock,
    unet.Transformer2DModel: cpu.Transformer2DModel,
}
# (norm, activation) children that become one fused GroupNorm + SiLU.
FUSED_HEADS = (("conv_norm_out", "conv_act"),)

M = TypeVar("M", bound=nn.Module)


def available() -> bool:
    """Whether the CPU kernels were built (and load) here."""
    return kernels.kernels() is not None


def accelerate(model: M) -> M:
    """`model` with its layers and blocks replaced in place by their CPU-kernel forms; returns it
    (or its replacement, where the model's own type has one). For MLX's CPU device: the forms
    evaluate their inputs and call the kernels, so they cannot run on the GPU or be traced."""
    if any(p.dtype == mx.bfloat16 for _, p in tree_flatten(model.parameters())):
        _bf16_note()
    return _converted(model)


@functools.cache
def _bf16_note() -> None:
    """Says once, at the first bf16 model, where bf16 is the slower dtype on this processor."""
    functions = gemm()
    if functions is not None and functions.choice.faster_dtype != "bfloat16":
        logging.getLogger(__name__).warning(
            "bfloat16 is slower than float32 on this processor (%s): --dtype float32 is faster here",
            functions.choice.describe())


def _adopt(cls: type[M], module: nn.Module) -> M:
    """An instance of `cls` holding `module`'s parameters, children and attributes."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    dict.update(new, module)
    return new


def _converted(module: M) -> M:
    replacement = REPLACEMENTS.get(type(module))
    if replacement is not None:
        module = _adopt(replacement, module)
    for norm, activation in FUSED_HEADS:
        if type(module.get(norm)) is nn.GroupNorm and type(module.get(activation)) is nn.SiLU:
            module[norm], module[activation] = _adopt(GroupNormSiLU, module[norm]), nn.Identity()
    for name, child in module.items():
        module[name] = _converted_tree(child)
    return module


def _converted_tree(value: object) -> object:
    """Modules converted, in lists and dicts as in a module's children; anything else as it is."""
    if isinstance(value, nn.Module):
        return _converted(value)
    if isinstance(value, list):
        return [_converted_tree(v) for v in value]
    if isinstance(value, dict):
        return {k: _converted_tree(v) for k, v in value.items()}
    return value
