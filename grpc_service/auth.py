"""The optional shared secret: where it comes from, how a client sends it, and how guessing is slowed.

Clients send it on every RPC as the request metadata `authorization: Bearer <secret>`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

AUTH_METADATA_KEY = "authorization"
BEARER_PREFIX = "Bearer "
SHARED_SECRET_ENV = "MLX_SD_SHARED_SECRET"


class SecretError(ValueError):
    """The shared secret was given in conflicting ways, or is empty or unreadable."""


def resolve_shared_secret(value: str | None, file: Path | None) -> str | None:
    """The secret from a flag/environment `value` or from `file` (one trailing newline dropped).

    Reading it from a file keeps it out of `ps` output. None means no secret is used.
    """
    if value is not None and file is not None:
        raise SecretError("give the shared secret either directly or as a file, not both")
    if file is not None:
        refuse_readable_by_others(file, "shared secret file")
        try:
            value = file.read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
        except OSError as exc:
            raise SecretError(f"cannot read the shared secret file: {exc}") from exc
    if value is not None and not value:
        raise SecretError("the shared secret is empty")
    if value is not None and not (value.isascii() and value.isprintable()):
        # gRPC metadata values are printable ASCII: no client could send another secret.
        raise SecretError("the shared secret must be printable ASCII (letters, digits, punctuation, spaces)")
    return value


def refuse_readable_by_others(path: Path, what: str) -> None:
    """Raises SecretError when `path`'s group or others may read or write it (as ssh refuses such
    keys), naming the fix; a file that cannot be inspected is left to the read that follows."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & 0o077:
        raise SecretError(f"the {what} {path} is accessible by other users (mode {mode & 0o777:04o}); "
                          f"make it private with: chmod 600 {path}")


def bearer_metadata(secret: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that authenticates a client (empty when no secret is used)."""
    return ((AUTH_METADATA_KEY, BEARER_PREFIX + secret),) if secret else ()


@dataclass(frozen=True)
class FailureLimit:
    """After `max_failures` failed authentications from one address within `window_s` seconds, the
    server refuses that address, without looking at its secret, for `backoff_s` seconds."""

    max_failures: int = 5
    window_s: float = 60.0
    backoff_s: float = 60.0


def peer_address(peer: str) -> str:
    """The client's address without its port ("ipv4:10.0.0.7:51234" -> "ipv4:10.0.0.7"), so that a
    client cannot escape the limit by opening new connections."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return f"{kind}:{rest.rpartition(':')[0]}"
    return peer


class FailureLimiter:
    """Counts failed authentications per address (see FailureLimit); thread-safe, bounded in memory.

    A failure is forgotten only once it is older than the window: a right secret does not clear the
    count, so interleaving right and wrong guesses does not escape the limit."""

    MAX_TRACKED = 4096  # addresses remembered at once; the oldest are forgotten first

    def __init__(self, limit: FailureLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = limit
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = {}  # address -> times of its recent failures
        self._blocked_until: dict[str, float] = {}

    def blocked_for(self, address: str) -> float:
        """Seconds until `address` may try again; 0 when it may now."""
        with self._lock:
            left = self._blocked_until.get(address, 0.0) - self._clock()
            if left <= 0:
                self._blocked_until.pop(address, None)
            return max(0.0, left)

    def record_failure(self, address: str) -> None:
        now = self._clock()
        with self._lock:
            failures = self._failures.pop(address, deque())
            while failures and failures[0] <= now - self._limit.window_s:
                failures.popleft()
            failures.append(now)
            if len(failures) >= self._limit.max_failures:
                self._blocked_until.pop(address, None)  # re-inserted last, like the failures below
                self._blocked_until[address] = now + self._limit.backoff_s
                failures.clear()
            self._failures[address] = failures  # re-inserted last: dicts keep insertion order
            self._forget_oldest(self._failures)
            self._forget_oldest(self._blocked_until)

    def _forget_oldest(self, table: dict[str, object]) -> None:
        while len(table) > self.MAX_TRACKED:
            del table[next(iter(table))]
