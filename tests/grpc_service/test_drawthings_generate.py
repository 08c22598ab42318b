"""GenerateImage over Draw Things' protocol, end to end on the tiny SD-1 model, through the
independent test client: images equal the documented API's for the same settings, with and without
fpzip, chunked and whole; signposts, previews and refusals; requests as third-party clients build them."""

from __future__ import annotations

import hashlib
import io
import shutil
import sqlite3

import grpc
import numpy as np
import pytest
from PIL import Image

from grpc_service.generated import imageservice_pb2 as api
from mlx_sd.engine.upscale import UPSCALER_FILE, load_upscaler
from tests.conftest import FIXTURES
from tests.dt_client import FPZIP, HEADER, RAW, U8, build_configuration, codec_of, collect_images, decode_image, decode_tensor, image_tensor

RESTORATION = FIXTURES / "restoration"
PROMPT, NEGATIVE = "a lighthouse", "fog"
# The documented API's defaults where Draw Things has its own: DPM++ 2M Karras (0), torch-CPU noise (1).
BASE = dict(start_width=1, start_height=1, steps=2, guidance_scale=5.0, seed=9, sampler=0, seed_mode=1)


def dt_request(client, chunked: bool = False, prompt: str = PROMPT, **config):
    return client.pb.GenerateRequest(prompt=prompt, negativePrompt=NEGATIVE, configuration=build_configuration(
        **{**BASE, **config}), chunked=chunked, user="tests", device=2)


def documented_pixels(stub_for, server, **fields) -> list[np.ndarray]:
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=2, cfg_scale=5, seed=9,
                sampler="DPM++ 2M Karras")
    request = api.ImageGenerationRequest(**{**base, **fields})
    last = list(stub_for(server).GenerateImage(request))[-1]
    return [np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in last.images]


def test_images_equal_the_documented_apis_and_arrive_after_their_size(server_factory, stub_for, dt_connect,
                                                                     tiny_models) -> None:
    server = server_factory()
    responses = list(dt_connect(server).generate(dt_request(dt_connect(server), batch_size=2)))
    images, progress = collect_images(responses)
    assert [np.array_equal(decode_image(d), p) for d, p in zip(images, documented_pixels(stub_for, server, batch_size=2))
            ] == [True, True]
    size_message = progress[-1]
    assert size_message.HasField("downloadSize") and size_message.downloadSize == sum(map(len, images))
    signposts = [r.currentSignpost.WhichOneof("signpost") for r in progress[:-1]]
    assert signposts == ["textEncoded", "sampling", "sampling", "imageDecoded"]  # every message has its case set
    assert [r.currentSignpost.sampling.step for r in progress[1:3]] == [1, 2]
    expected = {s.WhichOneof("signpost"): s for s in progress[0].signposts}
    assert set(expected) == {"textEncoded", "sampling", "imageDecoded"} and expected["sampling"].sampling.step == 2
    assert all(r.signposts == progress[0].signposts for r in progress[:-1])
    final = [r for r in responses if r.generatedImages]
    assert [(r.chunkState, r.scaleFactor) for r in final] == [(0, 1), (0, 1)]


def test_compression_is_fpzip_unless_turned_off_and_decodes_the_same(server_factory, dt_connect, tiny_models) -> None:
    decoded = {}
    for compression in (True, False):
        client = dt_connect(server_factory(response_compression=compression))
        (data,), _ = collect_images(client.generate(dt_request(client, start_width=2, start_height=2)))
        assert codec_of(data) == (FPZIP if compression else RAW)
        decoded[compression] = decode_image(data)
    assert np.array_equal(decoded[True], decoded[False])


def test_chunked_responses_come_in_4_mib_pieces_and_join_to_the_whole(server_factory, dt_connect, tiny_models) -> None:
    client = dt_connect(server_factory(response_compression=False))
    size = dict(start_width=14, start_height=14, steps=1)  # 896x896: 4.6 MiB of fp16 RGB
    chunked = list(client.generate(dt_request(client, chunked=True, **size)))
    pieces = [r for r in chunked if r.generatedImages]
    assert [(len(r.generatedImages[0]), r.chunkState) for r in pieces] == [
        (4 * 1024**2, 1), (68 + 896 * 896 * 6 - 4 * 1024**2, 0)]
    (joined,), _ = collect_images(chunked)
    (whole,), _ = collect_images(client.generate(dt_request(client, **size)))
    assert joined == whole


