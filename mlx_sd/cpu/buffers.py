"""Fresh MLX arrays that the CPU kernels (and the BLAS) fill in place.

`mx.array(ndarray)` copies at about 2 GB/s here, slower than most of the kernels whose result
it would import. An evaluated MLX array on the CPU exposes its buffer to numpy as a writable
view (the buffer protocol), so the CPU kernels write their results straight into a new MLX
array instead. The array must be new and not yet used by any MLX operation.

MLX's Python API can only make such an array filled (`mx.zeros`), a pass over memory that the
kernels then overwrite: 0.3 s of a 512² UNet step, which makes about 1.8 GiB of outputs. The
optional extension `_uninitialized` (uninitialized.cpp, built at install where MLX's headers
and nanobind are) makes them without the fill; without it, or built against another MLX
version, the arrays are zero-filled.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable

import mlx.core as mx
import numpy as np

_log = logging.getLogger(__name__)


@functools.cache
def _unfilled() -> Callable[[list[int], mx.Dtype], mx.array] | None:
    """The extension's array maker, where it was built against the MLX now loaded."""
    try:
        extension = importlib.import_module("mlx_sd.cpu._uninitialized")
    except ImportError:
        return None
    if mx.__version__.split(".dev")[0] != extension.mlx_version:
        _log.warning("mlx_sd's _uninitialized was built for MLX %s, not %s: new CPU arrays are zero-filled "
                     "until mlx-sd is reinstalled (pip install -e .)", extension.mlx_version, mx.__version__)
        return None
    try:
        # Built with a nanobind whose internals differ from MLX's, it cannot hand over MLX arrays.
        extension.empty([1], mx.float32)
    except TypeError as exc:
        _log.warning("mlx_sd's _uninitialized cannot make MLX arrays here (%s): new CPU arrays are zero-filled",
                     exc)
        return None
    return extension.empty


def unfilled(shape: tuple[int, ...], dtype: mx.Dtype) -> mx.array | None:
    """A new evaluated MLX array of unspecified contents, or None where the extension is not."""
    make = _unfilled()
    return None if make is None else make(list(shape), dtype)


def new_array(shape: tuple[int, ...], dtype: mx.Dtype = mx.float32) -> tuple[mx.array, np.ndarray]:
    """A new fp32 (or bf16) MLX array of unspecified contents and a writable numpy view of its
    buffer (bf16 as uint16 bits)."""
    out = unfilled(shape, dtype)
    if out is None:
        out = mx.zeros(shape, dtype)
        mx.eval(out)
    view = np.asarray(out) if dtype == mx.float32 else bf16_view(out)
    if view is None or not (view.flags.c_contiguous and view.flags.writeable):
        raise RuntimeError(f"MLX returned an unwritable or strided array for a new {shape} buffer")
    return out, view


def bf16_view(x: mx.array) -> np.ndarray | None:
    """A bf16 array evaluated, its buffer seen as uint16 bits (numpy has no bf16), without an MLX
    op; None unless x is a C-contiguous bf16 array. Each MLX op evaluated here would be a round
    trip to MLX's stream thread (10-90 µs on a VM whose idle cores halt, against 2 µs for the
    buffer)."""
    if x.dtype != mx.bfloat16:
        return None
    buffer = memoryview(x)
    return np.frombuffer(buffer.cast("B"), np.uint16).reshape(x.shape) if buffer.c_contiguous else None


def as_fp32(x: mx.array) -> np.ndarray:
    """x evaluated, as a C-contiguous float32 numpy array: MLX's own buffer where x is float32, and
    bf16 widened in numpy (a bf16 value's bits are a float32's top half), not with an MLX op
    (see `bf16_view`)."""
    bits = bf16_view(x)
    if bits is not None:
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return np.ascontiguousarray(x if x.dtype == mx.float32 else x.astype(mx.float32))
