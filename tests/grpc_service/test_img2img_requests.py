"""Image to image over the documented API: hostile images are INVALID_ARGUMENT naming the field, the
server stays up and writes nothing; fuzzed image fields get a defined status; a real run works."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from grpc_service.generated import imageservice_pb2 as pb
from grpc_service.servicer import request_from_proto
from mlx_sd.engine.errors import InvalidRequest
from mlx_sd.engine.init_images import MAX_SIDE
from tests.conftest import fake_result
from tests.engine.test_init_images import png_declaring

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def encoded(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


GOOD = encoded(Image.new("RGB", (64, 64), (10, 200, 30)))
MASK = encoded(Image.new("L", (64, 64), 255))
HOSTILE = {
    "bomb": png_declaring(100_000, 100_000),
    "too large": png_declaring(MAX_SIDE + 1, 64),
    "truncated": GOOD[: len(GOOD) // 2],
    "garbage": b"\x89PNG but not really",
    "gif": encoded(Image.new("RGB", (8, 8)), "GIF"),
}


def fake_engine(request, is_cancelled):
    yield fake_result(*range(request.batch_size * request.batch_count))


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("field", ["init_image", "mask"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_images_are_invalid_argument_naming_the_field(server_factory, stub_for, models_dir: Path,
                                                              field: str, case: str) -> None:
    stub = stub_for(server_factory(fake_engine))
    before = listing(models_dir)
    images = {"init_image": GOOD, "mask": MASK, field: HOSTILE[case]}
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.GenerateImage(pb.ImageGenerationRequest(prompt="x", width=64, height=64, **images), timeout=10))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(field)
    assert stub.Echo(pb.EchoRequest(), timeout=10).message == "HELLO"
    assert listing(models_dir) == before


IMAGE_BYTES = st.one_of(st.sampled_from([b"", GOOD, MASK, *HOSTILE.values()]), st.binary(max_size=80))
INT32 = st.one_of(st.sampled_from([0, 1, -1, 64, 65, 256, 257, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1))
IMAGE_REQUESTS = st.builds(
    pb.ImageGenerationRequest, prompt=st.just("x"), width=st.just(64), height=st.just(64), init_image=IMAGE_BYTES,
    mask=IMAGE_BYTES, mask_blur=INT32, resize_mode=INT32, inpaint_full_res=st.booleans(),
    inpaint_full_res_padding=INT32, inpainting_fill=INT32, inpaint_no_overlay=st.booleans(),
    denoising_strength=st.floats(width=32), enable_hr=st.booleans(),
)


@FUZZ
@given(request=IMAGE_REQUESTS)
def test_fuzzed_image_fields_answer_ok_exactly_for_valid_requests(server_factory, stub_for, request) -> None:
    if not hasattr(test_fuzzed_image_fields_answer_ok_exactly_for_valid_requests, "stub"):
        test_fuzzed_image_fields_answer_ok_exactly_for_valid_requests.stub = stub_for(server_factory(fake_engine))
    stub = test_fuzzed_image_fields_answer_ok_exactly_for_valid_requests.stub
    try:
        request_from_proto(request).validated()
        expected = grpc.StatusCode.OK
    except InvalidRequest:
        expected = grpc.StatusCode.INVALID_ARGUMENT
    try:
        list(stub.GenerateImage(request, timeout=10))
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
    assert code == expected


def test_the_real_pipeline_inpaints_over_the_api(server_factory, stub_for, tiny_models: Path) -> None:
    stub = stub_for(server_factory())
    responses = list(stub.GenerateImage(pb.ImageGenerationRequest(
        prompt="x", width=64, height=64, steps=2, seed=3, init_image=GOOD, mask=MASK, mask_blur=4,
        denoising_strength=0.5, inpainting_fill=pb.ImageGenerationRequest.LATENT_NOISE), timeout=120))
    types = [event.type for r in responses for event in r.events]
    assert pb.SignpostEvent.IMAGE_ENCODED in types
    assert len(responses[-1].images) == 1
    assert "Denoising strength: 0.5, Resize mode: Just resize, Mask blur: 4, Masked content: latent noise" \
        in responses[-1].info[0]
