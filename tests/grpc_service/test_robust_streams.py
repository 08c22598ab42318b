"""Streaming calls are capped in all and per address, and cancelled when their client goes quiet."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from grpc_service.files import UPLOAD_TEMP_PREFIX
from grpc_service.generated import imageservice_pb2 as pb
from grpc_service.streams import StreamLimitInterceptor, StreamLimits

WAIT_S = 60.0  # bounds on waiting for an effect; a loaded machine only makes them slower


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(UPLOAD_TEMP_PREFIX)]


def wait_until(condition, timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        threading.Event().wait(0.02)
    return True


def stalled_upload(stub, name: str, release: threading.Event) -> grpc.Future:
    """An upload that sends one chunk, then waits for `release` before it ends."""

    def messages() -> Iterator[pb.UploadFileRequest]:
        yield pb.UploadFileRequest(filename=name, chunk_data=b"x" * 1000)
        release.wait(WAIT_S)

    return stub.UploadFile.future(messages())


def test_streams_beyond_the_per_address_cap_are_refused_while_echo_answers(server_factory, stub_for,
                                                                           models_dir: Path) -> None:
    server = server_factory(stream_limits=StreamLimits(max_streams=10, max_streams_per_address=2))
    stub, release = stub_for(server), threading.Event()
    held = [stalled_upload(stub, f"held{i}.bin", release) for i in range(2)]
    try:
        assert wait_until(lambda: len(temp_files(models_dir)) == 2)  # both admitted and writing
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.GenerateImage(pb.ImageGenerationRequest()))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "from this address" in caught.value.details()
        assert stub.Echo(pb.EchoRequest(), timeout=WAIT_S).message == "HELLO"
        assert list(stub.FilesExist(pb.FilesExistRequest(files=["a"]), timeout=WAIT_S).exists) == [False]
    finally:
        release.set()
    assert all(call.result(timeout=WAIT_S).success for call in held)
    assert sorted(p.name for p in models_dir.iterdir()) == ["held0.bin", "held1.bin"]


def test_streams_beyond_the_global_cap_are_refused(server_factory, stub_for, models_dir: Path) -> None:
    server = server_factory(stream_limits=StreamLimits(max_streams=1, max_streams_per_address=5))
    stub, release = stub_for(server), threading.Event()
    held = stalled_upload(stub, "held.bin", release)
    try:
        assert wait_until(lambda: len(temp_files(models_dir)) == 1)
        refused = stalled_upload(stub, "refused.bin", release)
        assert refused.exception(timeout=WAIT_S).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many open streams (1)" in refused.exception().details()
    finally:
        release.set()
    assert held.result(timeout=WAIT_S).success


def test_an_upload_whose_client_goes_quiet_is_cancelled_and_leaves_nothing(server_factory, stub_for,
                                                                          models_dir: Path) -> None:
    server = server_factory(stream_limits=StreamLimits(idle_s=0.3))
    release = threading.Event()
    call = stalled_upload(stub_for(server), "quiet.bin", release)
    try:
        assert call.exception(timeout=WAIT_S).code() == grpc.StatusCode.CANCELLED
        assert wait_until(lambda: temp_files(models_dir) == [])
        assert not (models_dir / "quiet.bin").exists()
    finally:
        release.set()


class FakeContext:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def peer(self) -> str:
        return "ipv4:10.0.0.7:5000"

    def cancel(self) -> None:
        self.cancelled.set()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def streaming_handler() -> grpc.RpcMethodHandler:
    return grpc.unary_stream_rpc_method_handler(lambda request, context: iter(["first", "second"]))


def test_a_reader_that_stops_taking_responses_is_cancelled_after_the_idle_limit() -> None:
    clock = Clock()
    streams = StreamLimitInterceptor(StreamLimits(idle_s=10), clock)
    streams.start()
    try:
        handler = streaming_handler()
        context = FakeContext()
        responses = streams.wrap(handler.unary_stream, handler, None)("request", context)
        assert next(responses) == "first"  # handed to gRPC; the client has not taken it yet
        clock.now = 9.0
        assert not context.cancelled.wait(0.5)  # within the limit
        clock.now = 10.5
        assert context.cancelled.wait(WAIT_S)
        responses.close()
    finally:
        streams.close()


def test_time_spent_computing_does_not_count_as_idle() -> None:
    clock, computing, computed = Clock(), threading.Event(), threading.Event()

    def behavior(request: str, context: FakeContext) -> Iterator[str]:
        yield "first"
        computing.set()  # the client took "first"; the next response takes long to compute
        assert computed.wait(WAIT_S)
        yield "second"

    streams = StreamLimitInterceptor(StreamLimits(idle_s=10), clock)
    streams.start()
    try:
        handler = grpc.unary_stream_rpc_method_handler(behavior)
        context = FakeContext()
        responses = streams.wrap(handler.unary_stream, handler, None)("request", context)
        assert next(responses) == "first"
        second = threading.Thread(target=lambda: next(responses))
        second.start()
        assert computing.wait(WAIT_S)
        clock.now = 100.0
        assert not context.cancelled.wait(0.5)  # the watchdog checks several times meanwhile
        computed.set()
        second.join(WAIT_S)
    finally:
        streams.close()
