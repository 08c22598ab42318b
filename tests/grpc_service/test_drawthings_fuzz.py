"""Property-based fuzzing of Draw Things' protocol: random and mutated FlatBuffer configurations,
truncated and mislabelled tensors, 32-byte keys absent from `contents`, huge sizes, and random
upload streams. Whatever arrives, the answer is a status from a known set, a malformed input is
INVALID_ARGUMENT naming what is wrong, and the server stays up."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import fake_result
from tests.dt_client import CONFIG_SLOTS, HEADER, build_configuration, collect_images, image_tensor

Code = grpc.StatusCode
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
VALID = build_configuration(start_width=1, start_height=1, steps=2, seed=3)
KNOWN = {Code.OK, Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.NOT_FOUND}


def fake_engine(request, is_cancelled) -> Iterator[object]:
    yield fake_result(*range(request.batch_size * request.batch_count), size=64)


@pytest.fixture
def client(server_factory, dt_connect):
    return dt_connect(server_factory(fake_engine, tls=False, max_upload_bytes=64 * 1024))


def outcome(call: Callable[[], object]) -> tuple[Code, str]:
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return Code.OK, ""


def generate(client, configuration: bytes = VALID, **fields) -> tuple[Code, str]:
    request = client.pb.GenerateRequest(prompt="p", configuration=configuration, **fields)
    return outcome(lambda: collect_images(client.generate(request, timeout=30)))


def still_up(client) -> bool:
    return client.echo("alive").message == "HELLO alive"


@FUZZ
@given(data=st.binary(max_size=600))
def test_random_configuration_bytes(client, data: bytes) -> None:
    code, details = generate(client, data)
    assert code in KNOWN
    if code == Code.INVALID_ARGUMENT:
        assert details.split(":")[0] in {"configuration", *CONFIG_SLOTS, "sampler", "seed_mode", "steps", "width",
                                         "height", "cfg_scale", "batch_size", "batch_count", "clip_skip",
                                         "hires_first_width", "hires_first_height", "denoising_strength",
                                         "stochastic_sampling_gamma", "model"}, details


@FUZZ
@given(position=st.integers(0, len(VALID) - 1), value=st.integers(0, 255), cut=st.integers(0, len(VALID)))
def test_mutated_and_truncated_configurations(client, position: int, value: int, cut: int) -> None:
    mutated = bytearray(VALID)
    mutated[position] = value
    for data in (bytes(mutated), VALID[:cut]):
        code, _ = generate(client, data)
        assert code in KNOWN
    assert still_up(client)


UINT32 = st.one_of(st.sampled_from([0, 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
CONFIGS = st.fixed_dictionaries({}, optional={
    "start_width": st.integers(0, 65535), "start_height": st.integers(0, 65535), "steps": UINT32,
    "seed": UINT32, "batch_count": UINT32, "batch_size": UINT32, "sampler": st.integers(-128, 127),
    "seed_mode": st.integers(-128, 127), "clip_skip": UINT32, "guidance_scale": st.floats(width=32),
    "hires_fix": st.booleans(), "hires_fix_start_width": st.integers(0, 65535),
    "stochastic_sampling_gamma": st.floats(width=32), "model": st.text(max_size=40),
})


@FUZZ
@given(config=CONFIGS)
def test_well_formed_configurations_with_any_values(client, config: dict) -> None:
    code, details = generate(client, build_configuration(**config))
    assert code in KNOWN, details
    if code == Code.OK:
        assert config.get("start_width", 0) * 64 <= 2048


def _tensor(codec=0, datatype=0x20000, dims=(1, 64, 64, 3), payload=b"") -> bytes:
    return HEADER.pack(codec, 1, 2, datatype, 0, *dims, *[0] * (12 - len(dims))) + payload


TENSORS = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda cut: image_tensor(np.zeros((64, 64, 3), np.uint8))[:cut], st.integers(0, 64 * 64 * 6 + 67)),
    st.builds(lambda dims: _tensor(dims=dims, payload=bytes(64)),
              st.lists(st.integers(-2**31, 2**31 - 1), min_size=1, max_size=12).map(tuple)),
    st.builds(lambda codec, body: _tensor(codec=codec, payload=body), st.sampled_from([0xF7217, 0x217, 7]),
              st.binary(max_size=100)),
    st.builds(lambda n: _tensor(dims=(1, n, n, 3)), st.sampled_from([4096, 65535, 2**31 - 1])),  # huge sizes
)


@FUZZ
@given(tensor=TENSORS, field=st.sampled_from(["image", "mask", "hint"]))
def test_malformed_tensors_are_invalid_arguments_naming_them(client, tensor: bytes, field: str) -> None:
    if field == "hint":
        fields = {"hints": [client.pb.Hint(hintType="depth", tensors=[client.pb.TensorAndWeight(tensor=tensor)])]}
    else:
        fields = {field: tensor}
    code, details = generate(client, **fields)
    if len(tensor) == 32 or not tensor:  # a key into the empty contents, or nothing: the input is absent
        assert code == Code.OK
    else:
        assert code == Code.INVALID_ARGUMENT and details.startswith(field), details
    assert still_up(client)


@FUZZ
@given(keys=st.lists(st.binary(min_size=32, max_size=32), max_size=4),
       contents=st.lists(st.binary(max_size=64), max_size=4))
def test_keys_absent_from_contents_mean_no_input(client, keys: list[bytes], contents: list[bytes]) -> None:
    hints = [client.pb.Hint(hintType="depth", tensors=[client.pb.TensorAndWeight(tensor=k) for k in keys])]
    code, _ = generate(client, image=keys[0] if keys else b"", hints=hints, contents=contents)
    assert code == Code.OK  # random blobs never hash to the random keys


@FUZZ
@given(messages=st.lists(st.one_of(
    st.builds(lambda name, size, digest: ("init", name, size, digest), st.text(max_size=30),
              st.integers(-2**63, 2**63 - 1), st.binary(max_size=40)),
    st.builds(lambda content, offset: ("chunk", content, offset), st.binary(max_size=64), st.integers(-1, 300)),
), max_size=6))
def test_random_upload_streams(client, messages: list[tuple]) -> None:
    pb = client.pb
    requests = [pb.UploadRequest(initRequest=pb.UploadInit(filename=m[1], totalSize=m[2], sha256=m[3]))
                if m[0] == "init" else pb.UploadRequest(chunk=pb.UploadChunk(content=m[1], offset=m[2]))
                for m in messages]
    code, _ = outcome(lambda: list(client.upload_stream(iter(requests))))
    assert code in {Code.OK, Code.INVALID_ARGUMENT, Code.DATA_LOSS}
    assert still_up(client)


def test_raw_garbage_on_every_method_is_an_invalid_argument(client) -> None:
    channel = client._channel
    for rpc in ("Echo", "FilesExist"):
        assert outcome(lambda: channel.unary_unary(f"/ImageGenerationService/{rpc}")(b"\xff\xff\xff"))[0] == \
            Code.INVALID_ARGUMENT, rpc
    stream = channel.unary_stream("/ImageGenerationService/GenerateImage")
    assert outcome(lambda: list(stream(b"\xff\xff\xff")))[0] == Code.INVALID_ARGUMENT
    assert still_up(client)
