"""A Draw Things request's input tensors: the image and mask for image to image and inpainting.

Each input is a tensor, or a 32-byte SHA-256 key into the request's `contents` (a key that resolves
to nothing means the input is absent, as the app sends for text to image). The image is an NHWC
[1, H, W, 3] float tensor in [-1, 1]; the mask a uint8 [H, W] tensor (or [1, H, W] / [1, H, W, 1])
whose low three bits say what to do with each pixel: 3 keeps it, anything else (1 regenerate, 2 and
4 partial) repaints it. Partial strengths are not modelled: those pixels are repainted in full.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from grpc_service.drawthings import tensors
from grpc_service.generated import drawthings_pb2 as pb
from mlx_sd.engine.errors import InvalidRequest, UnsupportedSetting
from mlx_sd.engine.init_images import Source

SHA256_KEY_BYTES = 32
KEEP = 3  # the mask's low three bits for a pixel that is kept
_LOW_BITS = 0b111


def source(message: pb.ImageGenerationRequest) -> Source | None:
    """The request's init image and mask; None without an image. Every present input (hints too) must
    be a well-formed tensor; hints (control networks) are refused."""
    contents = {hashlib.sha256(blob).digest(): blob for blob in message.contents}
    image = _present(message, "image", contents)
    mask = _present(message, "mask", contents)
    hints = [(f"hints[{i}].tensors[{j}]", _resolved(t.tensor, contents))
             for i, hint in enumerate(message.hints) for j, t in enumerate(hint.tensors)]
    decoded = {field: tensors.decode(data, field) for field, data in (("image", image), ("mask", mask), *hints) if data}
    if any(field.startswith("hints") for field in decoded):
        raise UnsupportedSetting("hints", "control hints are not supported yet")
    if "image" not in decoded:
        return None
    pixels = _image_pixels(*decoded["image"])
    levels = _mask_levels(*decoded["mask"]) if "mask" in decoded else None
    return Source(pixels, levels).checked()


def _present(message: pb.ImageGenerationRequest, field: str, contents: Mapping[bytes, bytes]) -> bytes:
    return _resolved(getattr(message, field), contents) if message.HasField(field) else b""


def _resolved(data: bytes, contents: Mapping[bytes, bytes]) -> bytes:
    return contents.get(data, b"") if len(data) == SHA256_KEY_BYTES else data


def _image_pixels(info: tensors.TensorInfo, values: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 from [-1, 1] values (non-finite ones black), as clients map them back."""
    if info.format != tensors.NHWC or len(info.shape) != 4 or info.shape[0] != 1 or info.shape[3] != 3:
        raise InvalidRequest("image", f"must be an NHWC [1, H, W, 3] tensor (got {list(info.shape)})")
    if info.datatype == tensors.U8:
        raise InvalidRequest("image", "must hold floats in [-1, 1], not bytes")
    scaled = np.nan_to_num((values[0].astype(np.float32) + 1.0) * 127.5, nan=0.0, posinf=255.0, neginf=0.0)
    return np.round(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def _mask_levels(info: tensors.TensorInfo, values: np.ndarray) -> np.ndarray:
    """(H, W) uint8, 255 where repainted."""
    shape = info.shape
    if info.datatype != tensors.U8 or not (len(shape) == 2 or (len(shape) in (3, 4) and shape[0] == 1
                                                               and (len(shape) == 3 or shape[3] == 1))):
        raise InvalidRequest("mask", f"must be a uint8 [H, W] tensor (got {list(shape)})")
    plane = values.reshape(shape[1:3] if len(shape) > 2 else shape)
    return np.where((plane & _LOW_BITS) == KEEP, 0, 255).astype(np.uint8)
