"""Text to image: prompt -> text encoder -> sampler loop over the UNet -> VAE -> images.

`Pipeline(store)(request, is_cancelled)` yields a ProgressEvent as each stage and each sampling step
finishes, then one GenerationResult: pixels, seeds and parameters, which the callers encode. It stops
between steps once `is_cancelled()` is true.

Seeds follow A1111: image i of a request uses seed + i, and every image draws its noise from its own
torch-compatible CPU generator, so an image can be reproduced alone from the seed in its parameters.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_sd.engine import conditioning, hires, img2img, refiner
from mlx_sd.engine.conditioning import Conditioning
from mlx_sd.engine.extra_networks import ExtraNetworks
from mlx_sd.engine.events import EventType, GeneratedImage, GenerationResult, ProgressEvent
from mlx_sd.engine.images import Parameters
from mlx_sd.engine.memory_budget import VAE_LIVE_MAPS, VAE_LIVE_MAPS_CPU, MemoryBudget, ModelShape
from mlx_sd.engine.model_store import LoadedModel, ModelStore
from mlx_sd.engine.random import BatchGenerator
from mlx_sd.engine.request import GenerationRequest
from mlx_sd.engine.restoration import Restoration
from mlx_sd.engine.vae_precision import vae_dtype
from mlx_sd.sampling import catalog, schedules
from mlx_sd.sampling.catalog import SamplerSpec
from mlx_sd.engine.prediction import V
from mlx_sd.sampling.denoisers import Denoiser, EpsModel, eps_denoiser, guided, v_denoiser
from mlx_sd.sampling.samplers import Noise, noise_source

Event = ProgressEvent | GenerationResult
LATENT_SCALE = 8  # pixels per latent cell in each direction


@dataclass(frozen=True)
class _Pass:
    """One sampling pass: its event type and label, for progress."""

    event: EventType
    label: str


_FIRST = _Pass(EventType.SAMPLING, "sampling")
_SECOND = _Pass(EventType.SECOND_PASS_SAMPLING, "hires sampling")


class Pipeline:
    def __init__(self, store: ModelStore, memory_budget: MemoryBudget | None = None) -> None:
        self._store = store
        self._memory_budget = memory_budget
        self._restoration = Restoration(store.models_dir, backend=store.backend)
        self._train_sigmas = schedules.train_sigmas()
        self._extra_networks = ExtraNetworks(store.models_dir)

    def __call__(self, request: GenerationRequest, is_cancelled: Callable[[], bool] = lambda: False,
                 images: Sequence[int] | None = None) -> Iterator[Event]:
        """Generate the images of a validated request; `images` picks some of them by their index in the
        request, in batches of up to `batch_size` (a rank's share under mlx_sd.engine.distributed)."""
        # Before any sampling: missing face-restoration or upscaler weights fail the request at once.
        restorer = self._restoration.face_restorer() if request.restore_faces else None
        upscaler = self._restoration.required_upscaler() if request.upscale else None
        upscale_by = (request.upscale_factor or upscaler.scale) if upscaler is not None else None
        model = self._store.get(request.model)
        request = request.with_native_size(model.native_size)
        refining = refiner.load(self._refiners, model, request) if request.refiner_model else None
        if self._memory_budget is not None:  # before this request allocates anything
            unet, vae = model.models.unet, model.models.vae
            on_cpu = mx.default_device() == mx.cpu
            self._memory_budget.check(request.width, request.height, request.batch_size,
                                      model.activation_dtype.size, mx.get_active_memory(),
                                      ModelShape.of(unet.config, vae.config, _vae_dtype(model).size),
                                      VAE_LIVE_MAPS_CPU if on_cpu else VAE_LIVE_MAPS)
        seed = request.seed if request.seed >= 0 else secrets.randbelow(2**32)
        extras = self._extra_networks.prepare(model, request.prompt, request.negative_prompt, request.loras)
        cond, uncond = conditioning.encode_prompts(model, request, extras)
        if model.release_text_encoder is not None:
            model.release_text_encoder()
            model.loras.forget(conditioning.TEXT_ENCODERS)
        # the refiner's own encoder, given the base's prompts as read (embeddings; its LoRAs are the base's only)
        refined = refiner.encode_prompts(refining, request, extras) if refining is not None else None
        if refining is not None and refining.release_text_encoder is not None:
            refining.release_text_encoder()
        yield ProgressEvent(EventType.TEXT_ENCODED, "text encoded")

        first_pass = _first_pass(request, model.native_size)
        strength = request.denoising_strength or hires.DEFAULT_STRENGTH
        prepared = _prepared(request)  # image to image: its init image and mask at the sampling size
        if prepared is not None:
            strength = request.denoising_strength
        indices = range(request.batch_count * request.batch_size) if images is None else list(images)
        generated = []
        for start in range(0, len(indices), request.batch_size):
            seeds = [seed + i for i in indices[start:start + request.batch_size]]
            # SDXL's refiner: the denoiser that takes over below its cutoff
            finish = self._denoiser(refining, request, *refined) if refining is not None else None
            pixels = yield from self._batch(model, request, seeds, cond, uncond, first_pass, strength, prepared,
                                            finish, is_cancelled)
            if pixels is None:
                return
            if restorer is not None:
                pixels = np.stack([restorer(image) for image in pixels])
                yield ProgressEvent(EventType.FACE_RESTORED, "faces restored")
            if prepared is not None and prepared.overlay is not None:  # after face restoration, as A1111
                pixels = np.stack([prepared.overlay.apply(image) for image in pixels])
            if upscaler is not None:
                pixels = np.stack([upscaler.upscale(image, scale=upscale_by) for image in pixels])
                yield ProgressEvent(EventType.IMAGE_UPSCALED, f"upscaled x{upscale_by}")
            for item_seed, image in zip(seeds, pixels):
                parameters = Parameters(
                    prompt=request.prompt, negative_prompt=request.negative_prompt, steps=request.steps,
                    sampler=request.sampler, cfg_scale=request.cfg_scale, seed=item_seed,
                    width=request.width, height=request.height, model_name=model.name, model_hash=model.hash,
                    first_pass_size=first_pass, denoising_strength=strength if first_pass else None,
                    upscaler=self._restoration.upscaler_name() if first_pass else None,
                    face_restoration="GFPGAN" if restorer is not None else None, clip_skip=request.clip_skip,
                    upscaled_by=upscale_by, lora_hashes=extras.lora_hashes, lora_tags=extras.added_tags,
                    ti_hashes=extras.ti_hashes,
                    img2img=img2img.parameters(request) if prepared is not None else (),
                    refiner=f"{refining.name} [{refining.hash}]" if refining is not None else None,
                    refiner_switch_at=request.refiner_start if refining is not None else None,
                )
                generated.append(GeneratedImage(image, item_seed, parameters))
        yield GenerationResult(generated)

    @functools.cached_property
    def _refiners(self) -> ModelStore:
        """SDXL's refiners: a store of their own, so that a refiner is held beside its base model."""
        return self._store.sibling()

    def _denoiser(self, model: LoadedModel, request: GenerationRequest, cond: Conditioning,
                  uncond: Conditioning, unet: EpsModel | None = None) -> Denoiser:
        """The request's sampler's denoiser over `model`'s UNet (or `unet`, which wraps it), guided by the
        conditioning (one image's: the UNet runs image by image, see `guided`)."""
        spec = catalog.sampler_spec(request.sampler, request.stochastic_sampling_gamma)
        prediction_denoiser = v_denoiser if model.prediction == V else eps_denoiser
        return spec.denoiser(
            prediction_denoiser(guided(unet or _unet_in_its_dtype(model), cond, uncond, request.cfg_scale),
                                self._train_sigmas),
            self._train_sigmas,
        )

    def _batch(self, model: LoadedModel, request: GenerationRequest, seeds: list[int], cond: Conditioning,
               uncond: Conditioning, first_pass: tuple[int, int] | None, strength: float,
               prepared: img2img.Prepared | None, finish: Denoiser | None,
               is_cancelled: Callable[[], bool]) -> Iterator[Event]:
        """Sample and decode one batch; returns its (B, H, W, 3) uint8 pixels, or None if cancelled.
        `finish`: the refiner's denoiser, which takes over below its cutoff."""
        spec = catalog.sampler_spec(request.sampler, request.stochastic_sampling_gamma)
        width, height = first_pass or (request.width, request.height)
        unet = _unet_in_its_dtype(model)
        inpainting_unet = model.models.unet.config.in_channels == img2img.INPAINTING_CHANNELS
        if inpainting_unet:
            mask, masked_image = img2img.inpainting_conditioning(prepared, width, height, LATENT_SCALE)
            masked_latents = _encode(model, masked_image)
            unet = img2img.conditioned(unet, mask, masked_latents)
        denoise = self._denoiser(model, request, cond, uncond, unet)
        if finish is not None:
            denoise = refiner.switched(denoise, finish, request.refiner_start, self._train_sigmas)
        noise = noise_source(BatchGenerator(seeds, request.seed_mode))
        sigmas = spec.sigmas(request.steps, self._train_sigmas)
        first = noise((len(seeds), height // LATENT_SCALE, width // LATENT_SCALE, 4))
        x = spec.initial_latents(first, sigmas)
        known = None  # inpainting with a 4-channel UNet: the init latents and the latent mask
        if prepared is not None:
            encoded = mx.repeat(_encode_image(model, prepared.pixels[None]), len(seeds), axis=0)
            yield ProgressEvent(EventType.IMAGE_ENCODED, "image encoded")
            sigmas = sigmas[img2img.start_index(request.steps, strength):]
            latent_mask = prepared.latent_mask(LATENT_SCALE)
            if strength < 1.0:
                x = img2img.start_latents(encoded, first, float(sigmas[0]), request.inpainting_fill, latent_mask)
            if latent_mask is not None and not inpainting_unet:
                known = (encoded, latent_mask)
                denoise = img2img.blended(denoise, encoded, first, latent_mask, float(sigmas[0]))
        latents = encoded if len(sigmas) == 1 else (  # strength 0: the encoded image as it is
            yield from _sample(spec, denoise, x, sigmas, noise, _FIRST, request.preview_every, is_cancelled))
        if latents is None:
            return None
        if known is not None:
            latents = img2img.with_known(latents, *known)
        pixels = _decode(model, latents)
        yield ProgressEvent(EventType.IMAGE_DECODED, "image decoded")
        if first_pass is None:
            return pixels

        pixels = self._upscale(pixels, request.width, request.height)
        yield ProgressEvent(EventType.IMAGE_UPSCALED, f"upscaled to {request.width}x{request.height}")
        encoded = _encode_image(model, pixels)
        yield ProgressEvent(EventType.SECOND_PASS_IMAGE_ENCODED, "upscaled image encoded")
        # The second pass re-seeds each image's generator, as A1111 does for its hires noise.
        noise = noise_source(BatchGenerator(seeds, request.seed_mode))
        sigmas = spec.sigmas(request.steps, self._train_sigmas)[hires.img2img_start(request.steps, strength):]
        x = encoded + noise(encoded.shape) * float(sigmas[0])
        latents = yield from _sample(spec, denoise, x, sigmas, noise, _SECOND, request.preview_every, is_cancelled)
        if latents is None:
            return None
        pixels = _decode(model, latents)
        yield ProgressEvent(EventType.SECOND_PASS_IMAGE_DECODED, "hires image decoded")
        return pixels


    def _upscale(self, pixels: np.ndarray, width: int, height: int) -> np.ndarray:
        """The hires fix's resize: Real-ESRGAN when installed (then Lanczos to the exact size)."""
        upscaler = self._restoration.upscaler()
        if upscaler is None:
            return hires.resize_lanczos(pixels, width, height)
        return np.stack([upscaler.upscale(image, size=(width, height)) for image in pixels])


def _sample(spec: SamplerSpec, denoise: Denoiser, x: mx.array, sigmas: np.ndarray, noise: Noise, stage: _Pass,
            preview_every: int, is_cancelled: Callable[[], bool]) -> Iterator[Event]:
    """Run a sampler with one progress event per step (with the first image's latents every
    `preview_every` steps); returns the latents to decode, or None."""
    total = len(sigmas) - 1
    for step in spec.sample(denoise, x, sigmas, noise):
        x, done = step.x, step.index + 1
        preview = np.array(x[0]) if preview_every and done % preview_every == 0 else None
        yield ProgressEvent(stage.event, f"{stage.label} step {done}/{total}", done, total, preview)
        if is_cancelled():
            return None
    return spec.output_latents(x, sigmas)


def _first_pass(request: GenerationRequest, native: int) -> tuple[int, int] | None:
    """The hires fix's first-pass size, or None when one pass runs at the requested size."""
    if not request.enable_hr:
        return None
    if request.hires_first_width:
        explicit = (request.hires_first_width, request.hires_first_height)
        return None if explicit == (request.width, request.height) else explicit
    return hires.first_pass_size(request.width, request.height, native)


def _unet_in_its_dtype(model: LoadedModel) -> EpsModel:
    """The UNet, fed in its compute dtype (fp16 weights on Metal: fp16) and answering in fp32, the
    samplers' dtype."""
    unet = model.models.unet
    dtype = model.activation_dtype
    return lambda x, t, condition: unet(x.astype(dtype), t, **{name: value.astype(dtype) for name, value in
                                                                condition.items()}).astype(mx.float32)


def _vae_dtype(model: LoadedModel) -> mx.Dtype:
    return vae_dtype(model.activation_dtype, model.models.family.name, model.models.vae.config)


def _decode(model: LoadedModel, latents: mx.array) -> np.ndarray:
    """(B, H, W, 3) uint8 pixels, decoded image by image as the UNet runs (see `guided`)."""
    vae = model.models.vae
    dtype = _vae_dtype(model)

    def decode(one: mx.array) -> np.ndarray:
        images = vae.decode((one / vae.config.scaling_factor).astype(dtype)).astype(mx.float32)
        return np.array(mx.round(mx.clip(images / 2 + 0.5, 0.0, 1.0) * 255).astype(mx.uint8))

    return np.concatenate([decode(latents[i:i + 1]) for i in range(latents.shape[0])])


def _encode_image(model: LoadedModel, pixels: np.ndarray) -> mx.array:
    """Latents of (B, H, W, 3) uint8 images, encoded image by image as the UNet runs (see `guided`)."""
    return mx.concatenate([_encode(model, mx.array(image[None]).astype(mx.float32) / 127.5 - 1.0)
                           for image in pixels])


def _encode(model: LoadedModel, images: mx.array) -> mx.array:
    """Latents of (B, H, W, 3) images in [-1, 1]: the posterior mean, so the result is deterministic."""
    vae = model.models.vae
    mean, _ = vae.encode(images.astype(_vae_dtype(model)))
    return mean.astype(mx.float32) * vae.config.scaling_factor


def _prepared(request: GenerationRequest) -> img2img.Prepared | None:
    if request.source is None:
        return None
    return img2img.prepare(request.source, request.width, request.height, request.resize_mode, request.mask_blur,
                           request.inpaint_full_res, request.inpaint_full_res_padding, request.inpainting_fill,
                           overlay=not request.inpaint_no_overlay, mask_outset=request.mask_outset)
