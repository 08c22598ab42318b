"""The dtype the VAE runs in: SDXL's VAE overflows fp16.

SDXL's VAE (base and refiner share it) has activations past fp16's 65504 in its decoder, which give
NaNs or black images in fp16. As diffusers' SDXL pipelines do, it runs in fp32 where the weights
would run in fp16, unless its config says `force_upcast: false`: the config.json of the fp16-fix VAE
(madebyollin/sdxl-vae-fp16-fix, fine-tuned to keep its activations small) does, so a diffusers folder
or a standalone VAE with that config keeps fp16. A single file carries no config and is upcast. SD 1.x
and 2.x VAEs stay in fp16 whatever their config says (diffusers writes `force_upcast: true` into every
new config by default, and its SD pipelines ignore it).

fp16 weights stay as they are: MLX promotes an fp16 weight met by an fp32 input to fp32, exactly, so
the upcast costs the activations' memory (twice fp16's), not a second copy of the weights.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_sd.models.vae import VAEConfig

# The model families (convert.families names) whose VAE overflows fp16.
UPCAST_FAMILIES = frozenset({"sdxl", "sdxl_refiner"})


def vae_dtype(activation: mx.Dtype, family: str, config: VAEConfig) -> mx.Dtype:
    """The dtype to feed the VAE of a `family` model whose networks compute in `activation`."""
    if activation == mx.float16 and family in UPCAST_FAMILIES and config.force_upcast:
        return mx.float32
    return activation
