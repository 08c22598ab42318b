"""Fresh MLX arrays that the CPU kernels (and the BLAS) fill in place.

`mx.array(ndarray)` copies at about 2 GB/s here, slower than most of the kernels whose result
it would import. An evaluated MLX array on the CPU exposes its buffer to numpy as a writable
view (the buffer protocol), so the CPU kernels write their results straight into a new MLX
array instead. The array must be new and not yet used by any MLX operation.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def new_array(shape: tuple[int, ...], rows: mx.array | None = None) -> tuple[mx.array, np.ndarray]:
    """A new fp32 MLX array (zeros, or `rows` broadcast to `shape`) and a writable numpy view of
    its buffer."""
    out = mx.zeros(shape, mx.float32)
    if rows is not None:
        # Added to fresh zeros: a contiguous broadcast (or mx.full) of fp32 rows can come back as
        # `rows`' own buffer, or as a stride-0 view, and writing either would corrupt memory.
        out = out + rows.astype(mx.float32)
    mx.eval(out)
    view = np.asarray(out)
    if not (view.flags.c_contiguous and view.flags.writeable):
        raise RuntimeError(f"MLX returned a {view.strides}-strided array for a new {shape} buffer")
    return out, view
