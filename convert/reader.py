"""Checkpoint tensors read from safetensors files into MLX arrays in MLX's layout: `TensorReader`
reads them with `mx.load`, lazily; a faster reader may take its place (mlx_sd.cpu.reader), given to
the loading functions as `reader`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from convert.formats import TensorInfo
from convert.transforms import is_conv, mlx_layout, mlx_shape


@dataclass(frozen=True)
class Request:
    """Tensor `key` of the file at `path`, in PyTorch's layout for a parameter of `target_ndim`
    dimensions, or as stored (None: a converted file); `stream` is where it is re-laid out when
    it goes through mx.load (which reads on `reading_stream(stream)`). `dtype`, if given, is the
    type to cast it to as it is read, where a reader can make that cast; it comes as stored
    otherwise."""

    path: Path
    key: str
    info: TensorInfo
    target_ndim: int | None
    stream: mx.Stream
    dtype: mx.Dtype | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's shape once read."""
        return self.info.shape if self.target_ndim is None else mlx_shape(self.info.shape, self.target_ndim)

    @property
    def transposed(self) -> bool:
        """Whether it is a conv weight whose bytes move (a 1x1 kernel's are already in place)."""
        return (self.target_ndim is not None and is_conv(self.info.shape, self.target_ndim)
                and math.prod(self.info.shape[2:]) > 1)


class TensorReader:
    """Reads groups of tensors through `mx.load`; keeps the files open lazily."""

    def __init__(self) -> None:
        self._loaded: dict[tuple[Path, str], dict[str, mx.array]] = {}

    def read(self, requests: list[Request]) -> list[mx.array]:
        """The requested tensors in MLX's layout, in order, unevaluated."""
        return [self.lazy(r) for r in requests]

    def lazy(self, request: Request) -> mx.array:
        """One tensor through `mx.load`, unevaluated."""
        stream = reading_stream(request.stream)
        tag = (request.path, str(stream))
        if tag not in self._loaded:
            self._loaded[tag] = mx.load(str(request.path), stream=stream)
        tensor, info = self._loaded[tag][request.key], request.info
        stored_rows = tensor.shape[0] if tensor.shape else 0
        if info.shape[:1] != tensor.shape[:1]:  # one part of a fused tensor
            tensor = tensor[info.row_offset: info.row_offset + info.shape[0]]
        if info.row_offset + (info.shape[0] if info.shape else 0) >= stored_rows:
            # Popping (after a fused tensor's last part) lets each source buffer go once the caller
            # no longer needs it.
            self._loaded[tag].pop(request.key)
        if request.target_ndim is None:
            return tensor
        with mx.stream(request.stream):
            return mlx_layout(tensor, request.target_ndim)


def reading_stream(stream: mx.Stream) -> mx.Stream:
    """Where `mx.load` reads for work on `stream`: that stream on the CPU, else the CPU's default
    stream (MLX's Load has no GPU implementation; given a GPU stream, evaluating it fails)."""
    return stream if stream.device == mx.cpu else mx.default_stream(mx.cpu)


# Makes a reader for one load: a TensorReader or a subclass.
ReaderFactory = Callable[[], TensorReader]
