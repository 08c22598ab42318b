"""The ImageGenerationService servicer: protobuf <-> domain objects, nothing more.

Errors are raised as library errors and turned into statuses by grpc_service.interceptors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import grpc

from grpc_service.files import ModelDirectory
from grpc_service.generated import imageservice_pb2 as pb
from grpc_service.generated import imageservice_pb2_grpc as pb_grpc
from mlx_sd.engine import Engine
from mlx_sd.engine.errors import InvalidRequest
from mlx_sd.engine.events import EventType, GenerationResult, ProgressEvent
from mlx_sd.engine.images import encode_png
from mlx_sd.engine.lora import LoraWeight
from mlx_sd.engine.request import GenerationRequest

ECHO_MESSAGE = "HELLO"
_EVENT_TYPES = frozenset(EventType)  # IntEnum members compare equal to their ints


_PROTO_FIELDS = frozenset(pb.ImageGenerationRequest.DESCRIPTOR.fields_by_name)


def request_from_proto(message: pb.ImageGenerationRequest) -> GenerationRequest:
    fields = {name: getattr(message, name) for name in _PROTO_FIELDS}
    fields["loras"] = tuple(LoraWeight(lora.file, lora.weight) for lora in message.loras)
    return GenerationRequest(**fields)


def request_to_proto(request: GenerationRequest) -> pb.ImageGenerationRequest:
    """The request's fields that the API carries; the others keep their defaults on the server."""
    fields = {k: v for k, v in dataclasses.asdict(request).items() if k in _PROTO_FIELDS}
    fields["loras"] = [pb.LoraWeight(file=lora.file, weight=lora.weight) for lora in request.loras]
    return pb.ImageGenerationRequest(**fields)


def response_from_item(item: ProgressEvent | GenerationResult) -> pb.ImageGenerationResponse:
    if isinstance(item, ProgressEvent):
        event = pb.SignpostEvent(name=item.name, timestamp=item.timestamp_ms, type=int(item.type),
                                 step=item.step or 0, total=item.total or 0)
        return pb.ImageGenerationResponse(events=[event])
    infos = [image.parameters.text() for image in item.images]
    return pb.ImageGenerationResponse(images=[encode_png(image.pixels, info) for image, info in zip(item.images, infos)],
                                      info=infos)


@dataclass(frozen=True)
class EncodedImages:
    """A finished run as the API carries it: PNGs with their parameters text."""

    images: list[bytes]
    info: list[str]


def items_from_response(message: pb.ImageGenerationResponse) -> Iterator[ProgressEvent | EncodedImages]:
    """The items of one streamed response (the client side of `response_from_item`)."""
    for event in message.events:
        if event.type in _EVENT_TYPES:  # proto3 enums are open: skip stages a newer server may add
            yield ProgressEvent(EventType(event.type), event.name, event.step or None, event.total or None,
                                timestamp_ms=event.timestamp)
    if message.images or message.info:
        yield EncodedImages(list(message.images), list(message.info))


class ImageGenerationServicer(pb_grpc.ImageGenerationServiceServicer):
    def __init__(self, models: ModelDirectory, engine: Engine) -> None:
        self._models = models
        self._engine = engine

    def Echo(self, request: pb.EchoRequest, context: grpc.ServicerContext) -> pb.EchoResponse:
        return pb.EchoResponse(message=ECHO_MESSAGE)

    def FilesExist(self, request: pb.FilesExistRequest, context: grpc.ServicerContext) -> pb.FilesExistResponse:
        checks = self._models.check_all(request.files)
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
