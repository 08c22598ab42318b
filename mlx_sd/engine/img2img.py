"""Image to image and inpainting on latents, for any family: what the pipeline needs besides txt2img.

The steps, in A1111's order (docs/api.md, "Image to image and inpainting"):
1. `prepare`: the init image and mask fitted to the sampling size (resize mode; or, for "only masked",
   the mask's bounding box plus padding, widened to the request's aspect ratio); the mask grown or shrunk
   by the outset, then blurred; the masked region pre-filled for `InpaintingFill.FILL`.
2. The pipeline encodes the image (posterior mean) and `start_latents` noises it to the schedule point
   of the strength: the last int(strength x steps) steps run (`start_index`). Strength 1 starts from
   pure noise, exactly as text to image; strength 0 samples nothing.
3. Sampling. A 4-channel UNet with a mask: before every model call the known region of x is replaced
   by the init latents re-noised to the current sigma (`blended`), and after the last step by the init
   latents (`with_known`). Samplers update x elementwise, so this equals diffusers' blend after each
   step (StableDiffusionInpaintPipeline), for every sampler. A 9-channel (inpainting) UNet gets the
   mask and the masked image's latents as extra input channels (`conditioned`), without blending,
   as diffusers feeds it.
4. `Overlay.apply`: the original pixels pasted back through the blurred mask (A1111's overlay), the
   "only masked" crop first scaled back into its place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
from PIL import Image, ImageFilter

from mlx_sd.engine.init_images import InpaintingFill, ResizeMode, Source, resize
from mlx_sd.sampling.denoisers import Denoiser, EpsModel

if TYPE_CHECKING:
    from mlx_sd.engine.request import GenerationRequest

INPAINTING_CHANNELS = 9  # latents, mask, masked image's latents
_FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))  # A1111's (blur radius, repeats)


_FILL_NAMES = {InpaintingFill.ORIGINAL: "original", InpaintingFill.FILL: "fill",
               InpaintingFill.LATENT_NOISE: "latent noise", InpaintingFill.LATENT_NOTHING: "latent nothing"}
_RESIZE_NAMES = {ResizeMode.JUST_RESIZE: "Just resize", ResizeMode.CROP_AND_RESIZE: "Crop and resize",
                 ResizeMode.RESIZE_AND_FILL: "Resize and fill"}


def parameters(request: GenerationRequest) -> tuple[tuple[str, str], ...]:
    """A1111's parameters text for an image to image request (its names and spellings)."""
    fields = [("Denoising strength", f"{request.denoising_strength:g}"),
              ("Resize mode", _RESIZE_NAMES[ResizeMode(request.resize_mode)])]
    if request.source is not None and request.source.mask is not None:
        fields += [("Mask blur", str(request.mask_blur))]
        if request.mask_outset:
            fields.append(("Mask outset", str(request.mask_outset)))
        fields += [                   ("Masked content", _FILL_NAMES[InpaintingFill(request.inpainting_fill)]),
                   ("Inpaint area", "Only masked" if request.inpaint_full_res else "Whole picture")]
        if request.inpaint_full_res:
            fields.append(("Masked area padding", str(request.inpaint_full_res_padding)))
    return tuple(fields)


def start_index(steps: int, strength: float) -> int:
    """Where in a `steps`-step schedule image to image starts: the last int(strength * steps) steps run
    (none at strength 0)."""
    return steps - min(steps, int(strength * steps))


