"""A Draw Things-protocol client for the tests, written from the protocol's facts alone: its own
message definitions (dt_client.proto, compiled at test time), its own FlatBuffer builder and its own
tensor codec. It imports nothing from grpc_service, so it checks the server rather than mirroring it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import struct
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import flatbuffers
import fpzip
import grpc
import numpy as np

PROTO = Path(__file__).with_name("dt_client.proto")
SERVICE = "/ImageGenerationService/"
MAX_MESSAGE_BYTES = 1024**3  # what Draw Things' clients allow

# GenerationConfiguration: field -> (slot, flatbuffers Builder method, the schema's default).
CONFIG_SLOTS: dict[str, tuple[int, str, Any]] = {
    "start_width": (1, "Uint16", 0), "start_height": (2, "Uint16", 0), "seed": (3, "Uint32", 0),
    "steps": (4, "Uint32", 0), "guidance_scale": (5, "Float32", 0.0), "strength": (6, "Float32", 0.0),
    "model": (7, "string", None), "sampler": (8, "Int8", 0), "batch_count": (9, "Uint32", 1),
    "batch_size": (10, "Uint32", 1), "hires_fix": (11, "Bool", False), "hires_fix_start_width": (12, "Uint16", 0),
    "hires_fix_start_height": (13, "Uint16", 0), "hires_fix_strength": (14, "Float32", 0.7),
    "upscaler": (15, "string", None), "image_guidance_scale": (16, "Float32", 1.5), "seed_mode": (17, "Int8", 0),
    "clip_skip": (18, "Uint32", 1), "controls": (19, "files", None), "loras": (20, "files", None),
    "mask_blur": (21, "Float32", 0.0), "mask_blur_outset": (47, "Int32", 0), "face_restoration": (22, "string", None), "refiner_model": (28, "string", None),
    "original_image_height": (29, "Uint32", 0), "original_image_width": (30, "Uint32", 0), "crop_top": (31, "Int32", 0),
    "crop_left": (32, "Int32", 0), "target_image_height": (33, "Uint32", 0), "target_image_width": (34, "Uint32", 0),
    "negative_original_image_height": (39, "Uint32", 0), "negative_original_image_width": (40, "Uint32", 0),
    "aesthetic_score": (35, "Float32", 6.0), "negative_aesthetic_score": (36, "Float32", 2.5),
    "zero_negative_prompt": (37, "Bool", False), "refiner_start": (38, "Float32", 0.7),
    "sharpness": (48, "Float32", 0.0), "shift": (49, "Float32", 1.0),
    "tiled_decoding": (53, "Bool", False), "stochastic_sampling_gamma": (57, "Float32", 0.3),
    "preserve_original_after_inpaint": (58, "Bool", True), "tiled_diffusion": (59, "Bool", False),
    "upscaler_scale_factor": (63, "Uint8", 0), "t5_text_encoder": (64, "Bool", True), "resolution_dependent_shift": (71, "Bool", True),
    "tea_cache": (75, "Bool", False), "cfg_zero_star": (82, "Bool", False),
}
CONFIG_FIELD_COUNT = 88

HEADER = struct.Struct("<5I12i")
FPZIP, RAW, ZIP = 0xF7217, 0, 0x217
NCHW, NHWC = 0x1, 0x2
U8, F16 = 0x1000, 0x20000


def compile_messages(out_dir: Path) -> ModuleType:
    """dt_client.proto compiled with grpc_tools.protoc into `out_dir` and imported."""
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    argv = ["protoc", f"-I{PROTO.parent}", f"-I{include}", f"--python_out={out_dir}", PROTO.name]
    assert protoc.main(argv) == 0, "protoc failed"
    name = "dt_client_pb2"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, out_dir / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_configuration(explicit: Iterable[str] = (), **fields: Any) -> bytes:
    """A GenerationConfiguration FlatBuffer. Like Draw Things' writers it omits fields equal to their
    default, except those named in `explicit` (written anyway, as some writers do)."""
    builder = flatbuffers.Builder(1024)
    offsets = {}
    for name, value in fields.items():  # strings and vectors go before the table that refers to them
        kind = CONFIG_SLOTS[name][1]
        if kind == "string":
            offsets[name] = builder.CreateString(value)
        elif kind == "files":
            tables = []
            for entry in value:  # a file name, or a LoRA's (file, weight, mode)
                file, *rest = (entry,) if isinstance(entry, str) else entry
                file_offset = builder.CreateString(file)
                builder.StartObject(3)
                builder.PrependUOffsetTRelativeSlot(0, file_offset, 0)
                if rest:
                    builder.PrependFloat32Slot(1, rest[0], 0.6)
                    builder.PrependInt8Slot(2, rest[1], 0)
                tables.append(builder.EndObject())
            builder.StartVector(4, len(tables), 4)
            for table in reversed(tables):
                builder.PrependUOffsetTRelative(table)
            offsets[name] = builder.EndVector()
    builder.StartObject(CONFIG_FIELD_COUNT)
    for name, value in fields.items():
        slot, kind, default = CONFIG_SLOTS[name]
        if name in offsets:
            builder.PrependUOffsetTRelativeSlot(slot, offsets[name], 0)
        elif name in explicit:
            getattr(builder, f"Prepend{kind}")(value)
            builder.Slot(slot)
        else:
            getattr(builder, f"Prepend{kind}Slot")(slot, value, default)
    builder.Finish(builder.EndObject())
    return bytes(builder.Output())


def image_tensor(pixels: np.ndarray, compress: bool = False) -> bytes:
    """(H, W, 3) uint8 as an fp16 NHWC image tensor in [-1, 1], as third-party clients send images."""
    values = (pixels.astype(np.float32) / 127.5 - 1.0).astype(np.float16)[None]
    payload, codec = values.tobytes(), RAW
    if compress:
        payload, codec = fpzip.compress(values.astype(np.float32), precision=19, order="C"), FPZIP
    return HEADER.pack(codec, 1, NHWC, F16, 0, *values.shape, *[0] * 8) + payload


def decode_tensor(data: bytes) -> np.ndarray:
    """A tensor from the server: (N, H, W, C) float32 (from fp16)."""
    codec, _memory, layout, datatype, _reserved, *dims = HEADER.unpack_from(data)
    assert (layout, datatype) == (NHWC, F16)
    shape = tuple(d for d in dims if d)
    payload = data[HEADER.size:]
    if codec == FPZIP:
        values = fpzip.decompress(payload, order="C").astype(np.float16)
    else:
        assert codec == RAW
        values = np.frombuffer(payload, dtype=np.float16)
    return values.reshape(shape).astype(np.float32)


def decode_image(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 pixels of an image tensor: (v + 1) * 127.5, rounded and clamped."""
    (image,) = decode_tensor(data)
    return np.clip(np.rint((image + 1.0) * 127.5), 0, 255).astype(np.uint8)


