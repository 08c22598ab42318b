"""The server's reading of Draw Things' formats, against the independent test client's writers:
GenerationConfiguration FlatBuffers, and tensors (header, raw, fpzip, DEFLATE)."""

from __future__ import annotations

import struct
import zlib

import fpzip
import numpy as np
import pytest

from grpc_service.drawthings import tensors
from grpc_service.drawthings.config import FIELDS, read_configuration
from mlx_sd.engine.errors import InvalidRequest
from tests.dt_client import CONFIG_SLOTS, HEADER, build_configuration, decode_image, decode_tensor, image_tensor


def test_the_slot_table_agrees_with_the_clients_and_has_every_slot() -> None:
    assert [f.slot for f in FIELDS] == list(range(88))
    by_name = {f.name: f for f in FIELDS}
    for name, (slot, _kind, default) in CONFIG_SLOTS.items():
        assert by_name[name].slot == slot, name
        if default is not None:
            assert by_name[name].default == pytest.approx(default), name


def test_fields_written_are_read_and_omitted_ones_take_the_schemas_defaults() -> None:
    config = read_configuration(build_configuration(
        start_width=12, start_height=8, seed=4294967295, steps=30, guidance_scale=4.5, model="m.safetensors",
        sampler=10, batch_size=3, hires_fix=True, hires_fix_start_width=6, loras=["a.safetensors", ("b.ckpt", 0.5, 2)],
        seed_mode=2, stochastic_sampling_gamma=0.25))
    assert {k: config[k] for k in ("start_width", "start_height", "seed", "steps", "model", "sampler", "batch_size",
                                   "hires_fix", "hires_fix_start_width", "loras", "seed_mode")} == {
        "start_width": 12, "start_height": 8, "seed": 4294967295, "steps": 30, "model": "m.safetensors",
        "sampler": 10, "batch_size": 3, "hires_fix": True, "hires_fix_start_width": 6,
        "loras": (("a.safetensors", pytest.approx(0.6), 0), ("b.ckpt", 0.5, 2)), "seed_mode": 2}
    assert config["guidance_scale"] == 4.5 and config["stochastic_sampling_gamma"] == pytest.approx(0.25)
    # Omitted: the schema's defaults, including the non-zero ones.
    assert (config["batch_count"], config["hires_fix_strength"], config["clip_skip"], config["shift"],
            config["preserve_original_after_inpaint"], config["tea_cache_end"], config["controls"]) == (
        1, 0.7, 1, 1.0, True, -1, ())


def test_a_default_written_explicitly_reads_the_same() -> None:
    implicit = read_configuration(build_configuration(steps=20, batch_count=1, shift=1.0))
    explicit = read_configuration(build_configuration(explicit=("batch_count", "shift"), steps=20, batch_count=1,
                                                      shift=1.0))
    assert implicit == explicit


def test_an_empty_configuration_is_all_defaults() -> None:
    config = read_configuration(b"")
    assert config["start_width"] == 0 and config["batch_size"] == 1 and config["model"] == ""


@pytest.mark.parametrize("data", [
    b"\x00", b"\xff\xff\xff\xff", b"\x08\x00\x00\x00\x00\x00\x00\x00",
    struct.pack("<I", 4) + struct.pack("<i", -1000),  # a vtable before the buffer
])
def test_malformed_buffers_are_invalid_arguments_naming_the_configuration(data: bytes) -> None:
    with pytest.raises(InvalidRequest) as caught:
        read_configuration(data)
    assert caught.value.field == "configuration"


def test_truncating_a_valid_buffer_never_reads_past_it() -> None:
    data = build_configuration(model="a-long-model-name.safetensors", loras=["x.safetensors"], steps=3)
    for end in range(len(data)):
        try:
            read_configuration(data[:end])
        except InvalidRequest as error:
            assert error.field == "configuration"


