"""The ImageGenerationService servicer: protobuf <-> domain objects, nothing more.

Errors are raised as library errors and turned into statuses by grpc_service.interceptors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import grpc

from grpc_service.engine import GenerationEngine
from grpc_service.files import ModelDirectory
from grpc_service.generated import imageservice_pb2 as pb
from grpc_service.generated import imageservice_pb2_grpc as pb_grpc
from mlx_sd.errors import InvalidRequest
from mlx_sd.events import EventType, GenerationResult, ProgressEvent
from mlx_sd.request import GenerationRequest

ECHO_MESSAGE = "HELLO"
_EVENT_TYPES = frozenset(EventType)  # IntEnum members compare equal to their ints


def request_from_proto(message: pb.ImageGenerationRequest) -> GenerationRequest:
    return GenerationRequest(
        prompt=message.prompt,
        negative_prompt=message.negative_prompt,
        width=message.width,
        height=message.height,
        steps=message.steps,
        cfg_scale=message.cfg_scale,
        seed=message.seed,
        sampler=message.sampler,
        restore_faces=message.restore_faces,
        enable_hr=message.enable_hr,
        denoising_strength=message.denoising_strength,
        batch_size=message.batch_size,
        batch_count=message.batch_count,
    )


def response_from_item(item: ProgressEvent | GenerationResult) -> pb.ImageGenerationResponse:
    if isinstance(item, ProgressEvent):
        event = pb.SignpostEvent(name=item.name, timestamp=item.timestamp_ms, type=int(item.type))
        return pb.ImageGenerationResponse(events=[event])
    return pb.ImageGenerationResponse(images=item.images, info=item.info)


_PROTO_FIELDS = frozenset(pb.ImageGenerationRequest.DESCRIPTOR.fields_by_name)


def request_to_proto(request: GenerationRequest) -> pb.ImageGenerationRequest:
    """The fields the documented proto carries (same names); domain-only fields are not sent."""
    fields = dataclasses.asdict(request)
    return pb.ImageGenerationRequest(**{name: value for name, value in fields.items() if name in _PROTO_FIELDS})


def items_from_response(message: pb.ImageGenerationResponse) -> Iterator[ProgressEvent | GenerationResult]:
    """The domain items of one streamed response (the client side of `response_from_item`)."""
    for event in message.events:
        if event.type in _EVENT_TYPES:  # proto3 enums are open: skip stages a newer server may add
            yield ProgressEvent(EventType(event.type), event.name, event.timestamp)
    if message.images or message.info:
        yield GenerationResult(list(message.images), list(message.info))


class ImageGenerationServicer(pb_grpc.ImageGenerationServiceServicer):
    def __init__(self, models: ModelDirectory, engine: GenerationEngine) -> None:
        self._models = models
        self._engine = engine

    def Echo(self, request: pb.EchoRequest, context: grpc.ServicerContext) -> pb.EchoResponse:
        return pb.EchoResponse(message=ECHO_MESSAGE)

    def FilesExist(self, request: pb.FilesExistRequest, context: grpc.ServicerContext) -> pb.FilesExistResponse:
        checks = [self._models.check(name) for name in request.files]
        return pb.FilesExistResponse(
            files=[c.name for c in checks], exists=[c.exists for c in checks], errors=[c.error for c in checks]
        )

    def GenerateImage(
        self, request: pb.ImageGenerationRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ImageGenerationResponse]:
        validated = request_from_proto(request).validated()
        for item in self._engine(validated, lambda: not context.is_active()):
            yield response_from_item(item)

    def UploadFile(
        self, request_iterator: Iterator[pb.UploadFileRequest], context: grpc.ServicerContext
    ) -> pb.UploadFileResponse:
        first = next(request_iterator, None)
        if first is None or not first.filename:
            raise InvalidRequest("filename", "the first message of an upload must name the file")
        upload = self._models.start_upload(first.filename, first.sha256)
        context.add_callback(upload.discard)  # also clean up if the RPC dies while we are blocked
        with upload:
            for chunk in _chunks(first, request_iterator):
                upload.write(chunk)
            upload.commit()
        return pb.UploadFileResponse(success=True, message=f"stored {upload.size} bytes as {first.filename}")


def _chunks(first: pb.UploadFileRequest, rest: Iterable[pb.UploadFileRequest]) -> Iterator[bytes]:
    """The chunks of an upload; later messages may repeat the file name and hash but not change them."""
    yield first.chunk_data
    for message in rest:
        if message.filename and message.filename != first.filename:
            raise InvalidRequest("filename", "changed in the middle of an upload")
        if message.sha256 and message.sha256 != first.sha256:
            raise InvalidRequest("sha256", "changed in the middle of an upload")
        yield message.chunk_data