def test_latent_previews_come_every_few_sampling_steps(server_factory, dt_connect, tiny_models) -> None:
    from grpc_service.drawthings.generation import PREVIEW_EVERY

    client = dt_connect(server_factory())
    _, progress = collect_images(client.generate(dt_request(client, steps=PREVIEW_EVERY + 1, start_width=2)))
    with_preview = [r for r in progress if r.HasField("previewImage")]
    assert [r.currentSignpost.sampling.step for r in with_preview] == [PREVIEW_EVERY]
    assert decode_tensor(with_preview[0].previewImage).shape == (1, 8, 16, 4)  # latents: 1/8 of 64x128


def test_the_hires_fix_runs_a_second_pass_from_its_start_size(server_factory, dt_connect, tiny_models) -> None:
    client = dt_connect(server_factory())
    request = dt_request(client, start_width=3, start_height=2, hires_fix=True, hires_fix_start_width=2,
                         hires_fix_start_height=1, hires_fix_strength=0.5, steps=4)
    (data,), progress = collect_images(client.generate(request))
    assert decode_image(data).shape == (128, 192, 3)
    cases = [r.currentSignpost.WhichOneof("signpost") for r in progress if r.HasField("currentSignpost")]
    assert cases[-5:] == ["imageUpscaled", "secondPassImageEncoded", "secondPassSampling", "secondPassSampling",
                          "secondPassImageDecoded"]


@pytest.mark.parametrize(("config", "setting"), [
    (dict(controls=["canny.safetensors"]), "controls"),
    (dict(shift=2.0), "shift"),
])
def test_settings_that_would_change_the_image_are_refused_by_name(server_factory, dt_connect, tiny_models, config,
                                                                   setting) -> None:
    client = dt_connect(server_factory())
    with pytest.raises(grpc.RpcError) as caught:
        list(client.generate(dt_request(client, **config)))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and caught.value.details().startswith(setting)


def test_a_refiner_takes_over_as_in_the_documented_api(server_factory, stub_for, dt_connect, models_dir) -> None:
    shutil.copytree(FIXTURES / "sdxl_tiny" / "diffusers", models_dir / "stable-diffusion")
    shutil.copytree(FIXTURES / "sdxl_refiner_tiny" / "diffusers", models_dir / "refiner")
    server = server_factory()
    client = dt_connect(server)
    images, _ = collect_images(client.generate(dt_request(client, refiner_model="refiner", refiner_start=0.5)))
    refined = documented_pixels(stub_for, server, refiner_model="refiner", refiner_start=0.5)
    assert np.array_equal(decode_image(images[0]), refined[0])
    assert not np.array_equal(refined[0], documented_pixels(stub_for, server)[0])
    scores = dict(refiner_model="refiner", refiner_start=0.5, aesthetic_score=9.0, negative_aesthetic_score=1.0)
    images, _ = collect_images(client.generate(dt_request(client, **scores)))
    scored = documented_pixels(stub_for, server, **scores)
    assert np.array_equal(decode_image(images[0]), scored[0]) and not np.array_equal(scored[0], refined[0])


def test_a_refiner_after_an_sd1_model_is_an_invalid_argument_naming_it(server_factory, stub_for, dt_connect,
                                                                       tiny_models) -> None:
    shutil.copytree(FIXTURES / "sdxl_refiner_tiny" / "diffusers", tiny_models / "refiner")
    server = server_factory()
    for call in (lambda: list(dt_connect(server).generate(dt_request(dt_connect(server), refiner_model="refiner"))),
                 lambda: documented_pixels(stub_for, server, refiner_model="refiner")):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith("refiner_model: refiner refines SDXL models")


