"""Server interceptors: the shared-secret check, then errors and unparsable requests mapped to statuses."""

from __future__ import annotations

import abc
import hmac
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from grpc_service.auth import AUTH_METADATA_KEY, BEARER_PREFIX, FailureLimiter, peer_address
from grpc_service.status import Refused, status_for
from mlx_sd.engine.errors import InvalidRequest

log = logging.getLogger(__name__)

Behavior = Callable[[Any, grpc.ServicerContext], Any]

_HANDLER_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


class BehaviorInterceptor(grpc.ServerInterceptor, abc.ABC):
    """An interceptor that wraps the behaviour of every method it serves; subclasses say how."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        attribute, make_handler = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
        return make_handler(
            self.wrap(getattr(handler, attribute), handler, handler_call_details),
            request_deserializer=self.deserializer(handler),
            response_serializer=handler.response_serializer,
        )

    @abc.abstractmethod
    def wrap(self, behavior: Behavior, handler: grpc.RpcMethodHandler, call: grpc.HandlerCallDetails) -> Behavior:
        """The behaviour to run instead of `behavior`, a method of kind `handler` called as `call`."""

    def deserializer(self, handler: grpc.RpcMethodHandler) -> Callable[[bytes], Any] | None:
        """How the requests' bytes become messages: as for the handler this one wraps."""
        return handler.request_deserializer


