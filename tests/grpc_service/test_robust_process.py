"""A real `mlx-sd serve` process: SIGKILL in the middle of an upload, and SIGTERM in the middle of work."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from grpc_service.files import UPLOAD_TEMP_PREFIX
from grpc_service.generated import imageservice_pb2 as pb
from grpc_service.generated import imageservice_pb2_grpc as pb_grpc

STARTUP_S = 30.0
EXIT_S = 20.0
SignpostType = pb.SignpostEvent.EventType


class ServeProcess:
    """`mlx-sd serve` on a free loopback port, plaintext; `stub` talks to it."""

    def __init__(self, models_dir: Path, config_dir: Path, *flags: str) -> None:
        command = [sys.executable, "-m", "mlx_sd.app.cli", "serve", str(models_dir), "--host", "127.0.0.1",
                   "--port", "0", "--no-tls", "--no-bonjour", "--no-cache", "--config-dir", str(config_dir), *flags]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        self._listening = threading.Event()
        self.address = ""
        threading.Thread(target=self._read_output, daemon=True).start()
        if not self._listening.wait(STARTUP_S):
            self.process.kill()
            raise AssertionError("the server did not start:\n" + "".join(self.output))
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.ImageGenerationServiceStub(self.channel)

    def _read_output(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if match := re.match(r"listening on (\S+)", line):
                self.address = match.group(1)
                self._listening.set()

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = EXIT_S) -> int:
        return self.process.wait(timeout)

    def close(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def serve(models_dir: Path, config_dir: Path) -> Iterator:
    started: list[ServeProcess] = []

    def start(*flags: str) -> ServeProcess:
        started.append(ServeProcess(models_dir, config_dir, *flags))
        return started[-1]

    yield start
    for process in started:
        process.close()


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(UPLOAD_TEMP_PREFIX)]


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def stalled_upload(stub: pb_grpc.ImageGenerationServiceStub, name: str, release: threading.Event):
    def messages() -> Iterator[pb.UploadFileRequest]:
        yield pb.UploadFileRequest(filename=name, chunk_data=b"new" * 10_000)
        release.wait(EXIT_S)

    return stub.UploadFile.future(messages())


def test_sigkill_mid_upload_leaves_the_target_and_the_next_start_cleans_up(serve, server_factory,
                                                                             models_dir: Path) -> None:
    (models_dir / "model.bin").write_bytes(b"previous version")
    server = serve()
    release = threading.Event()
    call = stalled_upload(server.stub, "model.bin", release)
    try:
        assert wait_until(lambda: any(p.stat().st_size == 30_000 for p in temp_files(models_dir)))
        server.signal(signal.SIGKILL)
        assert server.wait() == -signal.SIGKILL
    finally:
        release.set()
    assert call.exception(timeout=10) is not None
    assert (models_dir / "model.bin").read_bytes() == b"previous version"
    assert len(temp_files(models_dir)) == 1  # what the killed server left

    server_factory(tls=False)  # the next start
    assert temp_files(models_dir) == []
    assert (models_dir / "model.bin").read_bytes() == b"previous version"


def generation(steps: int) -> pb.ImageGenerationRequest:
    return pb.ImageGenerationRequest(prompt="a lighthouse", width=64, height=64, steps=steps, seed=1)


def first_sampling_step(stream) -> None:
    for response in stream:
        if response.events and response.events[0].type == SignpostType.SAMPLING:
            return
    raise AssertionError("the generation ended before sampling")


def test_sigterm_cancels_work_past_the_grace_and_exits_0(serve, tiny_models: Path) -> None:
    server = serve("--shutdown-grace", "0.5")
    stream = server.stub.GenerateImage(generation(steps=150))
    first_sampling_step(stream)
    release = threading.Event()
    upload = stalled_upload(server.stub, "lora.bin", release)
    try:
        assert wait_until(lambda: bool(temp_files(tiny_models)))
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as caught:
            list(stream)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in caught.value.details()
        assert server.wait() == 0
        # Cancelled (above), not waited for: 150 steps would take far longer; the bound catches a hang.
        assert time.monotonic() - signalled < 0.5 + 60
    finally:
        release.set()
    assert upload.exception(timeout=10).code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert temp_files(tiny_models) == [] and not (tiny_models / "lora.bin").exists()
    assert "stopped" in "".join(server.output)


def test_sigterm_lets_work_finish_within_the_grace(serve, tiny_models: Path) -> None:
    # The grace is far longer than 40 tiny steps take even on a loaded machine.
    server = serve("--shutdown-grace", "120")
    stream = server.stub.GenerateImage(generation(steps=40))
    first_sampling_step(stream)
    server.signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            server.stub.Echo(pb.EchoRequest(), timeout=10)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # a loaded machine: ask again
                return False
            # gRPC refuses calls to a stopping server with UNAVAILABLE, or CANCELLED for one that
            # raced the stop into the transport.
            assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            return True
        return False

    assert wait_until(refused, timeout=120)  # no new work while the running one finishes
    assert list(stream)[-1].images  # finished, not cut off
    assert server.wait() == 0
