"""What idle connections do to the server: Echo on an open channel while many are held, and how
soon the server closes connections that never finish their handshake.

    .venv/bin/python benchmarks/held_connections.py [--connections 1500] [--calls 200]

Opens --connections raw TCP connections to a server (more than its connection cap when the default
is used) that send nothing, times Echo on a channel opened before them, tries a new channel, and
measures how long the server takes to close the silent connections (its handshake timeout).
Writes benchmarks/results/held_connections.md.
"""

from __future__ import annotations

import argparse
import resource
import selectors
import socket
import time

import grpc
from harness import percentile, tiny_server, write_report
from latency_under_load import measure

from grpc_service.client import open_channel
from grpc_service.generated import imageservice_pb2 as pb
from grpc_service.generated import imageservice_pb2_grpc as pb_grpc
from grpc_service.server import HANDSHAKE_S, default_max_connections, raise_open_file_limit


def closed_within(sockets: list[socket.socket], timeout: float) -> float | None:
    """Seconds until the server has closed every socket, or None if it had not within `timeout`."""
    started, selector = time.monotonic(), selectors.DefaultSelector()
    for sock in sockets:
        selector.register(sock, selectors.EVENT_READ)
    open_count = len(sockets)
    while open_count and time.monotonic() - started < timeout:
        for key, _ in selector.select(timeout=1.0):
            if not key.fileobj.recv(4096):
                selector.unregister(key.fileobj)
                open_count -= 1
    return time.monotonic() - started if not open_count else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1500)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    raise_open_file_limit()
    cap = default_max_connections()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)

    with tiny_server() as server:
        stub = server.stub()
        probe = {"Echo": lambda: stub.Echo(pb.EchoRequest(), timeout=30)}
        measure(probe, 10)
        idle = measure(probe, args.calls)
        silent = [socket.create_connection(("127.0.0.1", server.running.port)) for _ in range(args.connections)]
        held = measure(probe, args.calls)
        with open_channel(server.client) as channel:
            try:
                pb_grpc.ImageGenerationServiceStub(channel).Echo(pb.EchoRequest(), timeout=5)
                new_channel = "answered"
            except grpc.RpcError as error:
                new_channel = f"refused ({error.code().name}): the cap is full"
        closed = closed_within(silent, HANDSHAKE_S * 6)
        for sock in silent:
            sock.close()

    body = (f"Descriptor limit {soft}; connection cap {cap}; {args.connections} silent TCP connections held.\n\n"
            "| Echo on an open channel | p50 ms | p99 ms |\n| --- | --- | --- |\n"
            f"| idle | {percentile(idle['Echo'], 50):.1f} | {percentile(idle['Echo'], 99):.1f} |\n"
            f"| connections held | {percentile(held['Echo'], 50):.1f} | {percentile(held['Echo'], 99):.1f} |\n\n"
            f"- A new channel while they are held: {new_channel}.\n"
            f"- The server closed every silent connection after "
            f"{'%.1f s' % closed if closed is not None else 'more than %.0f s' % (HANDSHAKE_S * 6)} "
            f"(handshake timeout {HANDSHAKE_S:.0f} s).\n")
    write_report("held_connections", "Echo while idle connections are held", body)


if __name__ == "__main__":
    main()