class MalformedMessage:
    """Stands for request bytes that are not a valid message of the method's type. gRPC answers
    INTERNAL when a deserializer raises, so ours hand this on instead, for the error mapping to
    answer INVALID_ARGUMENT (the request log passes it through)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


@dataclass(frozen=True)
class FieldCredential:
    """A protocol that sends the shared secret in a string field of every request message (Draw
    Things'), rather than as metadata. `refusal`, for a unary RPC, is the response that answers a
    missing or wrong secret instead of an UNAUTHENTICATED status."""

    field: str
    refusal: Callable[[], Any] | None = None


class SharedSecretInterceptor(BehaviorInterceptor):
    """Rejects, before any work is done, every RPC without the shared secret: as metadata
    `authorization: Bearer <secret>`, or in the request field its method's FieldCredential names
    (for a request stream, in every message). Methods in `open_methods` need no secret.

    An address with repeated failures (see `limiter`) is refused with RESOURCE_EXHAUSTED for a
    while, without its secret being compared. The peer's address is known only to the handler's
    context, so the check runs as the first step of the handler.
    """

    def __init__(self, secret: str, limiter: FailureLimiter,
                 field_credentials: Mapping[str, FieldCredential] | None = None,
                 open_methods: frozenset[str] = frozenset()) -> None:
        self._secret = secret.encode()
        self._expected = (BEARER_PREFIX + secret).encode()
        self._limiter = limiter
        self._field_credentials = field_credentials or {}
        self._open_methods = open_methods

    def wrap(self, behavior: Behavior, handler: grpc.RpcMethodHandler, call: grpc.HandlerCallDetails) -> Behavior:
        if call.method in self._open_methods:
            return behavior
        metadata = call.invocation_metadata or ()
        credential = self._field_credentials.get(call.method)
        if handler.request_streaming and credential is not None:
            return self._admitting_stream(behavior, metadata, credential)
        return self._admitting(behavior, metadata, credential)

    def _admitting(self, behavior: Behavior, metadata: tuple[tuple[str, str | bytes], ...],
                   credential: FieldCredential | None) -> Behavior:
        def admitted(request: Any, context: grpc.ServicerContext) -> Any:
            address = self._admissible_address(context)
            if self._authorized(metadata) or self._field_matches(request, credential):
                return behavior(request, context)
            if credential is not None and credential.refusal is not None:
                if self._field_given(request, credential):  # a client probing without a secret is no failure
                    self._limiter.record_failure(address)
                return credential.refusal()
            self._limiter.record_failure(address)
            _reject_unauthenticated(context, credential)

        return admitted

    def _admitting_stream(self, behavior: Behavior, metadata: tuple[tuple[str, str | bytes], ...],
                          credential: FieldCredential) -> Behavior:
        def admitted(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            address = self._admissible_address(context)
            if self._authorized(metadata):
                return behavior(requests, context)
            return behavior(self._checked(requests, credential, address), context)

        return admitted

    def _checked(self, requests: Iterator[Any], credential: FieldCredential, address: str) -> Iterator[Any]:
        """The request stream, each message admitted only with the secret in its field."""
        for request in requests:
            if not self._field_matches(request, credential):
                self._limiter.record_failure(address)
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong shared secret ({credential.field})")
            yield request

    def _admissible_address(self, context: grpc.ServicerContext) -> str:
        address = peer_address(context.peer())
        if (wait := self._limiter.blocked_for(address)) > 0:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"too many failed authentications from this address; try again in {math.ceil(wait)} s")
        return address

    def _authorized(self, metadata: tuple[tuple[str, str | bytes], ...]) -> bool:
        given = [value for key, value in metadata if key == AUTH_METADATA_KEY]
        if len(given) != 1:
            return False
        value = given[0].encode() if isinstance(given[0], str) else given[0]
        return hmac.compare_digest(value, self._expected)

    @staticmethod
    def _field_given(request: Any, credential: FieldCredential) -> bool:
        return bool(getattr(request, credential.field, ""))

    def _field_matches(self, request: Any, credential: FieldCredential | None) -> bool:
        if credential is None or not self._field_given(request, credential):
            return False
        return hmac.compare_digest(getattr(request, credential.field).encode(), self._secret)


def _reject_unauthenticated(context: grpc.ServicerContext, credential: FieldCredential | None) -> None:
    where = "authorization: Bearer <secret>" + (f", or the request's {credential.field}" if credential else "")
    context.abort(grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong shared secret ({where})")


class ErrorStatusInterceptor(BehaviorInterceptor):
    """Turns exceptions escaping a handler into statuses (grpc_service.status, files named relative
    to `models_root`), logging unexpected ones, and requests whose bytes do not parse into
    INVALID_ARGUMENT. It goes last in the chain: the deserializer it gives its handlers is the one
    the outer interceptors copy."""

    def __init__(self, models_root: Path | None = None) -> None:
        self._models_root = models_root

    def wrap(self, behavior: Behavior, handler: grpc.RpcMethodHandler, call: grpc.HandlerCallDetails) -> Behavior:
        return _mapping_errors(call.method, _parsed_requests(behavior, handler.request_streaming),
                               handler.response_streaming, self._models_root)

    def deserializer(self, handler: grpc.RpcMethodHandler) -> Callable[[bytes], Any] | None:
        parse = handler.request_deserializer
        if parse is None:
            return None

        def tolerant(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as error:  # protobuf's DecodeError, or its C implementation's
                return MalformedMessage(error)

        return tolerant


def _parsed(message: Any) -> Any:
    if isinstance(message, MalformedMessage):
        raise InvalidRequest("request", f"not a valid protobuf message for this method ({message.error})")
    return message


def _parsed_requests(behavior: Behavior, streams_requests: bool) -> Behavior:
    """`behavior`, raising InvalidRequest where a request (or a streamed one, as it is reached)
    did not parse."""
    if streams_requests:
        return lambda requests, context: behavior(map(_parsed, requests), context)
    return lambda request, context: behavior(_parsed(request), context)


def _mapping_errors(method: str, behavior: Behavior, streams_responses: bool, models_root: Path | None) -> Behavior:
    if streams_responses:

        def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from behavior(request, context)
            except Exception as error:
                _abort_with_status(method, error, context, models_root)

        return streaming

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except Exception as error:
            _abort_with_status(method, error, context, models_root)

    return unary


def _abort_with_status(method: str, error: Exception, context: grpc.ServicerContext, models_root: Path | None) -> None:
    if not context.is_active():
        # The client cancelled or went away; grpc itself quietly ends RPCs whose request
        # stream broke for that reason, and there is nobody to send a status to.
        raise error
    code, details = status_for(error, models_root)
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed: %s", method, details, exc_info=error)
    context.abort(code, details)
