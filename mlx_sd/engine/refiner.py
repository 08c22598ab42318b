"""SDXL's refiner: a second model that takes the base model's latents over partway through sampling.

A request names a refiner file (`refiner_model`, as `model` names the base) and `refiner_start`, the
fraction of the denoising at which it takes over. The split is diffusers' (`denoising_end` on
StableDiffusionXLPipeline, `denoising_start` on the refiner's img2img pipeline): the base model
denoises while the timestep is at least round((1 - refiner_start) x 1000), the refiner below it.
Here one sampler run spans both, its denoiser switching model at that timestep, so a sampler's
history (DPM++ 2M's) runs on across the switch, as Draw Things and A1111 do it, and the latents never
leave the sampler.

The refiner's conditioning (diffusers' StableDiffusionXLImg2ImgPipeline with the refiner): OpenCLIP
bigG's hidden states `clip_skip` layers before its last (the penultimate by default) and its pooled
projection, the prompts read as for the base model (mlx_sd.engine.conditioning: A1111's emphasis and
embeddings; a request's LoRAs are merged into the base model only), and five `time_ids`: the
original size (height, width) and the crop's top-left, as the base model is given them (the
request's micro-conditioning), and an aesthetic score, 6 for the prompt and 2.5 for the negative
prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from convert.families import SDXL, SDXL_REFINER
from mlx_sd.engine import conditioning
from mlx_sd.engine.conditioning import Conditioning
from mlx_sd.engine.conditioning import _time_ids as size_time_ids
from mlx_sd.engine.errors import InvalidRequest
from mlx_sd.engine.request import GenerationRequest
from mlx_sd.sampling.denoisers import Denoiser
from mlx_sd.sampling.schedules import sigma_to_t

if TYPE_CHECKING:
    from mlx_sd.engine.extra_networks import Prepared
    from mlx_sd.engine.model_store import LoadedModel, ModelStore

TRAIN_TIMESTEPS = 1000


def load(refiners: ModelStore, base: LoadedModel, request: GenerationRequest) -> LoadedModel:
    """The request's refiner, loaded from `refiners` (a store of its own, so that it is held beside the
    base model). InvalidRequest naming the refiner's file unless it is an SDXL refiner following an
    SDXL base (the base is checked before the refiner is read)."""
    if base.models.family is not SDXL:
        raise InvalidRequest("refiner_model", f"{request.refiner_model} refines {SDXL.title} models; "
                                              f"{request.model or 'the default model'} is {base.models.family.title}")
    refiner = refiners.get(request.refiner_model)
    if refiner.models.family is not SDXL_REFINER:
        raise InvalidRequest("refiner_model", f"{request.refiner_model} is an {refiner.models.family.title} model, "
                                              f"not an {SDXL_REFINER.title}")
    return refiner


def encode_prompts(refiner: LoadedModel, request: GenerationRequest, extras: Prepared,
                   ) -> tuple[Conditioning, Conditioning]:
    """The refiner's conditioning of the prompt and of the negative prompt (batch 1 each), the
    prompts as `extras` read them for the base model (emphasis, embeddings; LoRA tags taken out)."""
    cond, uncond = conditioning.sdxl(refiner, request, extras)
    return {**cond, "time_ids": _time_ids(request, False)}, {**uncond, "time_ids": _time_ids(request, True)}


def _time_ids(request: GenerationRequest, negative: bool) -> mx.array:
    """(1, 5): the base's original size and crop (the request's micro-conditioning), then the score."""
    score = request.negative_aesthetic_score if negative else request.aesthetic_score
    return mx.concatenate([size_time_ids(request, negative)[:, :4], mx.array([[score]])], axis=1)


def cutoff_timestep(refiner_start: float) -> int:
    """The first timestep the refiner denoises is below this one (diffusers' discrete cutoff)."""
    return round(TRAIN_TIMESTEPS * (1.0 - refiner_start))


def switched(base: Denoiser, refiner: Denoiser, refiner_start: float, train_sigmas: np.ndarray) -> Denoiser:
    """A denoiser that runs `base` at timesteps from the cutoff up and `refiner` below it."""
    cutoff = cutoff_timestep(refiner_start)

    def denoise(x: mx.array, sigma: float) -> mx.array:
        return (base if sigma_to_t(sigma, train_sigmas) >= cutoff else refiner)(x, sigma)

    return denoise
