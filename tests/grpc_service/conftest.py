"""Fixtures for the Draw Things-protocol tests: the independent client (tests/dt_client) on a channel
to a test server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest

from tests.dt_client import MAX_MESSAGE_BYTES, DrawThingsClient, compile_messages


@pytest.fixture(scope="session")
def dt_messages(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) compiles the client's .proto")
    return compile_messages(tmp_path_factory.mktemp("dt_client"))


@pytest.fixture
def dt_connect(dt_messages: ModuleType) -> Iterator[Callable[..., DrawThingsClient]]:
    """connect(running_server, metadata=()) -> a Draw Things client speaking to it."""
    channels: list[grpc.Channel] = []

    def connect(running: Any, metadata: tuple[tuple[str, str], ...] = ()) -> DrawThingsClient:
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        target = f"localhost:{running.port}"
        if running.tls is None:
            channel = grpc.insecure_channel(target, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(running.tls.cert_path).read_bytes())
            channel = grpc.secure_channel(target, credentials, options=options)
        if metadata:
            channel = grpc.intercept_channel(channel, _Metadata(metadata))
        channels.append(channel)
        return DrawThingsClient(channel, dt_messages)

    yield connect
    for channel in channels:
        channel.close()


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata to every call (the documented API's way of sending the secret)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=tuple(details.metadata or ()) + self._metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)
