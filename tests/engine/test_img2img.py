"""Image to image and inpainting on the tiny SD-1 model: the behaviour the API documents, each
checked against the algorithm it states (parity with diffusers is in test_img2img_parity.py)."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image, ImageFilter

from mlx_sd.engine import img2img, init_images
from mlx_sd.engine.errors import InvalidRequest
from mlx_sd.engine.events import EventType, GenerationResult, ProgressEvent
from mlx_sd.engine.images import encode_png
from mlx_sd.engine.init_images import ResizeMode, Source
from mlx_sd.engine.model_store import ModelStore
from mlx_sd.engine.pipeline import Pipeline, _decode, _encode_image
from mlx_sd.engine.request import GenerationRequest
from mlx_sd.sampling.registry import SAMPLER_NAMES
from tests.conftest import TINY_MODEL

SIZE = 64


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(TINY_MODEL, root / "stable-diffusion")
    return Pipeline(ModelStore(root))


def picture(width: int = SIZE, height: int = SIZE) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 4 % 256, y * 4 % 256, (x * y) % 256], -1).astype(np.uint8)


def block_mask(width: int = SIZE, height: int = SIZE) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[16:40, 24:48] = 255
    return mask


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def request(**fields) -> GenerationRequest:
    base = dict(prompt="a lighthouse", negative_prompt="blurry", width=SIZE, height=SIZE, steps=4, cfg_scale=7.5,
                seed=7, sampler="Euler a")
    return GenerationRequest(**{**base, **fields}).validated()


def run(pipeline: Pipeline, req: GenerationRequest) -> tuple[list[ProgressEvent], GenerationResult]:
    items = list(pipeline(req))
    return items[:-1], items[-1]


def pngs(result: GenerationResult) -> list[bytes]:
    return [encode_png(image.pixels, image.parameters.text()) for image in result.images]


def test_without_an_init_image_the_image_settings_change_nothing(pipeline: Pipeline) -> None:
    plain = pngs(run(pipeline, request())[1])
    settings = dict(mask_blur=8, resize_mode=2, inpaint_full_res=True, inpaint_full_res_padding=32,
                    inpainting_fill=2, inpaint_no_overlay=True)
    assert pngs(run(pipeline, request(**settings))[1]) == plain


def test_strength_one_is_text_to_image_from_the_same_noise(pipeline: Pipeline) -> None:
    txt2img = run(pipeline, request())[1].images[0].pixels
    events, result = run(pipeline, request(init_image=png(picture()), denoising_strength=1.0))
    assert np.array_equal(result.images[0].pixels, txt2img)
    assert [e.type for e in events[:2]] == [EventType.TEXT_ENCODED, EventType.IMAGE_ENCODED]


def test_strength_zero_returns_the_decoded_input(pipeline: Pipeline) -> None:
    events, result = run(pipeline, request(init_image=png(picture()), denoising_strength=0.0))
    assert not [e for e in events if e.type == EventType.SAMPLING]
    model = pipeline._store.get("")
    assert np.array_equal(result.images[0].pixels, _decode(model, _encode_image(model, picture()[None]))[0])


def test_strength_runs_the_last_steps_of_the_schedule(pipeline: Pipeline) -> None:
    events, _ = run(pipeline, request(init_image=png(picture()), denoising_strength=0.6, steps=10))
    assert [e.step for e in events if e.type == EventType.SAMPLING] == list(range(1, 7))
    assert img2img.start_index(10, 0.6) == 4 and img2img.start_index(10, 0.05) == 10


def test_the_overlay_pastes_the_original_through_the_doubled_blurred_mask(pipeline: Pipeline) -> None:
    fields = dict(init_image=png(picture()), mask=png(block_mask()), mask_blur=4, denoising_strength=0.75)
    generated = run(pipeline, request(**fields, inpaint_no_overlay=True))[1].images[0].pixels
    result = run(pipeline, request(**fields))[1].images[0]
    blurred = np.asarray(Image.fromarray(block_mask()).filter(ImageFilter.GaussianBlur(4)), np.float32)
    weight = np.clip(blurred * 2 / 255, 0, 1)[..., None]
    expected = np.round(picture() * (1 - weight) + generated * weight).astype(np.uint8)
    assert np.array_equal(result.pixels, expected)
    assert np.array_equal(result.pixels[blurred == 0], picture()[blurred == 0])
    assert not np.array_equal(result.pixels, picture())
    text = result.parameters.text()
    for field in ("Denoising strength: 0.75", "Mask blur: 4", "Masked content: original", "Inpaint area: Whole picture",
                  "Resize mode: Just resize"):
        assert field in text


def test_only_masked_samples_the_box_and_pastes_it_back_at_the_original_size(pipeline: Pipeline) -> None:
    image, mask = picture(128, 96), np.zeros((96, 128), np.uint8)
    mask[40:56, 60:76] = 255
    req = request(init_image=png(image), mask=png(mask), inpaint_full_res=True, inpaint_full_res_padding=8,
                  denoising_strength=0.75)
    result = run(pipeline, req)[1].images[0]
    assert result.pixels.shape == (96, 128, 3)
    box = img2img._crop_box(mask, 8, SIZE, SIZE)
    assert box == (52, 32, 84, 64)  # the mask's box plus 8 pixels: square, as the request
    outside = np.ones((96, 128), bool)
    outside[32:64, 52:84] = False
    assert np.array_equal(result.pixels[outside], image[outside])
    assert not np.array_equal(result.pixels[~outside], image[~outside])
    assert "Inpaint area: Only masked, Masked area padding: 8" in result.parameters.text()


def test_an_only_masked_box_grows_to_the_requests_aspect_within_the_image() -> None:
    mask = np.zeros((40, 100), np.uint8)
    mask[10:20, 90:100] = 255
    assert img2img._crop_box(mask, 0, 128, 64) == (80, 10, 100, 20)  # 10x10 widened to 20x10, shifted inside
    assert img2img._crop_box(np.zeros((8, 8), np.uint8), 4, 64, 64) is None


@pytest.mark.parametrize("fill", list(img2img.InpaintingFill))
def test_each_fill_starts_the_masked_region_differently(pipeline: Pipeline, fill: int) -> None:
    fields = dict(init_image=png(picture()), mask=png(block_mask()), denoising_strength=0.5,
                  inpaint_no_overlay=True, steps=2)
    ours = run(pipeline, request(**fields, inpainting_fill=fill))[1].images[0]
    others = [run(pipeline, request(**fields, inpainting_fill=other))[1].images[0].pixels
              for other in img2img.InpaintingFill if other != fill]
    assert all(not np.array_equal(ours.pixels, other) for other in others)


def test_fill_paints_the_masked_region_from_its_surroundings() -> None:
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:, :16] = (255, 0, 0)
    pixels[:, 16:] = (0, 0, 255)
    mask = np.zeros((32, 32), np.float32)
    mask[8:24, 8:24] = 1.0
    filled = img2img._fill(pixels, mask)
    assert np.array_equal(filled[mask == 0], pixels[mask == 0])
    assert filled[16, 9, 0] > filled[16, 9, 2] and filled[16, 22, 2] > filled[16, 22, 0]  # nearer colour wins


def test_image_i_of_a_batch_is_the_image_of_seed_plus_i(pipeline: Pipeline) -> None:
    fields = dict(init_image=png(picture()), mask=png(block_mask()), denoising_strength=0.6, steps=2)
    batch = run(pipeline, request(**fields, batch_size=2, seed=11))[1]
    second = run(pipeline, request(**fields, seed=12))[1]
    assert np.array_equal(batch.images[1].pixels, second.images[0].pixels)  # the networks run image by image
    assert np.abs(batch.images[0].pixels.astype(int) - batch.images[1].pixels).max() > 10


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_inpaints(pipeline: Pipeline, sampler: str) -> None:
    req = request(init_image=png(picture()), mask=png(block_mask()), denoising_strength=0.5, steps=4,
                  sampler=sampler, inpaint_no_overlay=True)
    events, result = run(pipeline, req)
    pixels = result.images[0].pixels
    assert len([e for e in events if e.type == EventType.SAMPLING]) >= 1
    assert not np.array_equal(pixels, run(pipeline, request(sampler=sampler, steps=4))[1].images[0].pixels)


def test_the_resize_mode_fits_the_init_image_to_the_request(pipeline: Pipeline) -> None:
    wide = picture(128, 64)
    results = {mode: run(pipeline, request(init_image=png(wide), resize_mode=mode, denoising_strength=0.0))[1]
               for mode in ResizeMode}
    assert all(r.images[0].pixels.shape == (SIZE, SIZE, 3) for r in results.values())
    assert len({r.images[0].pixels.tobytes() for r in results.values()}) == 3


def test_image_settings_are_validated() -> None:
    image = png(picture())
    outset = init_images.MAX_MASK_OUTSET
    for field, value in (("mask_blur", -1), ("mask_blur", init_images.MAX_MASK_BLUR + 1), ("resize_mode", 3),
                         ("mask_outset", outset + 1), ("mask_outset", -outset - 1),
                         ("inpainting_fill", 4), ("inpaint_full_res_padding", init_images.MAX_PADDING + 1)):
        with pytest.raises(InvalidRequest) as caught:
            request(init_image=image, **{field: value})
        assert caught.value.field == field
    with pytest.raises(InvalidRequest) as caught:
        request(init_image=image, enable_hr=True, width=256, height=256)
    assert caught.value.field == "enable_hr"


def square_extreme(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Dilation (pixels > 0) or erosion by a (2n+1)x(2n+1) square, pixel by pixel, clipped to the image."""
    extreme, n = (np.max if pixels > 0 else np.min), abs(pixels)
    height, width = mask.shape
    return np.array([[extreme(mask[max(0, y - n):y + n + 1, max(0, x - n):x + n + 1]) for x in range(width)]
                     for y in range(height)], mask.dtype)


