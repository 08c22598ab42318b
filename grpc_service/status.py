"""The one table that maps library errors to gRPC status codes."""

from __future__ import annotations

import grpc

from mlx_sd.errors import CheckpointError, InvalidRequest, MlxSdError, ModelNotFound, QueueFull, Unimplemented

# First match wins, so subclasses come before their bases. CheckpointError is INTERNAL (not
# FAILED_PRECONDITION) because the spec's clients know only the statuses it lists; a full queue
# is RESOURCE_EXHAUSTED, gRPC's "try again later".
STATUS_BY_ERROR: tuple[tuple[type[MlxSdError], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (CheckpointError, grpc.StatusCode.INTERNAL),
    (MlxSdError, grpc.StatusCode.INTERNAL),
)

INTERNAL_ERROR_DETAILS = "internal server error (the cause is in the server's log)"


def status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and details a client sees for `error`; unexpected errors reveal nothing."""
    for error_type, code in STATUS_BY_ERROR:
        if isinstance(error, error_type):
            return code, str(error)
    return grpc.StatusCode.INTERNAL, INTERNAL_ERROR_DETAILS
