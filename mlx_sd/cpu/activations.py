"""SiLU, GEGLU and CLIP's quick GELU on the CPU kernels.

MLX's CPU elementwise transcendentals are scalar: `nn.silu` and `nn.gelu` take about 50 ns per
element here, several seconds per 512² UNet step (the GEGLU gates alone hold ~95M values). These
run the fused C kernels (kernels.py) over blocks of rows spread over the cores. GELU is the exact
(erf) form that SD-1 was trained with, not the tanh approximation. Like the CPU attention, they
evaluate their input.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_sd.cpu import kernels


def _sigmoid_gate(x: mx.array, slope: float) -> mx.array:
    """x * sigmoid(slope * x)."""
    return kernels.map_rows(lambda block, out: kernels.sigmoid_gate(block, slope, out), x, x.shape[-1])


def silu(x: mx.array) -> mx.array:
    return _sigmoid_gate(x, 1.0)


def quick_gelu(x: mx.array) -> mx.array:
    """OpenAI CLIP's sigmoid approximation of GELU, x * sigmoid(1.702 x)."""
    return _sigmoid_gate(x, 1.702)


def geglu(x: mx.array) -> mx.array:
    """GEGLU's gate: the first half of the last axis times the (exact) GELU of the second half."""
    return kernels.map_rows(kernels.geglu, x, x.shape[-1] // 2)
