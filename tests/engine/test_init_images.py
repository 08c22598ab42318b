"""Client images: every kind of bad or unusual input the API documents, and A1111's resize modes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mlx_sd.engine.errors import InvalidRequest
from mlx_sd.engine.init_images import MAX_SIDE, ResizeMode, Source, decode, decode_source, resize


def encoded(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def rgb(width: int = 16, height: int = 8) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1).astype(np.uint8)


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height (its data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def field_error(call) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("format", ["PNG", "JPEG", "WEBP"])
def test_the_accepted_formats_decode(format: str) -> None:
    pixels = rgb()
    source = decode_source(encoded(Image.fromarray(pixels), format, **({"lossless": True} if format == "WEBP" else {})), b"")
    assert source.image.shape == (8, 16, 3) and source.mask is None
    if format != "JPEG":
        assert np.array_equal(source.image, pixels)


def test_a_decompression_bomb_is_refused_before_decoding() -> None:
    error = field_error(lambda: decode_source(png_declaring(100_000, 100_000), b""))
    assert error.field == "init_image" and "pixels" in str(error)


def test_an_image_past_the_accepted_sides_is_refused() -> None:
    error = field_error(lambda: decode("mask", png_declaring(MAX_SIDE + 1, 8)))
    assert error.field == "mask" and str(MAX_SIDE) in str(error)


@pytest.mark.parametrize("data", [b"", b"garbage", b"\x89PNG\r\n\x1a\n", b"\0" * 100])
def test_garbage_is_refused(data: bytes) -> None:
    assert field_error(lambda: decode("init_image", data or b"x")).field == "init_image"


def test_truncated_bytes_are_refused() -> None:
    data = encoded(Image.fromarray(rgb(64, 64)))
    assert field_error(lambda: decode("init_image", data[: len(data) // 2])).field == "init_image"


@pytest.mark.parametrize("format", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused(format: str) -> None:
    error = field_error(lambda: decode("init_image", encoded(Image.fromarray(rgb()), format)))
    assert "PNG, JPEG or WEBP" in str(error)


def test_a_mask_of_another_size_is_refused() -> None:
    image, mask = encoded(Image.fromarray(rgb(16, 8))), encoded(Image.new("L", (8, 8), 255))
    error = field_error(lambda: decode_source(image, mask))
    assert error.field == "mask" and "16x8" in str(error)


def test_a_mask_without_an_image_is_refused() -> None:
    assert field_error(lambda: decode_source(b"", encoded(Image.new("L", (8, 8))))).field == "mask"


def test_cmyk_becomes_rgb() -> None:
    image = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red
    pixel = decode_source(encoded(image, "JPEG", quality=100), b"").image[1, 1]
    assert np.abs(pixel.astype(int) - [255, 0, 0]).max() <= 2  # JPEG's rounding


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257 * 128, 65535, 1000]], np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    source = decode_source(encoded(image), b"")
    assert source.image[0, :, 0].tolist() == [0, 128, 255, 4]


def test_a_palette_image_with_transparency_is_flattened_onto_white() -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 1
    assert decode_source(encoded(image, transparency=1), b"").image[0].tolist() == [[255, 0, 0], [255, 255, 255]]


def test_an_alpha_only_image_is_white_where_transparent_and_its_colour_where_opaque() -> None:
    pixels = np.zeros((1, 2, 4), np.uint8)
    pixels[0, 1, 3] = 255  # opaque black; the other pixel transparent
    assert decode_source(encoded(Image.fromarray(pixels, "RGBA")), b"").image[0].tolist() == [[255] * 3, [0] * 3]


def test_a_mask_with_transparency_uses_its_alpha_else_its_grey_level() -> None:
    image = encoded(Image.fromarray(rgb(2, 1)))
    painted = np.zeros((1, 2, 4), np.uint8)
    painted[0, 0] = (0, 0, 0, 255)  # an opaque black stroke: repainted
    assert decode_source(image, encoded(Image.fromarray(painted, "RGBA"))).mask.tolist() == [[255, 0]]
    grey = np.array([[[255, 255, 255, 255], [0, 0, 0, 255]]], np.uint8)  # opaque: white repainted, black kept
    assert decode_source(image, encoded(Image.fromarray(grey, "RGBA"))).mask.tolist() == [[255, 0]]


def test_an_animation_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    assert decode_source(buffer.getvalue(), b"").image[0, 0].tolist() == [255, 0, 0]


def test_exif_rotation_is_applied() -> None:
    image = Image.fromarray(rgb(16, 8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    source = decode_source(encoded(image, "JPEG", exif=exif, quality=100), b"")
    assert source.image.shape == (16, 8, 3)


def test_a_source_checks_its_shapes() -> None:
    assert field_error(lambda: Source(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.uint8)).checked()).field == "mask"
    assert field_error(lambda: Source(np.zeros((4, MAX_SIDE + 1, 3), np.uint8)).checked()).field == "init_image"


def test_resize_modes_follow_a1111() -> None:
    wide = np.zeros((10, 20, 3), np.uint8)
    wide[:, :10] = 255  # left half white
    stretched = resize(wide, 10, 10, ResizeMode.JUST_RESIZE)
    assert stretched.shape == (10, 10, 3) and stretched[5, 1].min() == 255 and stretched[5, 8].max() == 0
    cropped = resize(wide, 10, 10, ResizeMode.CROP_AND_RESIZE)  # the centre 10x10: half white, half black
    assert cropped.shape == (10, 10, 3) and cropped[5, 1].min() == 255 and cropped[5, 8].max() == 0
    filled = resize(wide, 20, 20, ResizeMode.RESIZE_AND_FILL)  # fits 20x10 in the middle; bands repeat its edges
    assert filled.shape == (20, 20, 3)
    assert np.array_equal(filled[0], filled[5]) and np.array_equal(filled[19], filled[14])
    assert filled[0, 2].min() == 255 and filled[0, 17].max() == 0


_SEEDS = [encoded(Image.fromarray(rgb(24, 16)), f, **({"lossless": True} if f == "WEBP" else {}))
          for f in ("PNG", "JPEG", "WEBP")] + [png_declaring(100_000, 100_000)]


@settings(max_examples=300, deadline=None)
@given(seed=st.sampled_from(_SEEDS), edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                    max_size=8), cut=st.integers(0, 10_000))
def test_mutated_images_decode_or_are_refused_by_name(seed: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(seed)
    for position, value in edits:
        data[position % len(data)] = value
    try:
        source = decode_source(bytes(data[: max(1, cut)]), b"")
    except InvalidRequest as error:
        assert error.field == "init_image"
    else:
        assert source.image.dtype == np.uint8 and source.image.ndim == 3 and source.image.shape[2] == 3
        assert max(source.image.shape[:2]) <= MAX_SIDE
