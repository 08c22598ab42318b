"""The domain form of an image-generation request, and its validation against documented limits.

The API's fields are proto3 scalars, so "not set" arrives as 0: `validated()` replaces 0 by the
documented default for steps, cfg_scale, batch_size and batch_count. A width or height of 0 is the
model's native size (512, 768 or 1024 by family), filled in by `with_native_size` once the model is
known, when the size checks run again.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from mlx_sd.engine import init_images
from mlx_sd.engine.errors import InvalidRequest
from mlx_sd.engine.init_images import MAX_MASK_BLUR, MAX_MASK_OUTSET, MAX_PADDING, InpaintingFill, ResizeMode, Source
from mlx_sd.engine.lora import LoraWeight
from mlx_sd.engine.lora import validated as validated_loras
from mlx_sd.engine.model_names import name_problem, shown_name
from mlx_sd.engine.random import DEFAULT_SEED_MODE, SEED_MODES
from mlx_sd.sampling.registry import (
    DEFAULT_TCD_GAMMA,
    MAX_STEPS_BY_SAMPLER,
    SAMPLER_NAMES,
    canonical_sampler_name,
)

SIDE_MULTIPLE = 64
MIN_SIDE = 64
MAX_SIDE = 2048
DEFAULT_SIDE = 512
MIN_STEPS = 1
MAX_STEPS = 150
DEFAULT_STEPS = 20
MAX_CFG_SCALE = 30.0
DEFAULT_CFG_SCALE = 7.0
MAX_BATCH_SIZE = 8
MAX_BATCH_COUNT = 100
MAX_PROMPT_CHARS = 10_000
MAX_CLIP_SKIP = 12  # CLIP ViT-L's layers
MAX_UPSCALE_FACTOR = 4
MAX_UPSCALED_BYTES = 2 * 1024**3  # bounds a request's upscaled pixels, all images together
MICRO_CONDITIONING = ("original_width", "original_height", "crop_top", "crop_left", "target_width", "target_height",
                      "negative_original_width", "negative_original_height")
MAX_MICRO_CONDITIONING = 16384  # pixels; SDXL was trained on sizes up to ~4k
DEFAULT_REFINER_START = 0.7  # Draw Things' default
# SDXL's refiner's aesthetic scores of the prompt and of the negative prompt: diffusers' and Draw Things' defaults.
DEFAULT_AESTHETIC_SCORE, DEFAULT_NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5
MAX_AESTHETIC_SCORE = 10.0  # the scale of the aesthetic predictor the refiner was trained with
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. A negative seed asks for a random one (the pipeline picks it)."""

    prompt: str = ""
    negative_prompt: str = ""
    width: int = DEFAULT_SIDE
    height: int = DEFAULT_SIDE
    steps: int = DEFAULT_STEPS
    cfg_scale: float = DEFAULT_CFG_SCALE
    seed: int = -1
    sampler: str = ""
    restore_faces: bool = False
    enable_hr: bool = False
    denoising_strength: float = 0.0
    batch_size: int = 1
    batch_count: int = 1
    clip_skip: int = 1  # A1111's "Clip skip": 1 reads the text encoder's last layer, 2 the penultimate
    # The hires fix's first pass in pixels; 0 and 0: the model's native area at the requested aspect.
    hires_first_width: int = 0
    hires_first_height: int = 0
    preview_every: int = 0  # sampling events carry the latents every this many steps; 0: never
    seed_mode: str = DEFAULT_SEED_MODE  # how a seed becomes noise: one of random.SEED_MODES
    stochastic_sampling_gamma: float = DEFAULT_TCD_GAMMA  # TCD's gamma: 0 deterministic .. 1 fully re-noised
    # A checkpoint file (or diffusers folder) relative to the model directory; "" is the default
    # model, `stable-diffusion/`.
    model: str = ""
    # Upscale the finished images with the installed upscaler, by `upscale_factor` (0: the network's own).
    upscale: bool = False
    upscale_factor: int = 0
    # Image to image and inpainting (mlx_sd/engine/img2img.py, docs/api.md): the init image and mask as
    # encoded files, which `validated()` decodes into `source` (the Draw Things adapter sets `source`).
    # `denoising_strength` is the strength.
    init_image: bytes = field(default=b"", repr=False)
    mask: bytes = field(default=b"", repr=False)
    mask_blur: int = 0  # pixels
    resize_mode: int = 0  # a ResizeMode
    inpaint_full_res: bool = False  # "only masked": sample the mask's box at the full size
    inpaint_full_res_padding: int = 0
    inpainting_fill: int = 0  # an InpaintingFill
    inpaint_no_overlay: bool = False  # keep the generated pixels outside the mask too
    mask_outset: int = 0  # pixels the mask grows (negative: shrinks) by, before the blur
    source: Source | None = field(default=None, compare=False, repr=False)
    # LoRAs merged for this request, besides those its prompt names with <lora:name:weight>
    loras: tuple[LoraWeight, ...] = ()
    # SDXL's size micro-conditioning, what the model is told of the image: its original size, the
    # crop's top-left corner and the target size (0: the image's size; crop 0, 0). The negative
    # prompt's original size may differ. Other families ignore them.
    original_width: int = 0
    original_height: int = 0
    crop_top: int = 0
    crop_left: int = 0
    target_width: int = 0
    target_height: int = 0
    negative_original_width: int = 0
    negative_original_height: int = 0
    # SDXL's refiner: a model file (as `model`) that takes over the sampling after `refiner_start`, a
    # fraction of the denoising schedule (0: DEFAULT_REFINER_START); "": none.
    refiner_model: str = ""
    refiner_start: float = 0.0
    # The refiner's aesthetic-score conditioning of the prompt and of the negative prompt (0: the defaults).
    aesthetic_score: float = 0.0
    negative_aesthetic_score: float = 0.0

    def with_native_size(self, native: int) -> GenerationRequest:
        """A validated request whose width or height of 0 (the model's native size) is now `native`,
        validated again with it."""
        if self.width and self.height:
            return self
        return dataclasses.replace(self, width=self.width or native, height=self.height or native).validated()

    def validated(self) -> GenerationRequest:
        """This request with defaults filled in and the sampler name canonical.

        Raises InvalidRequest naming the first field that is out of its documented range.
        """
        for name in ("prompt", "negative_prompt"):
            if len(getattr(self, name)) > MAX_PROMPT_CHARS:
                raise InvalidRequest(name, f"longer than {MAX_PROMPT_CHARS} characters")
        width = _side("width", self.width)
        height = _side("height", self.height)
        steps = _int_in_range("steps", self.steps or DEFAULT_STEPS, MIN_STEPS, MAX_STEPS)
        cfg_scale = _float_in_range("cfg_scale", self.cfg_scale or DEFAULT_CFG_SCALE, 0.0, MAX_CFG_SCALE)
        strength = _float_in_range("denoising_strength", self.denoising_strength, 0.0, 1.0)
        batch_size = _int_in_range("batch_size", self.batch_size or 1, 1, MAX_BATCH_SIZE)
        batch_count = _int_in_range("batch_count", self.batch_count or 1, 1, MAX_BATCH_COUNT)
        seed = _int_in_range("seed", self.seed, INT64_MIN, INT64_MAX)
        if seed > INT64_MAX - (images := batch_size * batch_count) + 1:  # image i has seed + i
            raise InvalidRequest("seed", f"must be at most {INT64_MAX - images + 1} for {images} images, so that "
                                         f"every image's seed (seed + its index) fits in int64 (got {seed})")
        clip_skip = _int_in_range("clip_skip", self.clip_skip or 1, 1, MAX_CLIP_SKIP)
        native = not (width and height)  # checked again once the model's size is known
        first_width, first_height = (self.hires_first_width, self.hires_first_height) if native else \
            self._hires_first_pass(width, height)
        preview_every = _int_in_range("preview_every", self.preview_every, 0, MAX_STEPS)
        upscale_factor = _int_in_range("upscale_factor", self.upscale_factor, 0, MAX_UPSCALE_FACTOR)
        source = self._source()
        if self.upscale:
            factor = upscale_factor or MAX_UPSCALE_FACTOR  # 0 (the network's own) may be up to 4
            out_width, out_height = width, height
            if source is not None and source.mask is not None and self.inpaint_full_res:  # the init image's size
                out_height, out_width = source.mask.shape
            if not native and (size := images * out_width * out_height * factor**2 * 3) > MAX_UPSCALED_BYTES:
                raise InvalidRequest("upscale_factor", f"{images} upscaled images would hold {size / 2**30:.1f} GiB of "
                                                       f"pixels, more than {MAX_UPSCALED_BYTES / 2**30:.0f} GiB")
        for name in MICRO_CONDITIONING:
            _int_in_range(name, getattr(self, name), 0, MAX_MICRO_CONDITIONING)
        if self.seed_mode not in SEED_MODES:
            supported = ", ".join(SEED_MODES)
            raise InvalidRequest("seed_mode", f"unknown seed mode {self.seed_mode!r}; supported: {supported}")
        gamma = _float_in_range("stochastic_sampling_gamma", self.stochastic_sampling_gamma, 0.0, 1.0)
        if self.model and (problem := name_problem(self.model)) is not None:
            raise InvalidRequest("model", f"{shown_name(self.model)!r} {problem}")
        refiner_start = self._refiner_start()
        aesthetic_score = _float_in_range("aesthetic_score", self.aesthetic_score or DEFAULT_AESTHETIC_SCORE, 0.0,
                                          MAX_AESTHETIC_SCORE)
        negative_aesthetic_score = _float_in_range(
            "negative_aesthetic_score", self.negative_aesthetic_score or DEFAULT_NEGATIVE_AESTHETIC_SCORE, 0.0,
            MAX_AESTHETIC_SCORE)
        sampler = canonical_sampler_name(self.sampler)
        if sampler is None:
            raise InvalidRequest("sampler", f"unknown sampler {self.sampler!r}; supported: {', '.join(SAMPLER_NAMES)}")
        if steps > MAX_STEPS_BY_SAMPLER.get(sampler, MAX_STEPS):
            raise InvalidRequest("steps", f"{sampler} takes at most {MAX_STEPS_BY_SAMPLER[sampler]} steps (got {steps})")
        loras = validated_loras(self.loras)
        return dataclasses.replace(
            self,
            source=source,
            loras=loras,
            width=width,
            height=height,
            steps=steps,
            cfg_scale=cfg_scale,
            seed=seed,
            sampler=sampler,
            denoising_strength=strength,
            batch_size=batch_size,
            batch_count=batch_count,
            clip_skip=clip_skip,
            hires_first_width=first_width,
            hires_first_height=first_height,
            preview_every=preview_every,
            stochastic_sampling_gamma=gamma,
            upscale_factor=upscale_factor,
            refiner_start=refiner_start,
            aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score,
        )

    def _refiner_start(self) -> float:
        """The validated refiner's take-over fraction (0 without a refiner)."""
        if not self.refiner_model:
            return 0.0
        if (problem := name_problem(self.refiner_model)) is not None:
            raise InvalidRequest("refiner_model", f"{shown_name(self.refiner_model)!r} {problem}")
        start = self.refiner_start or DEFAULT_REFINER_START
        if not (math.isfinite(start) and 0.0 < start < 1.0):
            raise InvalidRequest("refiner_start", f"must be a fraction of the steps between 0 and 1 (got {start})")
        return float(start)

    def _source(self) -> Source | None:
        """The decoded init image and mask, once the image settings are in range; None for text to image."""
        source = self.source or init_images.decode_source(self.init_image, self.mask)
        if source is None:
            return None
        source.checked()
        if self.enable_hr:
            raise InvalidRequest("enable_hr", "the hires fix is for text to image; image to image has none "
                                              "(as in A1111)")
        _int_in_range("mask_blur", self.mask_blur, 0, MAX_MASK_BLUR)
        _int_in_range("mask_outset", self.mask_outset, -MAX_MASK_OUTSET, MAX_MASK_OUTSET)
        _int_in_range("inpaint_full_res_padding", self.inpaint_full_res_padding, 0, MAX_PADDING)
        _int_in_range("resize_mode", self.resize_mode, 0, len(ResizeMode) - 1)
        _int_in_range("inpainting_fill", self.inpainting_fill, 0, len(InpaintingFill) - 1)
        return source

    def _hires_first_pass(self, width: int, height: int) -> tuple[int, int]:
        """The validated explicit first-pass size (both sides, each within the final size), or (0, 0)."""
        if not (self.hires_first_width or self.hires_first_height):
            return 0, 0
        sides = []
        for name, value, final in (("hires_first_width", self.hires_first_width, width),
                                   ("hires_first_height", self.hires_first_height, height)):
            if value % SIDE_MULTIPLE or not MIN_SIDE <= value <= final:
                raise InvalidRequest(name, f"must be a multiple of {SIDE_MULTIPLE} between {MIN_SIDE} and the "
                                           f"final size {final} (got {value})")
            sides.append(value)
        return sides[0], sides[1]


def _int_in_range(field: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidRequest(field, f"must be between {low} and {high} (got {value})")
    return value


def _float_in_range(field: str, value: float, low: float, high: float) -> float:
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidRequest(field, f"must be a finite number between {low:g} and {high:g} (got {value})")
    return float(value)


def _side(field: str, value: int) -> int:
    """A valid side, or 0: the model's native size, which `with_native_size` fills in."""
    if value == 0:
        return 0
    if value % SIDE_MULTIPLE or not MIN_SIDE <= value <= MAX_SIDE:
        raise InvalidRequest(
            field, f"must be a multiple of {SIDE_MULTIPLE} between {MIN_SIDE} and {MAX_SIDE} (got {value})"
        )
    return value
