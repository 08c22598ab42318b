"""Draw Things' tensor format: a 68-byte little-endian header, then the payload. `encode` writes our
results; `inspect` and `decode` read a client's (image, mask, hints) with every size checked first.

Header: uint32 codec, memory type, format, datatype, reserved; then 12 int32 dimensions (unused
ones 0). The payload is raw, fpzip-compressed (floats) or raw-DEFLATE-compressed. Images are NHWC
[1, H, W, 3] fp16 RGB with value = pixel / 127.5 - 1; previews are latents, NHWC [1, h, w, 4] fp16.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import fpzip
import numpy as np

from mlx_sd.engine.errors import InvalidRequest

_HEADER = struct.Struct("<5I12i")
HEADER_BYTES = _HEADER.size  # 68
RAW, FPZIP, ZIP = 0, 0xF7217, 0x217
CPU_MEMORY = 0x1
NCHW, NHWC, CHWN = 0x1, 0x2, 0x4
U8, F32, F64, F16 = 0x1000, 0x4000, 0x10000, 0x20000
ITEM_BYTES = {U8: 1, F32: 4, F64: 8, F16: 2}
FPZIP_FP16_PRECISION = 19  # sign, 8 exponent and 10 mantissa bits: lossless for fp16 values widened to fp32
MAX_ELEMENTS = 4096 * 4096 * 4  # bounds what a client's tensor may ask the server to decompress


@dataclass(frozen=True)
class TensorInfo:
    """What a client's tensor declares, once its header and payload size were checked."""

    codec: int
    format: int
    datatype: int
    shape: tuple[int, ...]


def encode(array: np.ndarray, compress: bool) -> bytes:
    """An fp16 NHWC tensor of `array` (N, H, W, C), fpzip-compressed when asked and smaller."""
    values = np.ascontiguousarray(array, dtype=np.float16)
    payload, codec = values.tobytes(), RAW
    if compress:
        packed = fpzip.compress(values.astype(np.float32), precision=FPZIP_FP16_PRECISION, order="C")
        if len(packed) < len(payload):
            payload, codec = packed, FPZIP
    dims = list(values.shape) + [0] * (12 - values.ndim)
    return _HEADER.pack(codec, CPU_MEMORY, NHWC, F16, 0, *dims) + payload


def encode_image(pixels: np.ndarray, compress: bool) -> bytes:
    """(H, W, 3) uint8 RGB as Draw Things' image tensor [1, H, W, 3] in [-1, 1]."""
    return encode((pixels.astype(np.float32) / 127.5 - 1.0)[None], compress)


def encode_latents(latents: np.ndarray, compress: bool) -> bytes:
    """(h, w, c) latents as a preview tensor [1, h, w, c], which clients turn into RGB themselves."""
    return encode(latents[None], compress)


def inspect(data: bytes, what: str) -> TensorInfo:
    """Checks a client's tensor: header, codec, datatype, dimensions, and that the payload holds
    exactly the declared elements. Raises InvalidRequest naming `what` otherwise.

    An fpzip payload is checked through its own header (its type and dimensions); its body is not
    decoded here, since fpzip's decoder reads a buffer without knowing its end.
    """
    if len(data) < HEADER_BYTES:
        raise InvalidRequest(what, f"is {len(data)} bytes, shorter than the {HEADER_BYTES}-byte tensor header")
    codec, _memory, layout, datatype, _reserved, *dims = _HEADER.unpack_from(data)
    if codec not in (RAW, FPZIP, ZIP):
        raise InvalidRequest(what, f"has an unknown codec {codec:#x}")
    if datatype not in ITEM_BYTES:
        raise InvalidRequest(what, f"has an unknown datatype {datatype:#x}")
    if layout not in (NCHW, NHWC, CHWN):
        raise InvalidRequest(what, f"has an unknown format {layout:#x}")
    rank = next((i for i, d in enumerate(dims) if d == 0), len(dims))
    shape = tuple(dims[:rank])
    if rank == 0 or any(d <= 0 for d in shape) or any(dims[rank:]):
        raise InvalidRequest(what, f"has invalid dimensions {dims}")
    elements = int(np.prod(shape, dtype=np.int64))
    if elements > MAX_ELEMENTS:
        raise InvalidRequest(what, f"declares {elements} elements; at most {MAX_ELEMENTS} are accepted")
    payload = memoryview(data)[HEADER_BYTES:]
    expected = elements * ITEM_BYTES[datatype]
    if codec == RAW and len(payload) != expected:
        raise InvalidRequest(what, f"holds {len(payload)} bytes of data; its dimensions {list(shape)} need {expected}")
    if codec == ZIP:
        _check_deflate(payload, expected, what)
    if codec == FPZIP:
        _check_fpzip(payload, datatype, elements, what)
    return TensorInfo(codec, layout, datatype, shape)


