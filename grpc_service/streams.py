"""Bounds on streaming calls, so that clients that open streams and go quiet cannot take the server.

The server answers each call on a thread of a fixed pool, and a streaming call holds its thread
while it waits on the client: for the next upload chunk, or for a reader to take the next
response. So streaming calls are capped, in all and per client address (beyond the caps:
RESOURCE_EXHAUSTED at once), and a call that waits on its client for longer than the idle limit
is cancelled, which ends an upload without keeping anything. The pool has room for every
stream the caps allow and still for unary calls, so Echo and FilesExist keep answering.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from grpc_service.auth import peer_address
from grpc_service.interceptors import Behavior, BehaviorInterceptor


@dataclass(frozen=True)
class StreamLimits:
    max_streams: int = 32  # streaming calls open at once, from all clients
    max_streams_per_address: int = 8
    idle_s: float = 60.0  # how long a stream may wait on its client before it is cancelled


class _Watch:
    """One open stream: since when it has been waiting on its client (None: it is not)."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.context = context
        self.waiting_since: float | None = None


class StreamLimitInterceptor(BehaviorInterceptor):
    """Caps open streaming calls, and cancels those whose client has been quiet for `idle_s`."""

    def __init__(self, limits: StreamLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits
        self._clock = clock
        self._lock = threading.Lock()  # guards the two fields below
        self._per_address: Counter[str] = Counter()
        self._watches: set[_Watch] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch_idle, name="stream-watchdog", daemon=True)

    def start(self) -> None:
        """Starts the watchdog that cancels idle streams."""
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def wrap(self, behavior: Behavior, handler: grpc.RpcMethodHandler, call: grpc.HandlerCallDetails) -> Behavior:
        if not (handler.request_streaming or handler.response_streaming):
            return behavior
        streams_requests = handler.request_streaming

        def admit(request: Any, context: grpc.ServicerContext) -> tuple[str, _Watch]:
            address = peer_address(context.peer())
            with self._lock:
                refusal = self._refusal(address)
                if refusal is None:
                    self._per_address[address] += 1
                    watch = _Watch(context)
                    self._watches.add(watch)
            if refusal is not None:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
            return address, watch

        def release(address: str, watch: _Watch) -> None:
            with self._lock:
                self._watches.discard(watch)
                self._per_address[address] -= 1
                if not self._per_address[address]:
                    del self._per_address[address]

        if handler.response_streaming:

            def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                address, watch = admit(request, context)
                try:
                    if streams_requests:
                        request = self._watched(request, watch)
                    for response in behavior(request, context):
                        watch.waiting_since = self._clock()  # until the client has taken it
                        yield response
                        watch.waiting_since = None
                finally:
                    release(address, watch)

            return streaming

        def unary_response(requests: Iterable[Any], context: grpc.ServicerContext) -> Any:
            address, watch = admit(requests, context)
            try:
                return behavior(self._watched(requests, watch), context)
            finally:
                release(address, watch)

        return unary_response

    def _refusal(self, address: str) -> str | None:
        if len(self._watches) >= self._limits.max_streams:
            return f"too many open streams ({self._limits.max_streams}); try again later"
        if self._per_address[address] >= self._limits.max_streams_per_address:
            return (f"too many open streams from this address ({self._limits.max_streams_per_address}); "
                    "finish one first")
        return None

    def _watched(self, requests: Iterable[Any], watch: _Watch) -> Iterator[Any]:
        iterator = iter(requests)
        while True:
            watch.waiting_since = self._clock()  # until the client's next message arrives
            try:
                message = next(iterator)
            except StopIteration:
                return
            finally:
                watch.waiting_since = None
            yield message

    def _watch_idle(self) -> None:
        """Cancels streams that wait on their client for longer than the idle limit."""
        period = min(1.0, self._limits.idle_s / 4)
        while not self._stop.wait(period):
            now = self._clock()
            with self._lock:
                idle = [w for w in self._watches
                        if w.waiting_since is not None and now - w.waiting_since > self._limits.idle_s]
            for watch in idle:
                watch.context.cancel()
