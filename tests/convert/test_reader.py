"""The CPU backend's reader (mlx_sd.cpu.reader): checkpoint tensors read on every core into MLX's
layout, against mx.load."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from convert.formats import read_header
from convert.reader import Request, reading_stream
from convert.transforms import to_mlx
from mlx_sd.cpu import buffers, kernels, reader
from mlx_sd.cpu.reader import ParallelTensorReader
from mlx_sd.engine.errors import CheckpointError

STREAM = mx.default_stream(mx.cpu)


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """A safetensors file written by hand, so that its header can say anything."""
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "conv": mx.array(rng.standard_normal((5, 3, 3, 3)).astype(np.float16)),  # OIHW
        "conv_bf16": mx.array(rng.standard_normal((4, 6, 1, 3)).astype(np.float32)).astype(mx.bfloat16),
        "one_by_one": mx.array(rng.standard_normal((7, 4, 1, 1)).astype(np.float32)),
        # Wider ones: 16 channels at a time in the C kernel, and a tail of 5 (fp16) or 4 (fp32).
        "conv_wide": mx.array(rng.standard_normal((3, 37, 3, 3)).astype(np.float16)),
        "conv_fp32": mx.array(rng.standard_normal((2, 20, 3, 3)).astype(np.float32)),
        "pointwise": mx.array(rng.standard_normal((6, 5, 1, 1)).astype(np.float32)),  # bytes already in place
        "linear": mx.array(rng.standard_normal((3, 8)).astype(np.float16)),
        "ids": mx.arange(11, dtype=mx.int64),
        "flags": mx.array([True, False, True]),
        "empty": mx.zeros((0, 4), mx.float32),
    }
    path = tmp_path / "weights.safetensors"
    mx.save_safetensors(str(path), arrays)
    return path


# Target dimensions of each tensor's parameter: conv weights stay 4-D, the 1x1 conv feeds a linear.
TARGETS = {"conv": 4, "conv_bf16": 4, "one_by_one": 2, "conv_wide": 4, "conv_fp32": 4, "pointwise": 4, "linear": 2,
           "ids": 1, "flags": 1, "empty": 2}


def read_all(path: Path, layout: bool) -> dict[str, mx.array]:
    tensors = read_header(path).tensors
    requests = [Request(path, k, tensors[k], TARGETS[k] if layout else None, STREAM) for k in TARGETS]
    return dict(zip(TARGETS, ParallelTensorReader().read(requests)))


@pytest.mark.parametrize("layout", [True, False])
@pytest.mark.parametrize("unfilled", [True, False])
@pytest.mark.parametrize("piece_bytes", [reader.PIECE_BYTES, 16], ids=["whole tensors", "pieces of rows"])
def test_tensors_equal_mx_load_in_mlx_layout_or_as_stored(checkpoint: Path, layout: bool, unfilled: bool,
                                                          piece_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    if not unfilled:  # the fallback: mx.load, lazily
        monkeypatch.setattr(buffers, "unfilled", lambda shape, dtype: None)
    monkeypatch.setattr(reader, "PIECE_BYTES", piece_bytes)  # 16: every tensor of several rows in pieces
    got = read_all(checkpoint, layout)
    stored = mx.load(str(checkpoint))
    for key, tensor in got.items():
        expected = to_mlx(stored[key], TARGETS[key], stored[key].dtype) if layout else stored[key]
        assert tensor.dtype == expected.dtype and tensor.shape == expected.shape, key
        assert mx.array_equal(tensor, expected).item(), key


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32, mx.float16])
@pytest.mark.parametrize("piece_bytes", [reader.PIECE_BYTES, 16], ids=["whole tensors", "pieces of rows"])
def test_tensors_are_cast_as_they_are_read_where_the_kernels_make_the_cast(checkpoint: Path, dtype: mx.Dtype,
                                                                          piece_bytes: int,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16, bf16 and fp32 tensors, plain and conv, come in `dtype` where the kernels cast between
    them (to bf16 or fp32), with the values of MLX's own cast; otherwise (to fp16, other types)
    as stored, for the caller to cast."""
    monkeypatch.setattr(reader, "PIECE_BYTES", piece_bytes)
    tensors = read_header(checkpoint).tensors
    requests = [Request(checkpoint, k, tensors[k], TARGETS[k], STREAM, dtype) for k in TARGETS]
    got = dict(zip(TARGETS, ParallelTensorReader().read(requests)))
    stored = mx.load(str(checkpoint))
    for key, tensor in got.items():
        expected = to_mlx(stored[key], TARGETS[key], stored[key].dtype)
        if (expected.dtype, dtype) in kernels.CONVERSIONS:
            expected = expected.astype(dtype)
        assert tensor.dtype == expected.dtype and tensor.shape == expected.shape, key
        assert mx.array_equal(tensor, expected).item(), key
    assert got["conv"].dtype == (mx.float16 if dtype == mx.float16 else dtype)  # an fp16 conv weight


