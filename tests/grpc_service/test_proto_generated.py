"""The committed generated code matches protos/, and the .proto matches the API spec."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from grpc_service.codegen import PROTO_FILES, compile_descriptor_set
from grpc_service.generated import drawthings_pb2 as dt_pb
from grpc_service.generated import imageservice_pb2 as pb

FieldType = descriptor_pb2.FieldDescriptorProto

# The spec's messages: field name -> (number, type, repeated). These never change; fields we
# add take new numbers.
SPEC_MESSAGES = {
    "EchoRequest": {},
    "EchoResponse": {"message": (1, FieldType.TYPE_STRING, False)},
    "FilesExistRequest": {"files": (1, FieldType.TYPE_STRING, True)},
    "FilesExistResponse": {
        "files": (1, FieldType.TYPE_STRING, True),
        "exists": (2, FieldType.TYPE_BOOL, True),
        "errors": (3, FieldType.TYPE_STRING, True),
    },
    "ImageGenerationRequest": {
        "prompt": (1, FieldType.TYPE_STRING, False),
        "negative_prompt": (2, FieldType.TYPE_STRING, False),
        "width": (3, FieldType.TYPE_INT32, False),
        "height": (4, FieldType.TYPE_INT32, False),
        "steps": (5, FieldType.TYPE_INT32, False),
        "cfg_scale": (6, FieldType.TYPE_FLOAT, False),
        "seed": (7, FieldType.TYPE_INT64, False),
        "sampler": (8, FieldType.TYPE_STRING, False),
        "restore_faces": (9, FieldType.TYPE_BOOL, False),
        "enable_hr": (10, FieldType.TYPE_BOOL, False),
        "denoising_strength": (11, FieldType.TYPE_FLOAT, False),
        "batch_size": (12, FieldType.TYPE_INT32, False),
        "batch_count": (13, FieldType.TYPE_INT32, False),
    },
    "ImageGenerationResponse": {
        "images": (1, FieldType.TYPE_BYTES, True),
        "info": (2, FieldType.TYPE_STRING, True),
        "events": (3, FieldType.TYPE_MESSAGE, True),
    },
    "SignpostEvent": {
        "name": (1, FieldType.TYPE_STRING, False),
        "timestamp": (2, FieldType.TYPE_INT64, False),
        "type": (3, FieldType.TYPE_ENUM, False),
    },
    "UploadFileRequest": {
        "filename": (1, FieldType.TYPE_STRING, False),
        "chunk_data": (2, FieldType.TYPE_BYTES, False),
    },
    "UploadFileResponse": {"success": (1, FieldType.TYPE_BOOL, False), "message": (2, FieldType.TYPE_STRING, False)},
    # ours: a request's LoRAs (ImageGenerationRequest.loras, field 30)
    "LoraWeight": {"file": (1, FieldType.TYPE_STRING, False), "weight": (2, FieldType.TYPE_FLOAT, False)},
}
SPEC_EVENT_TYPES = [
    "TEXT_ENCODED",
    "IMAGE_DECODED",
    "IMAGE_ENCODED",
    "SAMPLING",
    "FACE_RESTORED",
    "IMAGE_UPSCALED",
    "SECOND_PASS_IMAGE_DECODED",
    "SECOND_PASS_IMAGE_ENCODED",
    "SECOND_PASS_SAMPLING",
]
SPEC_RPCS = {  # name -> (client streaming, server streaming)
    "Echo": (False, False),
    "FilesExist": (False, False),
    "GenerateImage": (False, True),
    "UploadFile": (True, False),
}


# Draw Things' protocol (docs: /work/shared/spec/drawthings-wire-facts.md): message -> field -> number.
DRAW_THINGS_MESSAGES = {
    "EchoRequest": {"name": 1, "sharedSecret": 2},
    "EchoReply": {"message": 1, "files": 2, "override": 3, "sharedSecretMissing": 4, "thresholds": 5,
                  "serverIdentifier": 6},
    "FileListRequest": {"files": 1, "filesWithHash": 2, "sharedSecret": 3},
    "FileExistenceResponse": {"files": 1, "existences": 2, "hashes": 3},
    "MetadataOverride": {"models": 1, "loras": 2, "controlNets": 3, "textualInversions": 4, "upscalers": 5},
    "ImageGenerationRequest": {"image": 1, "scaleFactor": 2, "mask": 3, "hints": 4, "prompt": 5, "negativePrompt": 6,
                               "configuration": 7, "override": 8, "keywords": 9, "user": 10, "device": 11,
                               "contents": 12, "sharedSecret": 13, "chunked": 14},
    "ImageGenerationResponse": {"generatedImages": 1, "currentSignpost": 2, "signposts": 3, "previewImage": 4,
                                "scaleFactor": 5, "tags": 6, "downloadSize": 7, "chunkState": 8,
                                "remoteDownload": 9, "generatedAudio": 10},
    "FileUploadRequest": {"initRequest": 1, "chunk": 2, "sharedSecret": 3},
    "InitUploadRequest": {"filename": 1, "sha256": 2, "totalSize": 3},
    "FileChunk": {"content": 1, "filename": 2, "offset": 3},
    "UploadResponse": {"chunkUploadSuccess": 1, "receivedOffset": 2, "message": 3, "filename": 4},
}
DRAW_THINGS_RPCS = {
    "GenerateImage": (False, True),
    "FilesExist": (False, False),
    "UploadFile": (True, True),
    "Echo": (False, False),
    "Pubkey": (False, False),
    "Hours": (False, False),
}
DRAW_THINGS_SIGNPOSTS = ["textEncoded", "imageEncoded", "sampling", "imageDecoded", "secondPassImageEncoded",
                         "secondPassSampling", "secondPassImageDecoded", "faceRestored", "imageUpscaled"]
COMMITTED_MODULES = {"imageservice.proto": pb, "drawthings.proto": dt_pb}


def committed_descriptor(module: object = pb) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto embedded, serialized, in a committed *_pb2 module."""
    return descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)