def codec_of(data: bytes) -> int:
    return HEADER.unpack_from(data)[0]


class DrawThingsClient:
    def __init__(self, channel: grpc.Channel, messages: ModuleType) -> None:
        self.pb = messages
        self._channel = channel

    def _unary(self, rpc: str, request: Any, reply: type, **kwargs: Any) -> Any:
        call = self._channel.unary_unary(SERVICE + rpc, request_serializer=type(request).SerializeToString,
                                         response_deserializer=reply.FromString)
        return call(request, **kwargs)

    def echo(self, name: str = "tests", secret: str | None = None) -> Any:
        request = self.pb.EchoRequest(name=name)
        if secret is not None:
            request.sharedSecret = secret
        return self._unary("Echo", request, self.pb.EchoReply)

    def files_exist(self, files: list[str], with_hash: list[str] = (), secret: str | None = None) -> Any:
        request = self.pb.FileListRequest(files=files, filesWithHash=with_hash)
        if secret is not None:
            request.sharedSecret = secret
        return self._unary("FilesExist", request, self.pb.FileExistenceResponse)

    def generate(self, request: Any, **kwargs: Any) -> Iterator[Any]:
        call = self._channel.unary_stream(SERVICE + "GenerateImage", request_serializer=type(request).SerializeToString,
                                          response_deserializer=self.pb.GenerateResponse.FromString)
        return call(request, **kwargs)

    def upload_stream(self, messages: Iterator[Any]) -> Iterator[Any]:
        call = self._channel.stream_stream(SERVICE + "UploadFile",
                                           request_serializer=self.pb.UploadRequest.SerializeToString,
                                           response_deserializer=self.pb.UploadReply.FromString)
        return call(messages)

    def upload_messages(self, name: str, data: bytes, chunk: int, secret: str | None = None,
                        skip_at: int | None = None) -> list[Any]:
        """An upload's messages: the initRequest, then chunks (leaving out the one at `skip_at`)."""
        extra = {} if secret is None else {"sharedSecret": secret}
        init = self.pb.UploadInit(filename=name, sha256=hashlib.sha256(data).digest(), totalSize=len(data))
        messages = [self.pb.UploadRequest(initRequest=init, **extra)]
        for offset in range(0, len(data), chunk):
            if offset != skip_at:
                piece = self.pb.UploadChunk(content=data[offset:offset + chunk], offset=offset)
                messages.append(self.pb.UploadRequest(chunk=piece, **extra))
        return messages


def collect_images(responses: Iterable[Any]) -> tuple[list[bytes], list[Any]]:
    """The images of a GenerateImage stream, pieces joined (MORE_CHUNKS ... LAST_CHUNK), and the
    progress messages."""
    images, progress, pending = [], [], b""
    for response in responses:
        if response.generatedImages:
            (piece,) = response.generatedImages
            pending += piece
            if response.chunkState == 0:
                images.append(pending)
                pending = b""
        else:
            progress.append(response)
    assert not pending, "a chunked image never got its LAST_CHUNK"
    return images, progress
