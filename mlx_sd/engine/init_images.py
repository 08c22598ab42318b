"""Client images for image to image and inpainting: decoded safely, then fitted to the request's size.

Images come from strangers, so decoding is bounded before any pixel is decompressed: only PNG, JPEG
and WebP are opened, and the sides declared in the header are checked against MAX_SIDE before the
data is read. Every failure is an InvalidRequest naming the field.

Conversions (documented in docs/api.md): EXIF orientation is applied; an animation's first frame is
used; CMYK, palette, greyscale and 16-bit images become 8-bit RGB; transparency in an init image is
flattened onto white (A1111's default background). A mask is white where the image is repainted and
black where it is kept; a mask with transparency uses its alpha instead (opaque: repainted).
"""

from __future__ import annotations

import enum
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from mlx_sd.engine.errors import InvalidRequest

FORMATS = ("PNG", "JPEG", "WEBP")
MAX_SIDE = 4096  # either side of an init image or mask, in pixels
MAX_BYTES = 24 * 1024 * 1024  # an encoded image (two fit in one 64 MiB message)
MAX_MASK_BLUR = 64  # pixels
MAX_MASK_OUTSET = 100  # pixels either way, Draw Things' range
MAX_PADDING = 256  # pixels around the mask for "only masked"
_WHITE = 255


class ResizeMode(enum.IntEnum):
    """A1111's resize modes; the values are the API's ResizeMode."""

    JUST_RESIZE = 0  # stretch to the size
    CROP_AND_RESIZE = 1  # cover the size keeping the aspect ratio, cropping the overflow (centred)
    RESIZE_AND_FILL = 2  # fit inside keeping the aspect ratio, the bands filled by stretching the edges


class InpaintingFill(enum.IntEnum):
    """What the masked region starts from; the values are the API's InpaintingFill (A1111 numbers
    them fill 0, original 1, latent noise 2, latent nothing 3)."""

    ORIGINAL = 0
    FILL = 1  # the surrounding colours, blurred in
    LATENT_NOISE = 2  # the seed's noise instead of the image's latents
    LATENT_NOTHING = 3  # zero latents


@dataclass(frozen=True)
class Source:
    """A request's decoded init image and optional mask, at the client's size."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray | None = None  # (H, W) uint8: 255 repaint .. 0 keep

    def checked(self) -> Source:
        """This source once its shapes are consistent and within MAX_SIDE (InvalidRequest otherwise)."""
        height, width, channels = self.image.shape
        if channels != 3 or self.image.dtype != np.uint8:
            raise InvalidRequest("init_image", "must be (H, W, 3) 8-bit RGB")
        _check_sides("init_image", width, height)
        if self.mask is not None and self.mask.shape != (height, width):
            mask_height, mask_width = self.mask.shape[:2]
            raise InvalidRequest("mask", f"is {mask_width}x{mask_height}; it must have the init image's size "
                                         f"{width}x{height}")
        return self


def decode_source(image: bytes, mask: bytes) -> Source | None:
    """The Source of a request's `init_image` and `mask` bytes; None without an init image."""
    if not image:
        if mask:
            raise InvalidRequest("mask", "a mask needs an init_image")
        return None
    pixels = _flatten(decode("init_image", image))
    return Source(pixels, _mask_levels(decode("mask", mask)) if mask else None).checked()


def decode(field: str, data: bytes) -> Image.Image:
    """A PNG, JPEG or WebP image of at most MAX_SIDE pixels a side, loaded and upright, in one of
    the modes RGB, RGBA, L or LA."""
    if len(data) > MAX_BYTES:
        raise InvalidRequest(field, f"is {len(data)} bytes; at most {MAX_BYTES} are accepted")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
            _check_sides(field, *image.size)
            image.seek(0)  # an animation's first frame
            image.load()
            image = ImageOps.exif_transpose(image)
    except InvalidRequest:
        raise
    except Image.UnidentifiedImageError as exc:
        raise InvalidRequest(field, f"is not a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} image") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequest(field, f"declares too many pixels; at most {MAX_SIDE} a side are accepted") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise InvalidRequest(field, f"could not be decoded ({exc})") from exc
    return _eight_bit(image)


def _check_sides(field: str, width: int, height: int) -> None:
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise InvalidRequest(field, f"is {width}x{height}; each side must be between 1 and {MAX_SIDE} pixels")


def _eight_bit(image: Image.Image) -> Image.Image:
    """RGB, RGBA, L or LA: 16-bit and 32-bit greyscale scaled to 8 bits, CMYK and YCbCr as RGB,
    palettes expanded (with their transparency)."""
    if image.mode in ("RGB", "RGBA", "L", "LA"):
        return image
    if image.mode.startswith("I"):  # 16-bit PNG greyscale ("I;16", read as "I"): scale, do not clip
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        return Image.fromarray(np.round(np.clip(values, 0, top) * (255.0 / top)).astype(np.uint8), "L")
    if image.mode in ("P", "PA"):
        return image.convert("RGBA")
    if image.mode in ("1",):
        return image.convert("L")
    return image.convert("RGB")


def _flatten(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB; transparency is composited onto white."""
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (_WHITE, _WHITE, _WHITE, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


def _mask_levels(image: Image.Image) -> np.ndarray:
    """(H, W) uint8, 255 where repainted: the alpha channel if the mask has transparency, else its grey level."""
    if image.mode in ("RGBA", "LA") and image.getchannel("A").getextrema() != (255, 255):
        return np.asarray(image.getchannel("A"))
    return np.asarray(image.convert("L"))


def resize(pixels: np.ndarray, width: int, height: int, mode: ResizeMode) -> np.ndarray:
    """`pixels` ((H, W, 3) or (H, W) uint8) at `width`x`height`, by A1111's resize `mode` (Lanczos)."""
    image = Image.fromarray(pixels)
    if mode is ResizeMode.JUST_RESIZE:
        return np.asarray(image.resize((width, height), Image.LANCZOS))
    src_width, src_height = image.size
    covers = (width / height > src_width / src_height) == (mode is ResizeMode.CROP_AND_RESIZE)
    if covers:  # scale to the target width
        scaled = (width, max(1, src_height * width // src_width))
    else:  # scale to the target height
        scaled = (max(1, src_width * height // src_height), height)
    resized = image.resize(scaled, Image.LANCZOS)
    canvas = Image.new(image.mode, (width, height))
    left, top = (width - scaled[0]) // 2, (height - scaled[1]) // 2
    canvas.paste(resized, (left, top))
    if mode is ResizeMode.RESIZE_AND_FILL:
        _fill_bands(canvas, resized, left, top)
    return np.asarray(canvas)


def _fill_bands(canvas: Image.Image, resized: Image.Image, left: int, top: int) -> None:
    """Fills the bands around a centred `resized` image by stretching its outermost rows or columns."""
    width, height = canvas.size
    inner_w, inner_h = resized.size
    if top > 0:
        canvas.paste(resized.crop((0, 0, inner_w, 1)).resize((width, top)), (0, 0))
        bottom = height - top - inner_h
        if bottom > 0:
            canvas.paste(resized.crop((0, inner_h - 1, inner_w, inner_h)).resize((width, bottom)), (0, top + inner_h))
    if left > 0:
        canvas.paste(resized.crop((0, 0, 1, inner_h)).resize((left, height)), (0, 0))
        right = width - left - inner_w
        if right > 0:
            canvas.paste(resized.crop((inner_w - 1, 0, inner_w, inner_h)).resize((right, height)), (left + inner_w, 0))
