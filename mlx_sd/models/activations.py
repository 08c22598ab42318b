"""SiLU, GELU and CLIP's quick GELU, fast on MLX's CPU backend.

MLX's CPU elementwise transcendentals are scalar: `nn.silu` and `nn.gelu` take about 50 ns
per element here, several seconds per 512² UNet step (the GEGLU gates alone hold ~95M values).
On the CPU these compute in numpy instead, whose `exp` is vectorised; on the GPU they are
MLX's own. Blocks are spread over the cores (cpu_threads). GELU is the exact (erf) form that SD-1 was trained with, not the tanh approximation:
erf uses Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7, below fp32's resolution of
the outputs that matter). Like the CPU attention, these evaluate their input.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sd.models import cpu_threads
from mlx_sd.models.cpu_buffers import new_array

# Abramowitz & Stegun 7.1.26: erf(z) = 1 - t(a1 + t(a2 + ...)) exp(-z²), t = 1 / (1 + p z), z >= 0.
_P = 0.3275911
_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _on_cpu() -> bool:
    return mx.default_device() == mx.cpu


# Elements per numpy block: each formula makes ~20 passes, which stay in the L2 cache this way.
BLOCK = 1 << 15


def _rowwise(fn, x: mx.array, width: int) -> mx.array:
    """fn over blocks of rows of x viewed as (rows, x.shape[-1]), each block giving `width` columns,
    spread over the cores and written into a new MLX array of shape (*x.shape[:-1], width)."""
    rows = np.ascontiguousarray(x.astype(mx.float32)).reshape(-1, x.shape[-1])
    result, out = new_array((len(rows), width))
    step = max(1, BLOCK // rows.shape[1])

    def run(first: int, last: int) -> None:
        for start in range(first * step, min(last * step, len(rows)), step):
            out[start:start + step] = fn(rows[start:start + step])

    cpu_threads.for_each_chunk(run, -(-len(rows) // step))
    return result.reshape(*x.shape[:-1], width).astype(x.dtype)


def _numpy(fn, x: mx.array) -> mx.array:
    """An elementwise numpy `fn` over x, in blocks of BLOCK elements."""
    return _rowwise(fn, x.reshape(-1, 1), 1).reshape(x.shape)


def sigmoid_gate(x: np.ndarray, slope: float) -> np.ndarray:
    """x * sigmoid(slope * x) = x / (1 + exp(-slope * x))."""
    y = np.multiply(x, np.float32(-slope))
    with np.errstate(over="ignore"):  # exp(-slope x) = inf for very negative x gives x / inf = -0: the limit
        np.exp(y, out=y)
    y += 1
    np.divide(x, y, out=y)
    return y


def _silu(x: np.ndarray) -> np.ndarray:
    return sigmoid_gate(x, 1.0)


def _quick_gelu(x: np.ndarray) -> np.ndarray:
    return sigmoid_gate(x, 1.702)


def _gelu(x: np.ndarray) -> np.ndarray:
    """x Φ(x), with Φ(x) = 1 - q for x >= 0 and q for x < 0, q = ½ (1 - erf(|x| / √2))."""
    z = np.abs(x) * np.float32(1 / math.sqrt(2))
    t = z * np.float32(_P)
    t += 1
    np.reciprocal(t, out=t)
    poly = np.full_like(t, _A[-1])
    for a in reversed(_A[:-1]):
        poly *= t
        poly += np.float32(a)
    poly *= t
    np.square(z, out=z)
    np.negative(z, out=z)
    np.exp(z, out=z)
    poly *= z  # 1 - erf(|x| / √2)
    poly *= np.float32(0.5)  # q
    poly *= x  # x q
    np.subtract(x, poly, out=poly, where=x >= 0)
    return poly


def silu(x: mx.array) -> mx.array:
    return _numpy(_silu, x) if _on_cpu() else nn.silu(x)


def gelu(x: mx.array) -> mx.array:
    return _numpy(_gelu, x) if _on_cpu() else nn.gelu(x)


def geglu(x: mx.array) -> mx.array:
    """GEGLU's gate: the first half of the last axis times the GELU of the second half; on the CPU
    in one numpy pass over blocks of rows."""
    if not _on_cpu():
        hidden, gate = mx.split(x, 2, axis=-1)
        return hidden * nn.gelu(gate)
    width = x.shape[-1] // 2
    return _rowwise(lambda block: block[:, :width] * _gelu(block[:, width:]), x, width)


def quick_gelu(x: mx.array) -> mx.array:
    """OpenAI CLIP's sigmoid approximation of GELU, x * sigmoid(1.702 x), which its weights were trained with."""
    return _numpy(_quick_gelu, x) if _on_cpu() else x * mx.sigmoid(1.702 * x)
