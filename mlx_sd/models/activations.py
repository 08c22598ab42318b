"""SiLU, GEGLU and CLIP's quick GELU, fast on MLX's CPU backend.

MLX's CPU elementwise transcendentals are scalar: `nn.silu` and `nn.gelu` take about 50 ns per
element here, several seconds per 512² UNet step (the GEGLU gates alone hold ~95M values). On
the CPU these run the fused C kernels (cpu_kernels) over blocks of rows spread over the cores;
on the GPU, or where the kernels were not built, they are MLX's own ops. GELU is the exact
(erf) form that SD-1 was trained with, not the tanh approximation. Like the CPU attention, the
CPU forms evaluate their input.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sd.models import cpu_kernels, cpu_threads
from mlx_sd.models.cpu_buffers import new_array

# Values per kernel call: blocks this size keep the input and output in the L2 cache and
# amortise the call.
BLOCK = 1 << 16


def _rowwise(kernel: Callable[[np.ndarray, np.ndarray], None], x: mx.array, width: int) -> mx.array:
    """kernel(rows, out) over blocks of the rows of x viewed as (rows, x.shape[-1]), each block
    filling `width` columns of out, spread over the cores; out is a new MLX array of shape
    (*x.shape[:-1], width)."""
    rows = np.ascontiguousarray(x.astype(mx.float32)).reshape(-1, x.shape[-1])
    result, out = new_array((len(rows), width))
    step = max(1, BLOCK // rows.shape[1])

    def run(first: int, last: int) -> None:
        for start in range(first * step, min(last * step, len(rows)), step):
            kernel(rows[start:start + step], out[start:start + step])

    cpu_threads.for_each_chunk(run, -(-len(rows) // step))
    return result.reshape(*x.shape[:-1], width).astype(x.dtype)


def _sigmoid_gate(x: mx.array, slope: float) -> mx.array:
    """x * sigmoid(slope * x) on the CPU kernels."""
    return _rowwise(lambda block, out: cpu_kernels.sigmoid_gate(block, slope, out), x, x.shape[-1])


def silu(x: mx.array) -> mx.array:
    return _sigmoid_gate(x, 1.0) if cpu_kernels.active() else nn.silu(x)


def quick_gelu(x: mx.array) -> mx.array:
    """OpenAI CLIP's sigmoid approximation of GELU, x * sigmoid(1.702 x), which its weights were trained with."""
    return _sigmoid_gate(x, 1.702) if cpu_kernels.active() else x * mx.sigmoid(1.702 * x)


def geglu(x: mx.array) -> mx.array:
    """GEGLU's gate: the first half of the last axis times the (exact) GELU of the second half."""
    if cpu_kernels.active():
        return _rowwise(cpu_kernels.geglu, x, x.shape[-1] // 2)
    hidden, gate = mx.split(x, 2, axis=-1)
    return hidden * nn.gelu(gate)
