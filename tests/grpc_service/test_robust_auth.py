"""Per-address rate limiting of failed authentications, in the limiter and over the API."""

from __future__ import annotations

import time

import grpc
import pytest

from grpc_service import interceptors
from grpc_service.auth import FailureLimit, FailureLimiter, peer_address
from grpc_service.generated import imageservice_pb2 as pb

SECRET = "correct horse battery staple"
RIGHT = (("authorization", f"Bearer {SECRET}"),)
WRONG = (("authorization", "Bearer guess"),)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("peer, address", [
    ("ipv4:192.168.1.7:52110", "ipv4:192.168.1.7"),
    ("ipv6:[::1]:40000", "ipv6:[::1]"),
    ("unix:/tmp/socket", "unix:/tmp/socket"),
])
def test_the_port_is_not_part_of_the_address(peer: str, address: str) -> None:
    assert peer_address(peer) == address


def test_failures_within_the_window_block_for_the_backoff() -> None:
    clock = Clock()
    limiter = FailureLimiter(FailureLimit(max_failures=3, window_s=10, backoff_s=30), clock)
    for _ in range(2):
        limiter.record_failure("a")
    assert limiter.blocked_for("a") == 0
    limiter.record_failure("a")
    assert limiter.blocked_for("a") == 30 and limiter.blocked_for("b") == 0  # per address
    clock.now += 29.5
    assert limiter.blocked_for("a") == 0.5
    clock.now += 0.5
    assert limiter.blocked_for("a") == 0


def test_failures_older_than_the_window_are_forgotten() -> None:
    clock = Clock()
    limiter = FailureLimiter(FailureLimit(max_failures=2, window_s=10, backoff_s=30), clock)
    limiter.record_failure("a")
    clock.now += 10
    limiter.record_failure("a")
    assert limiter.blocked_for("a") == 0
    limiter.record_failure("a")
    assert limiter.blocked_for("a") == 30


def test_memory_stays_bounded_under_many_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FailureLimiter, "MAX_TRACKED", 10)
    limiter = FailureLimiter(FailureLimit(max_failures=1, window_s=10, backoff_s=30), Clock())
    for i in range(100):
        limiter.record_failure(f"ipv4:10.0.0.{i}")
    assert len(limiter._failures) <= 10 and len(limiter._blocked_until) <= 10
    assert limiter.blocked_for("ipv4:10.0.0.99") == 30  # the newest are kept


def echo(stub, metadata) -> grpc.StatusCode:
    try:
        stub.Echo(pb.EchoRequest(), metadata=metadata)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_repeated_failures_are_refused_without_comparing_then_let_in_after_the_backoff(
    server_factory, stub_for, monkeypatch: pytest.MonkeyPatch
) -> None:
    comparisons: list[bytes] = []
    compare = interceptors.hmac.compare_digest
    monkeypatch.setattr(interceptors.hmac, "compare_digest", lambda a, b: comparisons.append(a) or compare(a, b))
    server = server_factory(shared_secret=SECRET, auth_failure_limit=FailureLimit(3, window_s=60, backoff_s=1.0))
    stub = stub_for(server)
    assert echo(stub, RIGHT) == grpc.StatusCode.OK
    assert [echo(stub, WRONG) for _ in range(3)] == [grpc.StatusCode.UNAUTHENTICATED] * 3
    compared = len(comparisons)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Echo(pb.EchoRequest(), metadata=RIGHT)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many failed authentications" in caught.value.details()
    assert echo(stub_for(server), WRONG) == grpc.StatusCode.RESOURCE_EXHAUSTED  # a new connection too
    assert len(comparisons) == compared  # refused without looking at the secret
    time.sleep(1.1)
    assert echo(stub, RIGHT) == grpc.StatusCode.OK


def test_right_guesses_between_wrong_ones_do_not_clear_the_count(server_factory, stub_for) -> None:
    server = server_factory(shared_secret=SECRET, auth_failure_limit=FailureLimit(3, window_s=60, backoff_s=60))
    stub = stub_for(server)
    outcomes = [echo(stub, secret) for secret in (WRONG, RIGHT, WRONG, RIGHT, WRONG, RIGHT)]
    assert outcomes == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OK] * 2 + [
        grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED]