@dataclass(frozen=True)
class Overlay:
    """How a generated image goes back over the original: `original` (the output's size), the weight
    of the generated pixels, and for "only masked" the box (x1, y1, x2, y2) the generated image fills."""

    original: np.ndarray  # (H, W, 3) uint8
    weight: np.ndarray | None  # (H, W) float32 in [0, 1]; None: the generated pixels replace the box whole
    box: tuple[int, int, int, int] | None

    def apply(self, generated: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8: `generated` in its box (if any), then blended over the original."""
        canvas = generated
        if self.box is not None:
            x1, y1, x2, y2 = self.box
            canvas = self.original.copy()
            canvas[y1:y2, x1:x2] = resize(generated, x2 - x1, y2 - y1, ResizeMode.CROP_AND_RESIZE)
        if self.weight is None:
            return canvas
        weight = self.weight[..., None]
        return np.round(self.original * (1.0 - weight) + canvas * weight).astype(np.uint8)


@dataclass(frozen=True)
class Prepared:
    """The inputs of sampling at the sampling size: the pixels to encode, and for inpainting the
    repaint mask (1 repaint .. 0 keep, blurred) and the overlay."""

    pixels: np.ndarray  # (h, w, 3) uint8
    mask: np.ndarray | None  # (h, w) float32
    overlay: Overlay | None

    def latent_mask(self, latent_scale: int) -> mx.array | None:
        """(1, h/s, w/s, 1) float32, 1 where repainted: the blurred mask resized (bicubic) and
        rounded, as A1111 makes its latent mask."""
        if self.mask is None:
            return None
        height, width = self.mask.shape
        small = Image.fromarray(np.round(self.mask * 255).astype(np.uint8)).resize(
            (width // latent_scale, height // latent_scale), Image.BICUBIC)
        return mx.array(np.round(np.asarray(small, np.float32) / 255.0)[None, :, :, None])


def inpainting_conditioning(prepared: Prepared | None, width: int, height: int,
                            latent_scale: int) -> tuple[mx.array, mx.array]:
    """A 9-channel UNet's extra input before encoding: the (1, h/s, w/s, 1) binary repaint mask (the
    pixel mask rounded, then its nearest cells) and the (1, h, w, 3) image in [-1, 1] with the
    repainted region zeroed. Without a mask (text to image, plain image to image) all is repainted."""
    mask = getattr(prepared, "mask", None)
    binary = np.ones((height, width), np.float32) if mask is None else np.round(mask)
    image = np.zeros((height, width, 3), np.float32)
    if mask is not None:
        image = (prepared.pixels.astype(np.float32) / 127.5 - 1.0) * (1.0 - binary[..., None])
    return mx.array(binary[None, ::latent_scale, ::latent_scale, None]), mx.array(image[None])


def prepare(source: Source, width: int, height: int, resize_mode: int, mask_blur: int, full_res: bool,
            padding: int, fill: int, overlay: bool, mask_outset: int) -> Prepared:
    """`source` fitted to `width`x`height` for sampling, as A1111's img2img prepares it."""
    mode = ResizeMode(resize_mode)
    if source.mask is None:
        return Prepared(resize(source.image, width, height, mode), None, None)
    blurred = _blur(outset(source.mask, mask_outset), mask_blur)
    box = _crop_box(blurred, padding, width, height) if full_res else None
    if box is None:
        pixels = resize(source.image, width, height, mode)
        mask = resize(blurred, width, height, mode)
        # A1111 doubles the blurred mask for the overlay, so the blur's inner half is fully generated.
        weight = np.clip(mask.astype(np.float32) * (2.0 / 255.0), 0.0, 1.0)
        pasted = Overlay(pixels, weight if overlay else None, None)
    else:
        x1, y1, x2, y2 = box
        pixels = resize(source.image[y1:y2, x1:x2], width, height, ResizeMode.RESIZE_AND_FILL)
        mask = resize(blurred[y1:y2, x1:x2], width, height, ResizeMode.RESIZE_AND_FILL)
        pasted = Overlay(source.image, blurred.astype(np.float32) / 255.0 if overlay else None, box)
    mask = mask.astype(np.float32) / 255.0
    if InpaintingFill(fill) is InpaintingFill.FILL:
        pixels = _fill(pixels, mask)
    return Prepared(pixels, mask, pasted)


def outset(mask: np.ndarray, pixels: int) -> np.ndarray:
    """`mask` grown by `pixels` (a grey-level dilation: each pixel the maximum of the (2n+1)x(2n+1)
    square around it), or shrunk by -`pixels` (erosion: the minimum); outside the image does not count."""
    if pixels == 0:
        return mask
    extreme, radius = (np.maximum if pixels > 0 else np.minimum), abs(pixels)
    return _running_extreme(_running_extreme(mask, radius, extreme).T, radius, extreme).T


def _running_extreme(values: np.ndarray, radius: int, extreme: np.ufunc) -> np.ndarray:
    """The `extreme` of each 2*radius+1 rows around each row, the edge rows repeated (so they never win
    over rows inside), in O(log radius) passes: windows of doubling length, then two overlapping."""
    size, count = 2 * radius + 1, values.shape[0]
    runs, length = np.pad(values, ((radius, radius), (0, 0)), mode="edge"), 1  # runs[i]: rows [i, i + length)
    while 2 * length <= size:
        runs, length = extreme(runs[:-length], runs[length:]), 2 * length
    return extreme(runs[:count], runs[size - length:size - length + count])


