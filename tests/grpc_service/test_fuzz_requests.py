"""Property-based fuzzing of every field of every request, and of raw bytes on every method.

A real TLS server on loopback runs once per test, with a fast fake engine or, for a few bounded
cases, the real pipeline on the tiny model. Whatever arrives, the server answers with a status
from a known set, and stays up.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grpc_service.client import open_channel
from grpc_service.files import UPLOAD_TEMP_PREFIX
from grpc_service.generated import imageservice_pb2 as pb
from grpc_service.servicer import request_from_proto
from mlx_sd.engine.errors import InvalidRequest
from mlx_sd.engine.events import EventType, GenerationResult, ProgressEvent
from mlx_sd.sampling.registry import SAMPLER_NAMES
from tests.conftest import TINY_MODEL, client_settings, fake_result

SERVICE = "/mlxsd.v1.ImageGenerationService/"
Code = grpc.StatusCode
# One server serves all of a test's examples, hence the function-scoped fixtures.
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

INT32 = st.one_of(st.sampled_from([0, 1, -1, 63, 64, 150, 151, 2048, 2049, 2**31 - 1, -(2**31)]),
                  st.integers(-(2**31), 2**31 - 1))
INT64 = st.one_of(st.sampled_from([0, -1, 2**32, 2**63 - 1, -(2**63)]), st.integers(-(2**63), 2**63 - 1))
FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
# Hypothesis draws only short text; long text (at and past the 10,000-character cap) is repeated.
LONG_TEXT = st.builds(lambda unit, length: (unit * length)[:length], st.text(min_size=1, max_size=3),
                      st.sampled_from([10_000, 10_001, 100_000]))
TEXT = st.one_of(st.text(max_size=200), LONG_TEXT)
SAMPLER = st.one_of(st.sampled_from(SAMPLER_NAMES).map(str.swapcase), st.text(max_size=40))


def fake_engine(request, is_cancelled) -> Iterator[ProgressEvent | GenerationResult]:
    yield ProgressEvent(EventType.TEXT_ENCODED, "text encoded", 0)
    yield fake_result(*range(request.batch_size * request.batch_count))


def status_of(call: Callable[[], object]) -> Code:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return Code.OK


@pytest.fixture
def channel(server_factory) -> Iterator[grpc.Channel]:
    with open_channel(client_settings(server_factory(fake_engine, max_upload_bytes=64 * 1024))) as opened:
        yield opened


def stub_of(channel: grpc.Channel):
    from grpc_service.generated import imageservice_pb2_grpc as pb_grpc

    return pb_grpc.ImageGenerationServiceStub(channel)


def still_up(channel: grpc.Channel) -> bool:
    return stub_of(channel).Echo(pb.EchoRequest(), timeout=10).message == "HELLO"


GENERATION_REQUESTS = st.builds(
    pb.ImageGenerationRequest, prompt=TEXT, negative_prompt=TEXT, width=INT32, height=INT32, steps=INT32,
    cfg_scale=FLOAT32, seed=INT64, sampler=SAMPLER, restore_faces=st.booleans(), enable_hr=st.booleans(),
    denoising_strength=FLOAT32, batch_size=INT32, batch_count=INT32,
)


@FUZZ
@given(request=GENERATION_REQUESTS)
def test_generate_image_answers_ok_exactly_for_valid_requests(channel: grpc.Channel, request) -> None:
    try:
        request_from_proto(request).validated()
        expected = Code.OK
    except InvalidRequest:
        expected = Code.INVALID_ARGUMENT
    assert status_of(lambda: list(stub_of(channel).GenerateImage(request, timeout=10))) == expected


@FUZZ
@given(files=st.lists(st.one_of(TEXT, st.sampled_from(["../x", "/etc/passwd", "a\0b", "C:/x", "./a", "a//b"])),
                      max_size=30))
def test_files_exist_answers_every_name_in_order(channel: grpc.Channel, files: list[str]) -> None:
    reply = stub_of(channel).FilesExist(pb.FilesExistRequest(files=files), timeout=10)
    assert list(reply.files) == files and len(reply.exists) == len(reply.errors) == len(files)


UPLOAD_MESSAGES = st.lists(
    st.builds(pb.UploadFileRequest,
              filename=st.one_of(st.just(""), st.sampled_from(["a.bin", "sub/b.bin", "../c", "vae"]), TEXT),
              chunk_data=st.binary(max_size=40_000),
              sha256=st.one_of(st.just(""), st.text(max_size=70), st.text("0123456789abcdef", min_size=64,
                                                                          max_size=64))),
    max_size=5,
)


@FUZZ
@given(messages=UPLOAD_MESSAGES)
def test_upload_file_answers_a_defined_status_and_leaves_no_temporary_file(
    channel: grpc.Channel, models_dir: Path, messages: list[pb.UploadFileRequest]
) -> None:
    code = status_of(lambda: stub_of(channel).UploadFile(iter(messages), timeout=10))
    assert code in {Code.OK, Code.INVALID_ARGUMENT, Code.DATA_LOSS}
    assert not [p for p in models_dir.rglob("*") if p.name.startswith(UPLOAD_TEMP_PREFIX)]


RAW_CALLS = {
    "Echo": lambda channel, data: channel.unary_unary(SERVICE + "Echo")(data, timeout=10),
    "FilesExist": lambda channel, data: channel.unary_unary(SERVICE + "FilesExist")(data, timeout=10),
    "GenerateImage": lambda channel, data: list(channel.unary_stream(SERVICE + "GenerateImage")(data, timeout=10)),
    "UploadFile": lambda channel, data: channel.stream_unary(SERVICE + "UploadFile")(iter([data, data]), timeout=10),
}
# Bytes that do not parse are INVALID_ARGUMENT; those that do are ordinary requests.
RAW_STATUSES = {Code.OK, Code.INVALID_ARGUMENT, Code.DATA_LOSS}
# Not a message of any type: an invalid wire type; a length-delimited field cut short.
MALFORMED = [b"\xff" * 10, b"\x12\x05ab"]


@pytest.mark.parametrize("method", RAW_CALLS)
@FUZZ
@given(data=st.one_of(st.binary(max_size=2_000), st.sampled_from([b"\xff" * 10, b"\x0a\xff\xff\xff\xff\x0f",
                                                                  b"\x08" + b"\x80" * 10, b"\x12\x05ab"])))
def test_raw_bytes_get_a_defined_status(channel: grpc.Channel, method: str, data: bytes) -> None:
    assert status_of(lambda: RAW_CALLS[method](channel, data)) in RAW_STATUSES
    assert still_up(channel)


@pytest.mark.parametrize("method", RAW_CALLS)
@pytest.mark.parametrize("data", MALFORMED)
def test_bytes_that_do_not_parse_are_invalid_argument(channel: grpc.Channel, method: str, data: bytes) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        RAW_CALLS[method](channel, data)
    assert raised.value.code() == Code.INVALID_ARGUMENT
    assert raised.value.details().startswith("request: not a valid protobuf message")
    assert still_up(channel)


def test_an_upload_whose_later_message_does_not_parse_keeps_nothing(channel: grpc.Channel, models_dir: Path) -> None:
    first = pb.UploadFileRequest(filename="a.bin", chunk_data=b"x" * 1000).SerializeToString()
    with pytest.raises(grpc.RpcError) as raised:
        channel.stream_unary(SERVICE + "UploadFile")(iter([first, MALFORMED[0]]), timeout=10)
    assert raised.value.code() == Code.INVALID_ARGUMENT
    assert list(models_dir.rglob("*")) == []


def test_without_the_secret_bytes_that_do_not_parse_are_unauthenticated(server_factory) -> None:
    with open_channel(client_settings(server_factory(fake_engine, shared_secret="s3cret"))) as opened:
        assert status_of(lambda: RAW_CALLS["GenerateImage"](opened, MALFORMED[0])) == Code.UNAUTHENTICATED


def test_an_unknown_method_is_unimplemented(channel: grpc.Channel) -> None:
    assert status_of(lambda: channel.unary_unary(SERVICE + "Nope")(b"", timeout=10)) == Code.UNIMPLEMENTED


def test_an_oversized_message_is_resource_exhausted(channel: grpc.Channel) -> None:
    huge = pb.FilesExistRequest(files=["x" * 1024**2] * 65)  # past the 64 MiB the server receives
    assert status_of(lambda: stub_of(channel).FilesExist(huge, timeout=30)) == Code.RESOURCE_EXHAUSTED
    assert still_up(channel)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=st.builds(
    pb.ImageGenerationRequest, prompt=st.text(max_size=300), negative_prompt=st.text(max_size=100),
    width=st.just(64), height=st.sampled_from([64, 128]), steps=st.integers(1, 2),
    # Every image's seed (seed + index, at most 3 more) must fit in int64.
    cfg_scale=st.floats(0, 30, width=32), seed=st.integers(-(2**63), 2**63 - 4), sampler=st.sampled_from(SAMPLER_NAMES),
    restore_faces=st.booleans(), enable_hr=st.booleans(), denoising_strength=st.floats(0, 1, width=32),
    batch_size=st.integers(0, 2), batch_count=st.integers(0, 2),
))
def test_the_real_pipeline_answers_valid_requests(server_factory, stub_for, models_dir: Path, request) -> None:
    if not (models_dir / "stable-diffusion").exists():
        shutil.copytree(TINY_MODEL, models_dir / "stable-diffusion")
        test_the_real_pipeline_answers_valid_requests.stub = stub_for(server_factory())
    stub = test_the_real_pipeline_answers_valid_requests.stub
    responses: list[pb.ImageGenerationResponse] = []
    code = status_of(lambda: responses.extend(stub.GenerateImage(request, timeout=60)))
    # restore_faces needs model files of its own, absent here.
    assert code == Code.OK or (request.restore_faces and code in {Code.NOT_FOUND, Code.FAILED_PRECONDITION})
    if code == Code.OK:
        assert len(responses[-1].images) == (request.batch_size or 1) * (request.batch_count or 1)
