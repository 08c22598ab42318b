"""Tensor layout changes from PyTorch checkpoints to MLX modules, chosen by the two shapes."""

from __future__ import annotations

import mlx.core as mx


def mlx_shape(source: tuple[int, ...], target_ndim: int) -> tuple[int, ...]:
    """The shape `source` takes after `to_mlx` for a parameter of `target_ndim` dimensions."""
    if is_conv(source, target_ndim):  # OIHW -> OHWI
        o, i, h, w = source
        return (o, h, w, i)
    if len(source) == 4 and target_ndim == 2 and source[2:] == (1, 1):  # 1x1 conv stored, linear used
        return source[:2]
    return source


def is_conv(source: tuple[int, ...], target_ndim: int) -> bool:
    """Whether a tensor of shape `source` is a conv weight whose channels move last in MLX."""
    return len(source) == 4 and target_ndim == 4


def mlx_layout(array: mx.array, target_ndim: int) -> mx.array:
    """A checkpoint tensor in MLX's layout (`mlx_shape`), lazily."""
    if is_conv(array.shape, target_ndim):
        return array.transpose(0, 2, 3, 1)
    return array.reshape(mlx_shape(array.shape, target_ndim))


def to_mlx(array: mx.array, target_ndim: int, dtype: mx.Dtype) -> mx.array:
    """Re-lay out and cast one checkpoint tensor (lazily; the caller evaluates).

    The result is made row-contiguous: a transposed view would be copied again by every conv call
    and by the cache writer, which then briefly holds a second copy of all conv weights.
    """
    return mx.contiguous(mlx_layout(array, target_ndim).astype(dtype))
