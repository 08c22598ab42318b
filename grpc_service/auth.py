"""The optional shared secret: where it comes from, and how a client sends it.

Clients send it on every RPC as the request metadata `authorization: Bearer <secret>`.
"""

from __future__ import annotations

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
        try:
            value = file.read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
        except OSError as exc:
            raise SecretError(f"cannot read the shared secret file: {exc}") from exc
    if value is not None and not value:
        raise SecretError("the shared secret is empty")
    return value


def bearer_metadata(secret: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that authenticates a client (empty when no secret is used)."""
    return ((AUTH_METADATA_KEY, BEARER_PREFIX + secret),) if secret else ()
