"""Typed errors of the library; the server maps each to one gRPC status (grpc_service)."""

from __future__ import annotations


class MlxSdError(Exception):
    """Base of every error the library raises on purpose."""


class InvalidRequest(MlxSdError):
    """A request field is out of range or malformed; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelNotFound(MlxSdError):
    """A model file the request needs is missing; `path` names it."""

    def __init__(self, path: str, message: str = "model file not found") -> None:
        super().__init__(f"{message}: {path}")
        self.path = path


class MissingWeights(ModelNotFound):
    """An optional network the request asks for (face restoration) has no weights installed;
    `path` names the missing file. The request cannot run until it is installed."""

    def __init__(self, path: str) -> None:
        super().__init__(path, "weights not installed in the model directory")


class UnsupportedSetting(MlxSdError):
    """A well-formed request setting that would change the image and that we cannot honour yet;
    `setting` names it."""

    def __init__(self, setting: str, why: str) -> None:
        super().__init__(f"{setting}: {why}")
        self.setting = setting


class CheckpointError(MlxSdError):
    """A checkpoint is unreadable, of an unsupported format, or does not match the architecture."""


class UnsupportedModelFormat(CheckpointError):
    """A model file is in a format that is not read (a Draw Things .ckpt database); the message
    says what to put in the model directory instead."""


class ResourceExhausted(MlxSdError):
    """A limit of the server (queue, memory, disk) is reached for now; the client may retry later."""


class QueueFull(ResourceExhausted):
    """The generation queue is at its configured depth; the client may retry later."""

    def __init__(self, depth: int) -> None:
        super().__init__(f"the generation queue is full ({depth} waiting); try again later")
        self.depth = depth


class MemoryBudgetExceeded(ResourceExhausted):
    """A request does not fit in the memory budget beside what is already held."""


class StorageFull(ResourceExhausted):
    """The disk holding the model directory is full."""


class ChecksumMismatch(MlxSdError):
    """Received data does not match the SHA-256 the client declared for it."""


class ShuttingDown(MlxSdError):
    """The server is stopping and takes no new work."""


class RankLost(ShuttingDown):
    """A rank of a group of machines died or stopped answering (mlx_sd.engine.distributed): the
    request ends, and the server exits for its service manager to restart the group."""