def test_a_tensor_whose_size_disagrees_with_its_shape_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lies.safetensors"
    write_safetensors(path, {"w": ("F32", [4, 4], bytes(60))})
    with pytest.raises(CheckpointError, match="shape \\[4, 4\\] of F32 does not fill its 60 bytes"):
        read_header(path)


def test_offsets_outside_the_data_are_refused_with_the_header(tmp_path: Path) -> None:
    path = tmp_path / "outside.safetensors"
    encoded = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4096]}}).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(16))
    with pytest.raises(CheckpointError, match="outside the 16-byte data section"):
        read_header(path)


@pytest.mark.parametrize("key, ndim", [("linear", 2), ("conv", 4)])
def test_a_file_cut_short_after_its_header_was_read(tmp_path: Path, key: str, ndim: int) -> None:
    path = tmp_path / "cut.safetensors"
    write_safetensors(path, {"conv": ("F16", [2, 2, 3, 3], bytes(72)), "linear": ("F32", [64, 64], bytes(16384))})
    info = read_header(path).tensors[key]
    with path.open("r+b") as f:
        f.truncate(info.start + 8)
    if buffers.unfilled((1,), mx.float32) is None:
        pytest.skip("the fallback reads through mx.load, which raises its own error")
    with pytest.raises(CheckpointError, match=f"ended inside {key}"):
        ParallelTensorReader().read([Request(path, key, info, ndim, STREAM)])


def test_mx_load_reads_on_a_cpu_stream_whatever_stream_the_work_is_on() -> None:
    """MLX's Load primitive has no GPU implementation: on a Mac, where the conversions run on the
    GPU's stream, the reads must still be on a CPU stream."""

    class GpuStream:
        device = "gpu"

    lane = mx.new_stream(mx.cpu)
    assert reading_stream(lane) is lane
    assert reading_stream(GpuStream()) == mx.default_stream(mx.cpu)


HOSTILE_HEADERS = {
    "Infinity in the offsets": (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, Infinity]}}', "Infinity"),
    "NaN in the shape": (b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 16]}}', "NaN"),
    "a float size": (b'{"w": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}', "integers"),
    "a bool size": (b'{"w": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', "integers"),
    "a huge shape": (b'{"w": {"dtype": "F32", "shape": [1099511627776], "data_offsets": [0, 16]}}', "does not fill"),
    "a negative shape": (b'{"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}', "non-negative"),
    "an unknown dtype": (b'{"w": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}}', "unknown dtype 'Q7'"),
    "three offsets": (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8, 16]}}', "two integers"),
    "an entry that is a list": (b'{"w": [1, 2]}', "not an object"),
    "200k nested lists": (b'{"w": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "nests too deeply"),
}


@pytest.mark.parametrize("header, reason", HOSTILE_HEADERS.values(), ids=HOSTILE_HEADERS.keys())
def test_hostile_headers_are_refused_with_a_reason(tmp_path: Path, header: bytes, reason: str) -> None:
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(CheckpointError, match=re.escape(reason)):
        read_header(path)