@pytest.mark.parametrize("pixels", [1, 2, 3, 5, 8, 13, 40, -1, -3, -6, -13, -40])
def test_the_outset_grows_or_shrinks_the_mask_by_a_square(pixels: int) -> None:
    grey = np.random.default_rng(pixels + 50).integers(0, 256, (23, 31), dtype=np.uint8)
    sparse = np.where(np.random.default_rng(pixels + 150).random((29, 17)) < 0.97, 0, 255).astype(np.uint8)
    for mask in (grey, sparse, 255 - sparse):
        assert np.array_equal(img2img.outset(mask, pixels), square_extreme(mask, pixels))
    assert np.array_equal(img2img.outset(grey, 0), grey)


def test_the_outset_applies_before_the_blur() -> None:
    mask = block_mask()
    for pixels, blur in ((3, 0), (-5, 0), (4, 2)):
        prepared = img2img.prepare(Source(picture(), mask), SIZE, SIZE, ResizeMode.JUST_RESIZE, blur, False, 0, 0,
                                   overlay=True, mask_outset=pixels)
        expected = Image.fromarray(square_extreme(mask, pixels)).filter(ImageFilter.GaussianBlur(blur))
        assert np.array_equal(prepared.mask, np.asarray(expected, np.float32) / 255.0)


def test_a_decoded_source_is_taken_as_it_is(pipeline: Pipeline) -> None:
    from_bytes = run(pipeline, request(init_image=png(picture()), denoising_strength=0.5, steps=2))[1]
    from_source = run(pipeline, request(source=Source(picture()), denoising_strength=0.5, steps=2))[1]
    assert pngs(from_bytes) == pngs(from_source)


def test_the_upscaled_bytes_bound_counts_an_only_masked_results_size() -> None:
    image, mask = picture(2048, 2048), block_mask(2048, 2048)
    fields = dict(init_image=png(image), mask=png(mask), upscale=True, upscale_factor=4, batch_size=8, batch_count=2)
    request(**fields)  # 16 images of 64x64 upscaled 4 times: small
    with pytest.raises(InvalidRequest) as caught:
        request(**fields, inpaint_full_res=True)  # 16 images of 2048x2048 upscaled 4 times: 3 GiB
    assert caught.value.field == "upscale_factor"
