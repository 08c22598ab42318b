"""Checkpoint tensors read from safetensors files into MLX arrays in MLX's layout, on every core:
the CPU backend's reader for the loading functions of `convert` (their `reader` argument).

`mx.load` reads a file's tensors one after another, on one thread whichever stream it is
given, and conv weights are then transposed into MLX's channels-last layout: a second copy and a
second set of fresh pages for 58% of SD-1.5's 2 GiB. Here each tensor is written once, straight
into a new, unfilled MLX array of its final layout (`buffers.unfilled`), in pieces of rows
that one thread per core shares out by cost: plain tensors with `preadv`, conv weights a few
output channels at a time through a small scratch buffer, transposed on the way
(`kernels.transpose_taps`). Each piece's pages are mapped in with one system call before it
is written (`runtime.populate`). An fp16 SD-1.5 single-file load took 0.68-0.70 s here, against
1.02 s through `mx.load` (`benchmarks/run_sd15.py --stages load_cold`): 0.83 s without the
mapping, 0.75 s with numpy's transpose, 0.74 s with whole tensors for each thread. Tensors
whose cast the CPU kernels make (fp16 or bf16 to fp32, fp16 or fp32 to bf16) are cast on the
way too, so a bf16 or fp32 load of an fp16 checkpoint writes each tensor once. Where the
unfilled arrays are not available (the optional extension was not built), or for a dtype MLX
does not hold, tensors come from `mx.load`, lazily (convert.reader.TensorReader).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from convert.reader import Request, TensorReader
from mlx_sd.cpu import runtime
from mlx_sd.cpu import buffers, kernels, threads
from mlx_sd.engine.errors import CheckpointError

DTYPES = {"F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32, "F64": mx.float64, "I64": mx.int64,
          "I32": mx.int32, "I16": mx.int16, "I8": mx.int8, "U8": mx.uint8, "BOOL": mx.bool_}
CHUNK = 16 << 20  # bytes per preadv call
# Conv weights and tensors cast as they are read go this many bytes at a time through scratch
# that stays in the cache, then are transposed and/or cast into place.
SCRATCH_BYTES = 1 << 20
# Tensors are read in pieces of about this many bytes (whole rows), which the threads share out
# by cost: a conv weight, transposed on the way, costs about TRANSPOSE_COST times a plain read of
# the same size (1.65 against 2.15 GB/s here). Whole tensors had left one thread 20% busier.
PIECE_BYTES = 4 << 20
TRANSPOSE_COST = 1.3


class ParallelTensorReader(TensorReader):
    def read(self, requests: list[Request]) -> list[mx.array]:
        """The requested tensors in MLX's layout, in order: read now, on every core, where they
        can be; else `mx.load`'s, unevaluated."""
        arrays = [_new_array(r) for r in requests]
        _read_in_parallel([(r, a) for r, a in zip(requests, arrays) if a is not None and a.size])
        return [a if a is not None else self.lazy(r) for r, a in zip(requests, arrays)]


def _new_array(request: Request) -> mx.array | None:
    info = request.info
    dtype = DTYPES.get(info.dtype)
    if dtype is None:
        return None
    converts = kernels.kernels() is not None and (dtype, request.dtype) in kernels.CONVERSIONS
    return buffers.unfilled(request.shape, request.dtype if converts else dtype)


@dataclass(frozen=True)
class _Piece:
    """Rows [first, last) (along the first axis) of one request's tensor, and what reading them costs."""

    request: Request
    array: mx.array
    first: int
    last: int

    @property
    def cost(self) -> float:
        size = self.array.nbytes * (self.last - self.first) / _rows(self.request)
        return size * (TRANSPOSE_COST if self.request.transposed else 1.0)


def _rows(request: Request) -> int:
    return request.info.shape[0] if request.info.shape else 1


