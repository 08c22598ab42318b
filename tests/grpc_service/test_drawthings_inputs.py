"""Draw Things input tensors: decoded exactly, hostile ones refused by name or read within bounds."""

from __future__ import annotations

import hashlib
import zlib

import fpzip
import numpy as np
import pytest

from grpc_service.drawthings import inputs, tensors
from grpc_service.generated import drawthings_pb2 as pb
from mlx_sd.engine.errors import InvalidRequest, UnsupportedSetting
from tests.dt_client import HEADER, image_tensor


def tensor(values: np.ndarray, datatype: int, layout: int = tensors.NHWC, codec: int = tensors.RAW,
           payload: bytes | None = None) -> bytes:
    body = values.tobytes() if payload is None else payload
    return HEADER.pack(codec, 1, layout, datatype, 0, *values.shape, *[0] * (12 - values.ndim)) + body


def picture() -> np.ndarray:
    return (np.arange(8 * 6 * 3) % 256).astype(np.uint8).reshape(8, 6, 3)


@pytest.mark.parametrize("compress", [False, True])
def test_an_image_tensor_gives_back_its_pixels(compress: bool) -> None:
    source = inputs.source(pb.ImageGenerationRequest(image=image_tensor(picture(), compress)))
    assert np.array_equal(source.image, picture()) and source.mask is None


def test_a_key_resolves_through_contents_and_a_dangling_key_is_absent() -> None:
    data = image_tensor(picture())
    key = hashlib.sha256(data).digest()
    assert np.array_equal(inputs.source(pb.ImageGenerationRequest(image=key, contents=[data])).image, picture())
    assert inputs.source(pb.ImageGenerationRequest(image=key)) is None


def test_mask_values_keep_where_the_low_bits_are_three() -> None:
    levels = np.array([[3, 1, 2, 4, 0x83, 0x81]] * 8, np.uint8)
    for codec, payload in ((tensors.RAW, None), (tensors.ZIP, zlib.compress(levels.tobytes())[2:-4])):
        mask = tensor(levels, tensors.U8, tensors.NCHW, codec, payload)
        source = inputs.source(pb.ImageGenerationRequest(image=image_tensor(picture()), mask=mask))
        assert source.mask[0].tolist() == [0, 255, 255, 255, 0, 255]


def test_a_truncated_or_corrupt_fpzip_body_is_refused_and_the_process_survives() -> None:
    # Such bodies crash fpzip's decoder (a segmentation fault in-process); the child process takes it.
    values = (picture().astype(np.float32) / 127.5 - 1)[None]
    stream = fpzip.compress(values, precision=19, order="C")
    for body in (stream[: len(stream) // 2], stream[:40]):  # each crashes the decoder (measured)
        with pytest.raises(InvalidRequest) as caught:
            tensors.decode(tensor(values, tensors.F16, codec=tensors.FPZIP, payload=body), "image")
        assert caught.value.field == "image" and "fpzip" in str(caught.value)
    # a corrupt body that decodes gives garbage values, but exactly the declared ones
    _, decoded = tensors.decode(tensor(values, tensors.F16, codec=tensors.FPZIP,
                                       payload=stream[:30] + bytes(range(256)) * 2), "image")
    assert decoded.shape == (1, 8, 6, 3)


@pytest.mark.parametrize(("field", "data", "message"), [
    ("image", tensor(np.zeros((1, 8, 6, 3), np.uint8), tensors.U8), "floats"),
    ("image", tensor(np.zeros((1, 8, 6, 4), np.float16), tensors.F16), "[1, H, W, 3]"),
    ("image", tensor(np.zeros((1, 3, 8, 6), np.float16), tensors.F16, tensors.NCHW), "NHWC"),
    ("mask", tensor(np.zeros((8, 6), np.float16), tensors.F16, tensors.NCHW), "uint8"),
    ("mask", tensor(np.zeros((2, 8, 6), np.uint8), tensors.U8, tensors.NCHW), "uint8"),
    ("mask", tensor(np.zeros((8, 5), np.uint8), tensors.U8, tensors.NCHW), "size"),
])
def test_malformed_inputs_are_refused_by_name(field: str, data: bytes, message: str) -> None:
    fields = {"image": image_tensor(picture()), field: data}
    with pytest.raises(InvalidRequest) as caught:
        inputs.source(pb.ImageGenerationRequest(**fields))
    assert caught.value.field == field and message in str(caught.value)


def test_hints_are_refused() -> None:
    hint = pb.HintProto(hintType="depth", tensors=[pb.TensorAndWeight(tensor=image_tensor(picture()))])
    with pytest.raises(UnsupportedSetting):
        inputs.source(pb.ImageGenerationRequest(hints=[hint]))
