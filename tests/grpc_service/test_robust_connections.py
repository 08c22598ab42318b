"""Connections are capped, idle ones closed, and the descriptor limit raised at start."""

from __future__ import annotations

import resource
import socket
import sys
import threading
import time

import grpc
import pytest

from grpc_service.client import open_channel
from grpc_service.generated import imageservice_pb2 as pb
from grpc_service.generated import imageservice_pb2_grpc as pb_grpc
from grpc_service.server import default_max_connections, raise_open_file_limit
from tests.conftest import client_settings

WAIT_S = 60.0


def echo_succeeds(running) -> bool:
    with open_channel(client_settings(running)) as channel:
        try:
            pb_grpc.ImageGenerationServiceStub(channel).Echo(pb.EchoRequest(), timeout=5)
            return True
        except grpc.RpcError as error:
            assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            return False


def test_connections_beyond_the_cap_are_refused_until_some_close(server_factory) -> None:
    running = server_factory(tls=False, max_connections=3)
    idle = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(3)]
    try:
        assert not echo_succeeds(running)
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + WAIT_S
    while not echo_succeeds(running):  # once the server has seen them close
        assert time.monotonic() < deadline


def test_a_connection_without_calls_is_closed_after_the_idle_time(server_factory) -> None:
    running = server_factory(tls=False, connection_idle_s=0.5)
    states: list[grpc.ChannelConnectivity] = []
    went_idle = threading.Event()

    def watch(state: grpc.ChannelConnectivity) -> None:
        states.append(state)
        if grpc.ChannelConnectivity.READY in states and state is grpc.ChannelConnectivity.IDLE:
            went_idle.set()

    with open_channel(client_settings(running)) as channel:
        channel.subscribe(watch)
        pb_grpc.ImageGenerationServiceStub(channel).Echo(pb.EchoRequest(), timeout=WAIT_S)
        assert went_idle.wait(WAIT_S)  # the server said goodbye; the channel reconnects when next used
        assert pb_grpc.ImageGenerationServiceStub(channel).Echo(pb.EchoRequest(), timeout=WAIT_S).message == "HELLO"
        channel.unsubscribe(watch)


@pytest.fixture
def low_file_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
    yield hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_open_file_limit_is_raised_to_the_hard_limit(low_file_limit: int) -> None:
    assert default_max_connections() == 128  # half of 256
    # macOS (or an unlimited hard limit) allows no soft limit above OPEN_MAX.
    expected = min(low_file_limit, 10240) if sys.platform == "darwin" or low_file_limit == resource.RLIM_INFINITY \
        else low_file_limit
    assert raise_open_file_limit() == expected
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == expected