# fpzip's decoder trusts its stream: a truncated or corrupt body can crash the process (measured with
# the `fpzip` package). A client's stream is therefore decoded in a child process, bounded in time.
_FPZIP_CHILD = ("import sys, fpzip; sys.stdout.buffer.write("
                "fpzip.decompress(sys.stdin.buffer.read(), order='C').astype('<f4').tobytes())")
FPZIP_TIMEOUT_S = 60
_DTYPES = {U8: np.uint8, F32: np.float32, F64: np.float64, F16: np.float16}


def decode(data: bytes, what: str) -> tuple[TensorInfo, np.ndarray]:
    """A client's tensor, checked by `inspect`, and its values in the declared shape and datatype (an
    fpzip stream's as fp32)."""
    info = inspect(data, what)
    payload = bytes(memoryview(data)[HEADER_BYTES:])
    if info.codec == FPZIP:
        return info, _fpzip_values(payload, info.shape, what)
    if info.codec == ZIP:
        payload = zlib.decompress(payload, -zlib.MAX_WBITS)  # its inflated size was checked
    return info, np.frombuffer(payload, dtype=np.dtype(_DTYPES[info.datatype]).newbyteorder("<")).reshape(info.shape)


def _fpzip_values(payload: bytes, shape: tuple[int, ...], what: str) -> np.ndarray:
    try:
        child = subprocess.run([sys.executable, "-c", _FPZIP_CHILD], input=payload, capture_output=True,
                               timeout=FPZIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise InvalidRequest(what, "is an fpzip stream that could not be decoded in time") from exc
    expected = int(np.prod(shape, dtype=np.int64)) * 4
    if child.returncode != 0 or len(child.stdout) != expected:
        raise InvalidRequest(what, "is not a valid fpzip stream")
    return np.frombuffer(child.stdout, dtype="<f4").reshape(shape)


def _check_deflate(payload: memoryview, expected: int, what: str) -> None:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        size = len(inflater.decompress(payload, expected + 1))
    except zlib.error as exc:
        raise InvalidRequest(what, f"is not valid DEFLATE data ({exc})") from exc
    if size != expected or not inflater.eof:
        raise InvalidRequest(what, f"inflates to {'more than ' if size > expected else ''}{size} bytes, not {expected}")


def _check_fpzip(payload: memoryview, datatype: int, elements: int, what: str) -> None:
    if datatype == U8:
        raise InvalidRequest(what, "is fpzip-compressed but holds bytes, not floats")
    try:
        is_double, nx, ny, nz, nf = _fpzip_header(bytes(payload[:64]))
    except (IndexError, ValueError) as exc:
        raise InvalidRequest(what, f"is not a valid fpzip stream ({exc})") from exc
    if is_double != (datatype == F64) or nx * ny * nz * nf != elements:
        raise InvalidRequest(what, f"has an fpzip stream of {nx}x{ny}x{nz}x{nf} {'doubles' if is_double else 'floats'}, "
                                   f"not its header's {elements} elements")


_MASK = 0xFFFFFFFF


def _fpzip_header(data: bytes) -> tuple[bool, int, int, int, int]:
    """(is double, nx, ny, nz, nf) from an fpzip stream's header, range-decoded as fpzip writes it."""
    stream = iter(data)
    low, span, code = 0, _MASK, 0

    def take(count: int) -> None:
        nonlocal code, low
        for _ in range(count):
            code = ((code << 8) | _byte(stream)) & _MASK
            low = (low << 8) & _MASK

    def bits(n: int) -> int:  # at most 16
        nonlocal low, span
        span >>= n
        value = ((code - low) & _MASK) // span
        low = (low + span * value) & _MASK
        while not ((low ^ (low + span)) & _MASK) >> 24:
            take(1)
            span = (span << 8) & _MASK
        if not span >> 16:
            take(2)
            span = -low & _MASK
        return value

    def number(n: int) -> int:
        return bits(n) if n <= 16 else bits(16) + (bits(n - 16) << 16)

    take(4)
    if [number(8) for _ in range(4)] != list(b"fpz\0"):
        raise ValueError("no fpzip magic")
    number(16), number(8)  # format version
    is_double = bool(number(1))
    number(7)  # precision
    nx, ny, nz, nf = (number(32) for _ in range(4))
    return is_double, nx, ny, nz, nf


def _byte(stream: Iterator[int]) -> int:
    value = next(stream, None)
    if value is None:
        raise ValueError("truncated header")
    return value
