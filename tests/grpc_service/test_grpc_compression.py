"""Responses are gzip-compressed unless disabled: measured as bytes on the wire through a relay."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from grpc_service.files import MAX_NAMES_PER_CALL
from grpc_service.generated import imageservice_pb2 as pb

# Highly compressible: the most names one call takes, similar ones, about 57 KB in the FilesExist response.
NAMES = [f"stable-diffusion/checkpoints/some-model-variant-{i:05d}.safetensors" for i in range(MAX_NAMES_PER_CALL)]
RESPONSE_BYTES = pb.FilesExistResponse(files=NAMES, exists=[False] * len(NAMES), errors=[""] * len(NAMES)).ByteSize()


class CountingRelay:
    """Forwards TCP connections on a loopback port to `target_port`, counting the bytes it relays back."""

    def __init__(self, target_port: int) -> None:
        self.downstream_bytes = 0
        self._lock = threading.Lock()
        self._target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self._target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, downstream: bool) -> None:
        try:
            while data := source.recv(65536):
                if downstream:
                    with self._lock:
                        self.downstream_bytes += len(data)
                sink.sendall(data)
        except OSError:
            pass  # the other direction already closed the pair
        finally:
            source.close()
            sink.close()

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def relay_to() -> Iterator:
    relays: list[CountingRelay] = []

    def make(port: int) -> CountingRelay:
        relays.append(CountingRelay(port))
        return relays[-1]

    yield make
    for relay in relays:
        relay.close()


def bytes_received_for_files_exist(server, relay_to, connect) -> int:
    relay = relay_to(server.port)
    client = connect(server, server=f"localhost:{relay.port}")
    assert len(client.files_exist(NAMES)) == len(NAMES)
    return relay.downstream_bytes


def test_responses_are_gzip_compressed(server, relay_to, connect) -> None:
    assert bytes_received_for_files_exist(server, relay_to, connect) < RESPONSE_BYTES / 5


def test_compression_can_be_turned_off(server_factory, relay_to, connect) -> None:
    server = server_factory(response_compression=False)
    assert bytes_received_for_files_exist(server, relay_to, connect) > RESPONSE_BYTES