def test_an_image_round_trips_through_both_codecs() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    smooth = np.repeat(np.linspace(0, 255, 96, dtype=np.uint8)[None, :, None], 64, axis=0).repeat(3, axis=2)
    for image in (pixels, smooth):
        for compress in (False, True):
            data = tensors.encode_image(image, compress)
            assert HEADER.unpack_from(data)[5:9] == (1, 64, 96, 3)
            assert np.array_equal(decode_image(data), image)
    assert HEADER.unpack_from(tensors.encode_image(smooth, True))[0] == tensors.FPZIP  # it shrinks
    assert HEADER.unpack_from(tensors.encode_image(pixels, True))[0] == tensors.RAW  # noise does not


def test_latent_previews_are_nhwc_fp16() -> None:
    latents = np.random.default_rng(1).normal(size=(8, 12, 4)).astype(np.float32)
    decoded = decode_tensor(tensors.encode_latents(latents, True))
    assert decoded.shape == (1, 8, 12, 4)
    assert np.array_equal(decoded[0], latents.astype(np.float16).astype(np.float32))


def test_client_tensors_are_checked() -> None:
    pixels = np.zeros((64, 64, 3), np.uint8)
    for compress in (False, True):
        assert tensors.inspect(image_tensor(pixels, compress), "image").shape == (1, 64, 64, 3)
    mask = struct.pack("<5I12i", tensors.ZIP, 1, tensors.NCHW, tensors.U8, 0, 64, 64, *[0] * 10)
    deflate = zlib.compressobj(wbits=-15)
    assert tensors.inspect(mask + deflate.compress(bytes(64 * 64)) + deflate.flush(), "mask").shape == (64, 64)


def _header(codec=0, datatype=tensors.F16, dims=(1, 4, 4, 3)) -> bytes:
    return struct.pack("<5I12i", codec, 1, tensors.NHWC, datatype, 0, *dims, *[0] * (12 - len(dims)))


@pytest.mark.parametrize(("data", "why"), [
    (b"\x00" * 10, "shorter than"),
    (_header() + bytes(95), "need 96"),  # truncated
    (_header() + bytes(97), "need 96"),
    (_header(codec=0x1234) + bytes(96), "codec"),
    (_header(datatype=0x7) + bytes(96), "datatype"),
    (_header(dims=(1, 0, 4, 3)) + bytes(96), "dimensions"),
    (_header(dims=(1, -4, 4, 3)) + bytes(96), "dimensions"),
    (_header(dims=(1, 4096, 4096, 4096)), "elements"),
    (_header(codec=tensors.FPZIP) + b"garbage", "fpzip"),
    (_header(codec=tensors.FPZIP, dims=(1, 4, 4, 4)) + fpzip.compress(np.zeros((1, 4, 4, 3), np.float32)), "3x4x4x1 floats"),
    (_header(codec=tensors.ZIP) + b"not deflate", "DEFLATE"),
    (_header(codec=tensors.ZIP) + zlib.compress(bytes(50))[2:-4], "inflates to 50"),
])
def test_malformed_tensors_are_invalid_arguments_saying_why(data: bytes, why: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        tensors.inspect(data, "image")
    assert caught.value.field == "image" and why in str(caught.value)


def test_every_setting_is_mapped_ignored_or_refused_exactly_once() -> None:
    from grpc_service.drawthings import generation as g

    groups = [*g.MAPPED, *g.IGNORED_FOR_SPEED, *g.NOT_FOR_SD1, *g.DEPENDENT, *g.REFUSED]
    assert sorted(groups) == sorted(f.name for f in FIELDS)


def test_sdxls_size_conditioning_is_mapped_onto_the_request() -> None:
    from grpc_service.drawthings.generation import generation_request
    from grpc_service.generated import drawthings_pb2 as pb

    config = build_configuration(start_width=16, start_height=16, original_image_width=2048,
                                 original_image_height=1536, crop_top=64, crop_left=32, target_image_width=1024,
                                 target_image_height=1024, negative_original_image_width=512,
                                 negative_original_image_height=512)
    request = generation_request(pb.ImageGenerationRequest(prompt="x", configuration=config))
    assert (request.original_width, request.original_height, request.crop_top, request.crop_left) == (2048, 1536, 64, 32)
    assert (request.target_width, request.target_height) == (1024, 1024)
    assert (request.negative_original_width, request.negative_original_height) == (512, 512)
