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
    if rows is None:
        out = mx.zeros(shape, mx.float32)
    else:
        out = mx.contiguous(mx.broadcast_to(rows.astype(mx.float32), shape))
    mx.eval(out)
    return out, np.asarray(out)