def without_derived_parts(proto: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """Drops what protoc adds to a descriptor set but not to generated code (comments, JSON names)."""
    proto.ClearField("source_code_info")
    pending = list(proto.message_type)
    while pending:
        message = pending.pop()
        pending.extend(message.nested_type)
        for field in message.field:
            field.ClearField("json_name")
    return proto


def test_committed_code_is_not_stale(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) compiles the .proto")
    out = tmp_path / "descriptors.pb"
    compile_descriptor_set(out)
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    assert [f.name for f in compiled.file] == list(PROTO_FILES)
    for fresh in compiled.file:
        assert without_derived_parts(fresh) == committed_descriptor(COMMITTED_MODULES[fresh.name]), (
            f"{fresh.name}: run `python -m grpc_service.codegen` and commit the result")


def test_proto_declares_a_package() -> None:
    assert committed_descriptor().package == "mlxsd.v1"


def test_messages_are_the_specs() -> None:
    messages = {m.name: m for m in committed_descriptor().message_type}
    assert set(messages) == set(SPEC_MESSAGES)
    for name, fields in SPEC_MESSAGES.items():
        actual = {f.name: (f.number, f.type, f.label == FieldType.LABEL_REPEATED) for f in messages[name].field}
        assert {field: actual.get(field) for field in fields} == fields, name
    assert {f.name: f.number for f in messages["UploadFileRequest"].field}["sha256"] == 3  # our addition
    ours = {f.name: (f.number, f.type, f.type_name) for f in messages["ImageGenerationRequest"].field}
    assert ours["loras"] == (30, FieldType.TYPE_MESSAGE, ".mlxsd.v1.LoraWeight")
    assert ours["clip_skip"] == (31, FieldType.TYPE_INT32, "")
    assert messages["ImageGenerationResponse"].field[2].type_name == ".mlxsd.v1.SignpostEvent"
    event_enum = messages["SignpostEvent"].enum_type[0]
    assert event_enum.name == "EventType"
    assert [(v.name, v.number) for v in event_enum.value] == [(n, i) for i, n in enumerate(SPEC_EVENT_TYPES)]


def test_service_has_the_specs_rpcs() -> None:
    (service,) = committed_descriptor().service
    assert service.name == "ImageGenerationService"
    assert {m.name: (m.client_streaming, m.server_streaming) for m in service.method} == SPEC_RPCS


def test_draw_things_service_has_no_package_and_its_rpcs() -> None:
    descriptor = committed_descriptor(dt_pb)
    assert descriptor.package == ""  # the paths are /ImageGenerationService/<Rpc>
    (service,) = descriptor.service
    assert service.name == "ImageGenerationService"
    assert {m.name: (m.client_streaming, m.server_streaming) for m in service.method} == DRAW_THINGS_RPCS


def test_draw_things_messages_have_the_protocols_numbers() -> None:
    messages = {m.name: m for m in committed_descriptor(dt_pb).message_type}
    for name, fields in DRAW_THINGS_MESSAGES.items():
        assert {f.name: f.number for f in messages[name].field} == fields, name
    signpost = messages["ImageGenerationSignpostProto"]
    assert [(f.name, f.number) for f in signpost.field] == [(n, i + 1) for i, n in enumerate(DRAW_THINGS_SIGNPOSTS)]
    assert all(f.HasField("oneof_index") for f in signpost.field)
