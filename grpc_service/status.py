"""The one table that maps library errors to gRPC status codes."""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from mlx_sd.engine.errors import (
    CheckpointError,
    ChecksumMismatch,
    InvalidRequest,
    MissingWeights,
    MlxSdError,
    ModelNotFound,
    ResourceExhausted,
    ShuttingDown,
    UnsupportedModelFormat,
    UnsupportedSetting,
)

# First match wins, so subclasses come before their bases. CheckpointError is INTERNAL (not
# FAILED_PRECONDITION) because the spec's clients know only the statuses it lists; a full queue
# (or memory, or disk) is RESOURCE_EXHAUSTED, gRPC's "try again later"; an upload whose bytes do not
# match their declared SHA-256 is DATA_LOSS (resend it), not INVALID_ARGUMENT (fix the request).
STATUS_BY_ERROR: tuple[tuple[type[MlxSdError], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (MissingWeights, grpc.StatusCode.FAILED_PRECONDITION),  # the issue asks for it: install, then retry
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (UnsupportedSetting, grpc.StatusCode.FAILED_PRECONDITION),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ChecksumMismatch, grpc.StatusCode.DATA_LOSS),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (UnsupportedModelFormat, grpc.StatusCode.FAILED_PRECONDITION),  # the client names another file
    (CheckpointError, grpc.StatusCode.INTERNAL),
    (MlxSdError, grpc.StatusCode.INTERNAL),
)

INTERNAL_ERROR_DETAILS = "internal server error (the cause is in the server's log)"
# Details travel in trailing metadata, which clients cap (8 KiB by default) after percent-encoding
# (up to 3 bytes a character); messages that quote a hostile client's strings are cut to fit.
MAX_DETAILS_CHARS = 1000


class Refused(Exception):
    """A refusal decided by the server layer itself (a protocol's rule, not a library error), with
    the status to answer."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


def status_for(error: Exception, models_root: Path | None = None) -> tuple[grpc.StatusCode, str]:
    """The status and details a client sees for `error`; unexpected errors reveal nothing, and files
    in `models_root` are named relative to it (the server's own paths are not the client's business)."""
    if isinstance(error, Refused):
        return error.code, str(error)[:MAX_DETAILS_CHARS]
    for error_type, code in STATUS_BY_ERROR:
        if isinstance(error, error_type):
            details = str(error)
            if models_root is not None:
                details = details.replace(f"{models_root}{os.sep}", "").replace(str(models_root), "the model directory")
            return code, details if len(details) <= MAX_DETAILS_CHARS else details[: MAX_DETAILS_CHARS - 1] + "…"
    return grpc.StatusCode.INTERNAL, INTERNAL_ERROR_DETAILS
