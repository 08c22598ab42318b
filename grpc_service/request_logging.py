"""One log line per RPC: request id, RPC name, peer, key parameters, duration and outcome.

    rpc 3f2a9c1e GenerateImage peer=ipv4:192.168.1.7:52110 size=512x512 steps=20 sampler='Euler a'
        batch=1x1 seed=-1 -> OK 12.41s   (one line in the log; the request's own values, 0 = default)

Prompts, the names asked about by FilesExist and whether credentials were sent appear only at
DEBUG, on a line of their own with the same id; the shared secret itself is never logged. The interceptor goes
first in the chain, so refused calls (UNAUTHENTICATED) are logged too.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from grpc_service.auth import AUTH_METADATA_KEY
from grpc_service.drawthings.config import read_configuration
from grpc_service.drawthings.servicer import SERVICE as DRAW_THINGS_SERVICE
from grpc_service.interceptors import Behavior, BehaviorInterceptor, MalformedMessage
from mlx_sd.engine.errors import InvalidRequest

log = logging.getLogger("mlx_sd.requests")


@dataclass
class _Call:
    """What is known about one RPC; uploads fill in the file as its messages arrive."""

    request_id: str
    rpc: str
    peer: str
    parameters: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def finish(self, outcome: str) -> None:
        shown = "".join(f" {key}={value}" for key, value in self.parameters.items())
        elapsed = time.monotonic() - self.started
        log.info("rpc %s %s peer=%s%s -> %s %.2fs", self.request_id, self.rpc, self.peer, shown, outcome, elapsed)


def _parameters(rpc: str, request: Any) -> dict[str, Any]:
    """The key, non-secret parameters of a unary request, for the INFO line."""
    if isinstance(request, MalformedMessage):
        return {"request": "malformed"}
    if rpc == "GenerateImage":
        return {
            "size": f"{request.width}x{request.height}",
            "steps": request.steps,
            "sampler": repr(request.sampler),
            "batch": f"{request.batch_size}x{request.batch_count}",
            "seed": request.seed,
        }
    if rpc == "FilesExist":
        return {"files": len(request.files)}
    if rpc == DRAW_THINGS + "GenerateImage":
        return {"user": repr(request.user), **_configuration_parameters(request.configuration)}
    if rpc == DRAW_THINGS + "FilesExist":
        return {"files": len(request.files), "hashes": len(request.filesWithHash)}
    return {}


def _configuration_parameters(data: bytes) -> dict[str, Any]:
    try:
        config = read_configuration(data)
    except InvalidRequest:
        return {"configuration": "malformed"}
    return {
        "size": f"{config['start_width'] * 64}x{config['start_height'] * 64}",
        "steps": config["steps"],
        "sampler": config["sampler"],
        "batch": f"{config['batch_size']}x{config['batch_count']}",
        "seed": config["seed"],
        "model": repr(config["model"]),
    }


def _debug_details(rpc: str, request: Any) -> dict[str, Any]:
    if isinstance(request, MalformedMessage):
        return {}
    if rpc == "GenerateImage":
        return {"prompt": repr(request.prompt), "negative_prompt": repr(request.negative_prompt)}
    if rpc == "FilesExist":
        return {"names": list(request.files)}
    if rpc == DRAW_THINGS + "GenerateImage":
        return {"prompt": repr(request.prompt), "negative_prompt": repr(request.negativePrompt)}
    if rpc == DRAW_THINGS + "FilesExist":
        return {"names": list(request.files)}
    return {}


def _outcome(context: grpc.ServicerContext, failed: bool) -> str:
    """The status the RPC ends with: the one set by abort or set_code, else what grpc sends."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if not failed:
        return "OK"
    return "CANCELLED" if not context.is_active() else "UNKNOWN"


DRAW_THINGS = "DrawThings/"  # how Draw Things' RPCs are named in the log, apart from the documented API's


class RequestLogInterceptor(BehaviorInterceptor):
    def wrap(self, behavior: Behavior, handler: grpc.RpcMethodHandler, call: grpc.HandlerCallDetails) -> Behavior:
        service, _, rpc = call.method.lstrip("/").rpartition("/")
        if service == DRAW_THINGS_SERVICE:
            rpc = DRAW_THINGS + rpc
        has_credentials = any(key == AUTH_METADATA_KEY for key, _ in call.invocation_metadata or ())
        return _logged(rpc, has_credentials, behavior, handler.request_streaming, handler.response_streaming)


def _logged(
    rpc: str, has_credentials: bool, behavior: Behavior, streams_requests: bool, streams_responses: bool
) -> Behavior:
    def start(request: Any, context: grpc.ServicerContext) -> tuple[_Call, Any]:
        call = _Call(uuid.uuid4().hex[:8], rpc, context.peer())
        if streams_requests:
            request = _watched_upload(request, call)
        else:
            call.parameters.update(_parameters(rpc, request))
        if log.isEnabledFor(logging.DEBUG):
            details = {"authorization": "sent" if has_credentials else "none"}
            if not streams_requests:
                details.update(_debug_details(rpc, request))
            log.debug("rpc %s %s %s", call.request_id, rpc, " ".join(f"{k}={v}" for k, v in details.items()))
        return call, request

    if streams_responses:

        def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call, request = start(request, context)
            outcome = None
            try:
                yield from behavior(request, context)
            except GeneratorExit:  # the client went away mid-stream
                outcome = "CANCELLED"
                raise
            except BaseException:
                outcome = _outcome(context, failed=True)
                raise
            finally:
                call.finish(outcome or _outcome(context, failed=False))

        return streaming

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        call, request = start(request, context)
        outcome = None
        try:
            return behavior(request, context)
        except BaseException:
            outcome = _outcome(context, failed=True)
            raise
        finally:
            call.finish(outcome or _outcome(context, failed=False))

    return unary


def _watched_upload(messages: Iterator[Any], call: _Call) -> Iterator[Any]:
    """Passes an upload's messages through, noting its file name and the bytes received."""
    call.parameters.update(file=None, bytes=0)
    for message in messages:
        if isinstance(message, MalformedMessage):
            call.parameters["request"] = "malformed"
        else:
            name, data = _upload_parts(message)
            if call.parameters["file"] is None and name:
                call.parameters["file"] = repr(name)
            call.parameters["bytes"] += len(data)
        yield message


def _upload_parts(message: Any) -> tuple[str, bytes]:
    """The file name and data an upload message carries (the documented API's or Draw Things')."""
    if hasattr(message, "chunk_data"):
        return message.filename, message.chunk_data
    if message.WhichOneof("request") == "initRequest":
        return message.initRequest.filename, b""
    return "", message.chunk.content