def test_an_upscaler_upscales_the_finished_images_with_the_installed_one(server_factory, dt_connect, stub_for,
                                                                         tiny_models) -> None:
    server = server_factory()
    client = dt_connect(server)
    with pytest.raises(grpc.RpcError) as caught:  # named, but none installed
        list(client.generate(dt_request(client, upscaler="realesrgan_x4plus_f16.ckpt")))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "upscaler/model.safetensors" in caught.value.details()
    (tiny_models / "upscaler").mkdir()
    shutil.copy(RESTORATION / "esrgan_rrdb_x2.safetensors", tiny_models / UPSCALER_FILE)
    expected = load_upscaler(tiny_models / UPSCALER_FILE).upscale(documented_pixels(stub_for, server)[0])
    for factor, side in ((0, 128), (3, 192)):  # 0: the network's own factor
        responses = list(client.generate(dt_request(client, upscaler="realesrgan_x4plus_f16.ckpt",
                                                    upscaler_scale_factor=factor)))
        (data,), progress = collect_images(responses)
        assert decode_image(data).shape == (side, side, 3)
        assert [r.scaleFactor for r in responses if r.generatedImages] == [side // 64]
        assert progress[0].currentSignpost.WhichOneof("signpost") == "textEncoded"
        assert "imageUpscaled" in {s.WhichOneof("signpost") for s in progress[0].signposts}
        if factor == 0:
            assert np.array_equal(decode_image(data), expected)


def test_speed_settings_are_ignored(server_factory, dt_connect, tiny_models) -> None:
    client = dt_connect(server_factory())
    (plain,), _ = collect_images(client.generate(dt_request(client)))
    (tuned,), _ = collect_images(client.generate(dt_request(client, tea_cache=True, tiled_decoding=True,
                                                            tiled_diffusion=True)))
    assert np.array_equal(decode_image(plain), decode_image(tuned))


def picture() -> np.ndarray:
    y, x = np.mgrid[0:64, 0:64]
    return np.stack([x * 4, y * 4, (x * y) % 256], -1).astype(np.uint8)


def mask_tensor(levels: np.ndarray) -> bytes:
    """A uint8 [H, W] mask tensor (NCHW, raw), as the app sends masks."""
    return HEADER.pack(RAW, 1, 1, U8, 0, *levels.shape, *[0] * 10) + levels.astype(np.uint8).tobytes()


def box(top: int, bottom: int, left: int, right: int) -> np.ndarray:
    """A 64x64 boolean mask, true in rows [top, bottom) and columns [left, right)."""
    inside = np.zeros((64, 64), bool)
    inside[top:bottom, left:right] = True
    return inside


def test_an_init_image_and_mask_inpaint_as_the_documented_api_does(server_factory, dt_connect, stub_for,
                                                                   tiny_models) -> None:
    server = server_factory()
    client = dt_connect(server)
    repaint = box(16, 48, 8, 40)
    levels = np.where(repaint, 1, 3) | 0x80  # regenerate / keep in the low bits; the high bits carry alpha
    png_mask = np.where(repaint, 255, 0).astype(np.uint8)
    raw = image_tensor(picture(), compress=True)
    for image, contents in ((raw, []), (hashlib.sha256(raw).digest(), [raw])):
        request = dt_request(client, strength=0.5, mask_blur=2.0, steps=4)
        request.image, request.mask, request.contents[:] = image, mask_tensor(levels), contents
        (data,), progress = collect_images(client.generate(request))
        expected = documented_pixels(stub_for, server, steps=4, init_image=png(picture()), mask=png(png_mask),
                                     mask_blur=2, denoising_strength=0.5)[0]
        assert np.array_equal(decode_image(data), expected)
        cases = [p.currentSignpost.WhichOneof("signpost") for p in progress]
        assert cases[:2] == ["textEncoded", "imageEncoded"] and cases.count("sampling") == 2
        beyond_blur = np.ones((64, 64), bool)
        beyond_blur[10:54, 2:46] = False
        assert np.array_equal(decode_image(data)[beyond_blur], picture()[beyond_blur])  # the original preserved
    request = dt_request(client)
    request.image = hashlib.sha256(raw).digest()  # the app empties contents for text-to-image
    assert len(collect_images(client.generate(request))[0]) == 1


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_hires_fix_with_an_image_is_refused(server_factory, dt_connect, tiny_models) -> None:
    client = dt_connect(server_factory())
    request = dt_request(client, hires_fix=True)
    request.image = image_tensor(picture())
    with pytest.raises(grpc.RpcError) as caught:
        list(client.generate(request))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and caught.value.details().startswith("hires_fix")


def test_the_mask_outset_grows_or_shrinks_the_mask_as_the_documented_api_does(server_factory, dt_connect, stub_for,
                                                                              tiny_models) -> None:
    server = server_factory()
    client = dt_connect(server)
    repaint = box(16, 48, 8, 40)
    png_mask = np.where(repaint, 255, 0).astype(np.uint8)
    results = {}
    for outset in (6, -6, 0):
        request = dt_request(client, strength=0.5, mask_blur_outset=outset)
        request.image, request.mask = image_tensor(picture()), mask_tensor(np.where(repaint, 1, 3))
        (data,), _ = collect_images(client.generate(request))
        results[outset] = decode_image(data)
        assert np.array_equal(results[outset], documented_pixels(
            stub_for, server, init_image=png(picture()), mask=png(png_mask), denoising_strength=0.5,
            mask_outset=outset)[0])
    grown = box(10, 54, 2, 46)
    assert np.array_equal(results[6][~grown], picture()[~grown])  # the original kept beyond the grown mask
    assert not np.array_equal(results[6][grown & ~repaint], picture()[grown & ~repaint])  # repainted around it
    shrunk = box(22, 42, 14, 34)
    assert np.array_equal(results[-6][~shrunk], picture()[~shrunk])  # the original kept outside the shrunk mask
    with pytest.raises(grpc.RpcError) as caught:
        request = dt_request(client, strength=0.5, mask_blur_outset=101)
        request.image, request.mask = image_tensor(picture()), mask_tensor(np.where(repaint, 1, 3))
        list(client.generate(request))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mask_outset" in caught.value.details()


def test_a_2048_square_image_tensor_fits_in_a_request(server_factory, dt_connect, tiny_models) -> None:
    client = dt_connect(server_factory(tls=False))
    request = dt_request(client)
    request.image = image_tensor(np.zeros((2048, 2048, 3), np.uint8))  # 24 MiB of fp16
    request.configuration = build_configuration(**{**BASE, "strength": 0.0})  # the image as it is, resized
    (data,), _ = collect_images(client.generate(request))
    assert decode_image(data).shape == (64, 64, 3)


def test_a_missing_model_is_not_found_and_a_draw_things_ckpt_is_refused(server_factory, dt_connect, tiny_models) -> None:
    client = dt_connect(server_factory())
    with pytest.raises(grpc.RpcError) as caught:
        list(client.generate(dt_request(client, model="absent.safetensors")))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "absent.safetensors" in caught.value.details()
    with sqlite3.connect(tiny_models / "sd_v1.5_f16.ckpt") as db:  # Draw Things' own model format
        db.execute("CREATE TABLE tensors (name TEXT, type INTEGER, format INTEGER, datatype INTEGER, dim BLOB, data BLOB)")
    with pytest.raises(grpc.RpcError) as caught:
        list(client.generate(dt_request(client, model="sd_v1.5_f16.ckpt")))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# Requests as third-party clients build them (facts from drawthings-py and draw-things-comfyui): a
# configuration written by flatbuffers' object API (empty strings and lists present), user and
# device set, scaleFactor 1, no secret, not chunked, and for ComfyUI a MetadataOverride.
THIRD_PARTY_CONFIG = dict(
    upscaler="", face_restoration="", refiner_model="", loras=[], controls=[], mask_blur=2.5, clip_skip=2,
    preserve_original_after_inpaint=True, resolution_dependent_shift=True, t5_text_encoder=True,
)


@pytest.mark.parametrize(("user", "device", "sampler", "seed_mode"), [
    ("drawthings-py-user", 0, 10, 2),  # Euler a Trailing, scale-alike seeds: drawthings-py's defaults
    ("ComfyUI", 2, 0, 1),
])
def test_third_party_requests_generate(server_factory, dt_connect, tiny_models, user, device, sampler,
                                       seed_mode) -> None:
    client = dt_connect(server_factory(tls=False))
    config = build_configuration(explicit=("hires_fix", "tiled_decoding"), **{
        **BASE, **THIRD_PARTY_CONFIG, "sampler": sampler, "seed_mode": seed_mode, "hires_fix": False,
        "tiled_decoding": False})
    request = client.pb.GenerateRequest(prompt=PROMPT, negativePrompt=NEGATIVE, configuration=config, user=user,
                                        device=device, scaleFactor=1)
    if user == "ComfyUI":
        request.override.models = b'[{"file": "model.safetensors", "name": "x", "version": "v1", "prefix": ""}]'
    images, _ = collect_images(client.generate(request))
    assert [decode_image(d).shape for d in images] == [(64, 64, 3)]


def test_a_client_lists_the_models_with_the_browser_and_generates_with_one(server_factory, dt_connect, tiny_models,
                                                                           sd1_single_file) -> None:
    import json
    import shutil

    shutil.copy(sd1_single_file, tiny_models / "my_model.safetensors")
    client = dt_connect(server_factory(model_browser=True))
    reply = client.echo("ComfyUI")
    assert "my_model.safetensors" in reply.files
    lists = {key: json.loads(getattr(reply.override, key))
             for key in ("models", "loras", "controlNets", "textualInversions", "upscalers")}
    assert lists["loras"] == lists["controlNets"] == lists["textualInversions"] == [] and lists["upscalers"] == []
    entry = next(m for m in lists["models"] if m["file"] == "my_model.safetensors")
    assert entry == {"file": "my_model.safetensors", "name": "my_model", "prefix": "", "version": "v1",
                     "upcast_attention": False, "default_scale": 8}
    images, _ = collect_images(client.generate(dt_request(client, model=entry["file"])))
    assert decode_image(images[0]).shape == (64, 64, 3)