def _blur(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius == 0:
        return mask
    return np.asarray(Image.fromarray(mask).filter(ImageFilter.GaussianBlur(radius)))


def _crop_box(mask: np.ndarray, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The mask's bounding box plus `padding`, grown to the aspect ratio width:height where the image
    allows, within the image; None for an empty mask (then the whole image is sampled)."""
    rows, cols = np.nonzero(mask.max(axis=1))[0], np.nonzero(mask.max(axis=0))[0]
    if rows.size == 0:
        return None
    image_h, image_w = mask.shape
    x1, y1 = max(0, cols[0] - padding), max(0, rows[0] - padding)
    x2, y2 = min(image_w, cols[-1] + 1 + padding), min(image_h, rows[-1] + 1 + padding)
    box_w, box_h = x2 - x1, y2 - y1
    if box_w / box_h < width / height:
        x1, x2 = _grow(x1, x2, min(image_w, math.ceil(box_h * width / height)), image_w)
    else:
        y1, y2 = _grow(y1, y2, min(image_h, math.ceil(box_w * height / width)), image_h)
    return int(x1), int(y1), int(x2), int(y2)


def _grow(start: int, end: int, size: int, limit: int) -> tuple[int, int]:
    """[start, end) widened to `size` around its centre, shifted to stay within [0, limit)."""
    start = max(0, start - (size - (end - start)) // 2)
    end = start + size
    if end > limit:
        start, end = limit - size, limit
    return start, end


def _fill(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A1111's "fill": the masked region painted with ever less blurred copies of the known pixels."""
    known = Image.fromarray(np.round((1.0 - mask) * 255).astype(np.uint8))
    source = Image.new("RGBa", known.size)
    source.paste(Image.fromarray(pixels).convert("RGBA").convert("RGBa"), mask=known)
    result = Image.new("RGBA", known.size)
    for radius, repeats in _FILL_PASSES:
        layer = source.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(layer)
    return np.asarray(result.convert("RGB"))


def start_latents(encoded: mx.array, first_noise: mx.array, sigma: float, fill: int,
                  latent_mask: mx.array | None) -> mx.array:
    """x at `sigma`: the init latents (the masked region replaced for the latent fills) plus the noise
    at that sigma."""
    if fill == InpaintingFill.LATENT_NOISE and latent_mask is not None:
        encoded = encoded * (1.0 - latent_mask) + first_noise * latent_mask
    elif fill == InpaintingFill.LATENT_NOTHING and latent_mask is not None:
        encoded = encoded * (1.0 - latent_mask)
    return encoded + first_noise * sigma


def blended(denoise: Denoiser, encoded: mx.array, first_noise: mx.array, latent_mask: mx.array,
            start_sigma: float) -> Denoiser:
    """`denoise` seeing the known region as the init latents re-noised to the current sigma, below
    `start_sigma`: the start x already holds them there, or at strength 1 is pure noise (as diffusers
    starts)."""
    keep = 1.0 - latent_mask

    def denoise_blended(x: mx.array, sigma: float) -> mx.array:
        if sigma >= start_sigma:
            return denoise(x, sigma)
        return denoise(x * latent_mask + (encoded + first_noise * sigma) * keep, sigma)

    return denoise_blended


def with_known(latents: mx.array, encoded: mx.array, latent_mask: mx.array) -> mx.array:
    """The sampled latents with the known region set back to the init latents (after the last step,
    as diffusers and A1111 do)."""
    return latents * latent_mask + encoded * (1.0 - latent_mask)


def conditioned(unet: EpsModel, mask: mx.array, masked_latents: mx.array) -> EpsModel:
    """A 9-channel UNet's EpsModel over 4-channel latents: the (B, h, w, 1) mask and (B, h, w, 4)
    masked image's latents appended to its input, repeated for the guidance halves."""
    extra = mx.concatenate([mask, masked_latents], axis=-1)

    def model(x: mx.array, t: mx.array, context: mx.array) -> mx.array:
        repeats = x.shape[0] // extra.shape[0]
        return unet(mx.concatenate([x, mx.concatenate([extra] * repeats) if repeats > 1 else extra], axis=-1),
                    t, context)

    return model
