"""GFPGAN v1.4 ("clean" architecture) checkpoints: configuration from the shapes, and the few
tensors that inference does not use or that are stored with extra unit dimensions.

The released GFPGANv1.4 weights load strictly into GFPGANv1Clean, whose names our modules keep.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx

from convert.keymaps import distinct_indices
from convert.restoration import shape_of
from mlx_sd.engine.errors import CheckpointError
from mlx_sd.models.gfpgan import GFPGANConfig, GFPGANv1Clean

# Not used to restore: the style MLP (v1.4 feeds the decoder latents directly) and the U-Net's
# intermediate RGB heads (training losses only).
UNUSED = re.compile(r"stylegan_decoder\.style_mlp\.|toRGB\.")
# StyleGAN2 keeps a leading batch axis on these: (1, out, in, k, k) weights, (1, C, 1, 1) biases.
_BATCHED_WEIGHT = re.compile(r".*modulated_conv\.weight")
_BATCHED_BIAS = re.compile(r"stylegan_decoder\.(style_conv1|to_rgb1|style_convs\.\d+|to_rgbs\.\d+)\.bias")


def build_restorer(weights: dict[str, mx.array], source: Path) -> GFPGANv1Clean:
    keys = list(weights)
    if "stylegan_decoder.constant_input.weight" not in weights or "conv_body_first.weight" not in weights:
        raise CheckpointError(f"{source} is not a GFPGAN v1.3/v1.4 (clean architecture) checkpoint")
    log_size = len(distinct_indices(keys, r"conv_body_down\.(\d+)\.")) + 2
    num_style_feat = shape_of(weights, "stylegan_decoder.style_conv1.modulated_conv.modulation.weight", source)[1]
    narrow = shape_of(weights, "stylegan_decoder.constant_input.weight", source)[1] / 512
    # The 64x64 level is the first whose width depends on the channel multiplier.
    width64 = shape_of(weights, "stylegan_decoder.style_convs.6.modulated_conv.weight", source)[1]
    unet_top = shape_of(weights, "conv_body_up.0.conv2.weight", source)[0]
    config = GFPGANConfig(
        out_size=2**log_size,
        num_style_feat=num_style_feat,
        channel_multiplier=width64 / (256 * narrow),
        narrow=narrow,
        different_w=shape_of(weights, "final_linear.weight", source)[0] > num_style_feat,
        sft_half=shape_of(weights, "condition_scale.0.2.weight", source)[0] == unet_top,
    )
    return GFPGANv1Clean(config)


def prepare_restorer_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Drop the unused tensors and the StyleGAN2 unit axes; conv layouts are left to the loader."""
    prepared = {}
    for key, value in weights.items():
        if UNUSED.match(key):
            continue
        if _BATCHED_WEIGHT.fullmatch(key):
            value = value[0]
        elif _BATCHED_BIAS.fullmatch(key):
            value = value.reshape(-1)
        prepared[key] = value
    return prepared
