"""Draw Things' ImageGenerationService over our model store and worker: protocol in, protocol out.

The shared secret, sent in request fields by this protocol, is checked by the server's
SharedSecretInterceptor (see FIELD_CREDENTIALS); errors become statuses in ErrorStatusInterceptor.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from convert.families import SD1, SD2, SDXL
from grpc_service.drawthings import generation
from grpc_service.drawthings.identity import ServerIdentifier
from grpc_service.files import MAX_NAMES_PER_CALL, ModelDirectory
from grpc_service.generated import drawthings_pb2 as pb
from grpc_service.generated import drawthings_pb2_grpc as pb_grpc
from grpc_service.interceptors import FieldCredential
from grpc_service.status import Refused
from mlx_sd.engine import Engine
from mlx_sd.engine.errors import InvalidRequest
from mlx_sd.engine.events import GenerationResult, ProgressEvent
from mlx_sd.engine.model_catalog import catalog
from mlx_sd.engine.model_hash import file_sha256

log = logging.getLogger(__name__)

SERVICE = "ImageGenerationService"  # no package: the paths are /ImageGenerationService/<Rpc>
SHA256_BYTES = 32
# Each family's native side in Draw Things' 64-pixel units (SD 2.x: the 512 base's; a 768-v model's
# size is known once it is loaded, and a request of size 0 gets it).
DEFAULT_SCALES = {family.draw_things_version: family.native_size // generation.SIDE_UNIT for family in (SD1, SD2, SDXL)}


def method(rpc: str) -> str:
    return f"/{SERVICE}/{rpc}"


# Where each RPC's request carries the shared secret; Echo answers a wrong one with
# sharedSecretMissing (status OK), as Draw Things' server does.
FIELD_CREDENTIALS = {
    method("Echo"): FieldCredential("sharedSecret", refusal=lambda: pb.EchoReply(sharedSecretMissing=True)),
    method("FilesExist"): FieldCredential("sharedSecret"),
    method("GenerateImage"): FieldCredential("sharedSecret"),
    method("UploadFile"): FieldCredential("sharedSecret"),
}
# Draw Things answers these without a secret; they reveal nothing.
OPEN_METHODS = frozenset({method("Pubkey"), method("Hours")})


@dataclass(frozen=True)
class WireSettings:
    server_identifier: ServerIdentifier  # the same across restarts of one installation
    model_browser: bool = False  # Echo lists the loadable models (off: a user's files stay private)
    response_compression: bool = True  # fpzip for image and preview tensors
    cache_dir: Path | None = None  # where file SHA-256s are remembered


class DrawThingsServicer(pb_grpc.ImageGenerationServiceServicer):
    def __init__(self, models: ModelDirectory, engine: Engine, settings: WireSettings) -> None:
        self._models = models
        self._engine = engine
        self._settings = settings

    def Echo(self, request: pb.EchoRequest, context: grpc.ServicerContext) -> pb.EchoReply:
        reply = pb.EchoReply(message=f"HELLO {request.name}", serverIdentifier=self._settings.server_identifier.get())
        if self._settings.model_browser:
            self._fill_browser(reply)
        return reply

    def _fill_browser(self, reply: pb.EchoReply) -> None:
        entries = catalog(self._models.root)
        models = [{"file": e.file, "name": e.name, "prefix": "", "version": e.version, "upcast_attention": False,
                   **({"default_scale": DEFAULT_SCALES[e.version]} if e.version in DEFAULT_SCALES else {})}
                  for e in entries if e.kind == "model"]
        upscalers = [{"file": e.file, "name": e.name} for e in entries if e.kind == "upscaler"]
        reply.files.extend(e.file for e in entries if e.kind in ("model", "upscaler"))
        # Every list is sent, empty ones too: clients read all five keys.
        reply.override.CopyFrom(pb.MetadataOverride(
            models=_json(models), loras=_json([]), controlNets=_json([]), textualInversions=_json([]),
            upscalers=_json(upscalers)))

    def FilesExist(self, request: pb.FileListRequest, context: grpc.ServicerContext) -> pb.FileExistenceResponse:
        if len(request.files) + len(request.filesWithHash) > MAX_NAMES_PER_CALL:
            raise InvalidRequest("files", f"at most {MAX_NAMES_PER_CALL} names (files and filesWithHash) per call")
        hashed = set(request.filesWithHash)
        response = pb.FileExistenceResponse()
        for name in request.files:
            exists = self._models.check(name).exists
            response.files.append(name)
            response.existences.append(exists)
            digest = b""
            if exists and name in hashed:  # check() refused unsafe names, so resolve() succeeds
                digest = file_sha256(self._models.resolve(name), self._settings.cache_dir)
            response.hashes.append(digest)
        return response

    def UploadFile(self, requests: Iterator[pb.FileUploadRequest], context: grpc.ServicerContext
                   ) -> Iterator[pb.UploadResponse]:
        first = next(requests, None)
        if first is None or first.WhichOneof("request") != "initRequest":
            raise InvalidRequest("initRequest", "an upload starts with an initRequest")
        init = first.initRequest
        if len(init.sha256) != SHA256_BYTES:
            raise InvalidRequest("sha256", f"must be the file's {SHA256_BYTES}-byte SHA-256")
        if not 0 <= init.totalSize <= self._models.max_upload_bytes:
            raise InvalidRequest("totalSize", f"must be between 0 and the server's limit of "
                                              f"{self._models.max_upload_bytes} bytes (got {init.totalSize})")
        upload = self._models.start_upload(init.filename, init.sha256.hex())
        context.add_callback(upload.discard)  # also clean up if the RPC dies while we are blocked
        with upload:
            yield pb.UploadResponse(chunkUploadSuccess=True, filename=init.filename, message="ready for chunks")
            for message in requests:
                if message.WhichOneof("request") != "chunk":
                    raise InvalidRequest("chunk", "only chunks may follow the initRequest")
                chunk = message.chunk
                if chunk.offset != upload.size:
                    raise Refused(grpc.StatusCode.DATA_LOSS, f"offset: a chunk at {chunk.offset}, but {upload.size} "
                                                             "bytes were received; nothing was kept")
                if upload.size + len(chunk.content) > init.totalSize:
                    raise InvalidRequest("chunk", f"goes past the declared totalSize of {init.totalSize} bytes")
                upload.write(chunk.content)
                yield pb.UploadResponse(chunkUploadSuccess=True, receivedOffset=upload.size,
                                        filename=chunk.filename, message="chunk stored")
            if upload.size != init.totalSize:
                raise InvalidRequest("totalSize", f"{upload.size} bytes arrived, {init.totalSize} were declared")
            upload.commit()
        log.info("stored %d bytes as %s", upload.size, init.filename)

    def GenerateImage(self, request: pb.ImageGenerationRequest, context: grpc.ServicerContext
                      ) -> Iterator[pb.ImageGenerationResponse]:
        validated = generation.generation_request(request)
        signposts = generation.expected_signposts(validated)
        compress = self._settings.response_compression
        context.set_compression(grpc.Compression.NoCompression)  # tensors are fpzip-compressed, or incompressible
        for item in self._engine(validated, lambda: not context.is_active()):
            if isinstance(item, ProgressEvent):
                yield generation.progress_response(item, signposts, compress)
            elif isinstance(item, GenerationResult):
                yield from generation.image_responses(item.images, compress, request.chunked)

    def Pubkey(self, request: pb.PubkeyRequest, context: grpc.ServicerContext) -> pb.PubkeyResponse:
        return pb.PubkeyResponse()

    def Hours(self, request: pb.HoursRequest, context: grpc.ServicerContext) -> pb.HoursResponse:
        return pb.HoursResponse()


def _json(entries: list[dict[str, object]]) -> bytes:
    return json.dumps(entries).encode()