def _pieces(jobs: list[tuple[Request, mx.array]]) -> list[_Piece]:
    """The jobs in pieces of about PIECE_BYTES rows, so that the shares can be even."""
    pieces = []
    for request, array in jobs:
        rows = _rows(request)
        parts = max(1, min(rows, array.nbytes // PIECE_BYTES))
        pieces += [_Piece(request, array, rows * p // parts, rows * (p + 1) // parts) for p in range(parts)]
    return pieces


def _read_in_parallel(jobs: list[tuple[Request, mx.array]]) -> None:
    """Fills each array from its file, the jobs split into pieces and those into one share of
    about equal cost per core."""
    shares: list[list[_Piece]] = [[] for _ in range(threads.cores())]
    pieces = sorted(_pieces(jobs), key=lambda piece: -piece.cost)
    for piece, share in zip(pieces, threads.least_loaded((piece.cost for piece in pieces), len(shares))):
        shares[share].append(piece)
    files: dict[Path, int] = {}
    try:
        for request, _ in jobs:
            if request.path not in files:
                files[request.path] = os.open(request.path, os.O_RDONLY)

        def read_shares(first: int, last: int) -> None:
            for piece in (piece for share in shares[first:last] for piece in share):
                _read_into(files[piece.request.path], piece)

        threads.for_each_chunk(read_shares, len(shares), sum(array.nbytes for _, array in jobs))
    finally:
        for fd in files.values():
            os.close(fd)


def _read_into(fd: int, piece: _Piece) -> None:
    request, info = piece.request, piece.request.info
    stored, dtype = DTYPES[info.dtype], piece.array.dtype
    row = math.prod(info.shape[1:]) if info.shape else 1
    buffer = memoryview(piece.array).cast("B")[piece.first * row * dtype.size:piece.last * row * dtype.size]
    runtime.populate(np.frombuffer(buffer, np.uint8).ctypes.data, len(buffer))
    start = info.start + piece.first * row * stored.size
    if not request.transposed and dtype == stored:
        _read_at(fd, request, buffer, start)
        return
    # Conv weights, and tensors cast as they are read: runs of rows (output channels, contiguous
    # in OIHW) read into a small scratch, then moved into place, transposed and/or cast. Copied as
    # unsigned integers of the element's size: only the positions change, or the C kernel casts.
    count_total = piece.last - piece.first
    bits = np.dtype(f"u{stored.size}")
    target = np.frombuffer(buffer, np.dtype(f"u{dtype.size}")).reshape(count_total, row)
    rows = max(1, SCRATCH_BYTES // (row * bits.itemsize))
    scratch = np.empty(min(rows, count_total) * row, bits)
    moved = np.empty_like(scratch) if request.transposed and dtype != stored else None
    for first in range(0, count_total, rows):
        count = min(rows, count_total - first)
        part = scratch[:count * row]
        _read_at(fd, request, memoryview(part).cast("B"), start + first * row * bits.itemsize)
        if request.transposed:
            _, i, h, w = info.shape
            into = target[first:first + count] if moved is None else moved[:count * row]
            _transpose(part.reshape(count, i, h, w), into.reshape(count, h, w, i))
            part = into
        if dtype != stored:
            kernels.convert_values(part.reshape(-1), stored, target[first:first + count].reshape(-1), dtype)


def _transpose(source: np.ndarray, out: np.ndarray) -> None:
    """out (O, H, W, C) = source (O, C, H, W): with the C kernel where it is built (2x faster)."""
    if kernels.kernels() is not None and source.itemsize in (2, 4):
        kernels.transpose_taps(source, out)
    else:
        np.copyto(out, source.transpose(0, 2, 3, 1))


def _read_at(fd: int, request: Request, buffer: memoryview, offset: int) -> None:
    done = 0
    while done < len(buffer):
        count = os.preadv(fd, [buffer[done:done + CHUNK]], offset + done)
        if count == 0:
            raise CheckpointError(f"{request.path} ended inside {request.key}: was it changed while loading?")
        done += count
