"""One log line per RPC from a real server: id, RPC, key parameters, duration, outcome; prompts only at DEBUG."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator

import grpc
import pytest

from grpc_service.auth import bearer_metadata
from grpc_service.client import open_channel
from grpc_service.generated import imageservice_pb2 as pb
from tests.conftest import client_settings, fake_result

LOGGER = "mlx_sd.requests"
SECRET = "hunter2-secret"
PROMPT = "a lighthouse at dusk, oil painting"
LINE = re.compile(r"^rpc (?P<id>[0-9a-f]{8}) (?P<rpc>\w+) peer=\S+(?P<params>.*) -> (?P<outcome>[A-Z_]+) \d+\.\d\ds$")


def one_image(request: object, is_cancelled: Callable[[], bool]) -> Iterator[object]:
    yield fake_result(1)


def lines(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


def parsed(caplog: pytest.LogCaptureFixture) -> list[re.Match[str]]:
    found = [LINE.match(line) for line in lines(caplog)]
    assert all(found), lines(caplog)
    return found  # type: ignore[return-value]


def test_echo_is_logged_once_with_id_and_outcome(server_factory, stub_for, caplog) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    stub = stub_for(server_factory(engine=one_image))
    stub.Echo(pb.EchoRequest())
    stub.Echo(pb.EchoRequest())
    first, second = parsed(caplog)
    assert first["rpc"] == "Echo" and first["outcome"] == "OK"
    assert first["id"] != second["id"]


def test_generate_logs_its_key_parameters_but_not_the_prompt(server_factory, stub_for, caplog) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    stub = stub_for(server_factory(engine=one_image))
    request = pb.ImageGenerationRequest(prompt=PROMPT, width=512, height=768, steps=12, sampler="Euler a", batch_size=1)
    list(stub.GenerateImage(request))
    (line,) = parsed(caplog)
    assert line["rpc"] == "GenerateImage" and line["outcome"] == "OK"
    assert "size=512x768" in line["params"] and "steps=12" in line["params"]
    assert "sampler='Euler a'" in line["params"] and "batch=1x0" in line["params"]
    assert all(PROMPT not in record.getMessage() for record in caplog.records)


def test_debug_adds_the_prompt_but_never_the_secret(server_factory, stub_for, caplog) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    running = server_factory(engine=one_image, shared_secret=SECRET)
    stub = stub_for(running)
    list(stub.GenerateImage(pb.ImageGenerationRequest(prompt=PROMPT), metadata=bearer_metadata(SECRET)))
    (debug,) = lines(caplog, logging.DEBUG)
    assert PROMPT in debug and "authorization=sent" in debug
    assert all(SECRET not in record.getMessage() for record in caplog.records)


def test_refused_and_invalid_calls_are_logged_with_their_status(server_factory, stub_for, caplog) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    stub = stub_for(server_factory(engine=one_image, shared_secret=SECRET))
    with pytest.raises(grpc.RpcError):
        stub.Echo(pb.EchoRequest())
    with pytest.raises(grpc.RpcError):
        list(stub.GenerateImage(pb.ImageGenerationRequest(width=100), metadata=bearer_metadata(SECRET)))
    refused, invalid = parsed(caplog)
    assert (refused["rpc"], refused["outcome"]) == ("Echo", "UNAUTHENTICATED")
    assert (invalid["rpc"], invalid["outcome"]) == ("GenerateImage", "INVALID_ARGUMENT")


def test_a_request_that_does_not_parse_is_logged_as_malformed(server_factory, caplog) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    with open_channel(client_settings(server_factory(engine=one_image))) as channel, pytest.raises(grpc.RpcError):
        list(channel.unary_stream("/mlxsd.v1.ImageGenerationService/GenerateImage")(b"\xff" * 10))
    (line,) = parsed(caplog)
    assert (line["rpc"], line["params"], line["outcome"]) == ("GenerateImage", " request=malformed", "INVALID_ARGUMENT")


def test_upload_logs_the_file_name_and_size(server_factory, stub_for, caplog) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    stub = stub_for(server_factory(engine=one_image))
    chunks = [b"x" * 1000, b"y" * 500]
    messages = [pb.UploadFileRequest(filename="loras/a.safetensors", chunk_data=chunk) for chunk in chunks]
    stub.UploadFile(iter(messages))
    (line,) = parsed(caplog)
    assert line["rpc"] == "UploadFile" and line["outcome"] == "OK"
    assert "file='loras/a.safetensors' bytes=1500" in line["params"]


def test_files_exist_logs_the_count_and_names_only_at_debug(server_factory, stub_for, caplog) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    stub_for(server_factory(engine=one_image)).FilesExist(pb.FilesExistRequest(files=["a.bin", "b.bin"]))
    (line,) = parsed(caplog)
    assert "files=2" in line["params"] and "a.bin" not in line["params"]
    assert "a.bin" in lines(caplog, logging.DEBUG)[0]
