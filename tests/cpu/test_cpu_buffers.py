"""new_array hands out buffers that nothing else holds, unfilled where the extension is built."""

from __future__ import annotations

import importlib
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_sd.cpu import buffers
from mlx_sd.cpu.buffers import new_array


@pytest.mark.skipif(sys.platform != "linux", reason="built where pyproject.toml gives MLX's headers and nanobind")
def test_the_unfilled_arrays_are_built_on_linux() -> None:
    # The install compiles the extension; on Linux a missing one means the build silently failed.
    assert buffers._unfilled() is not None


def test_new_arrays_are_separate_writable_buffers_that_mlx_reads() -> None:
    (first, a), (second, b) = new_array((64, 3)), new_array((64, 3))
    assert first.dtype == mx.float32 and first.shape == (64, 3) and a.flags.writeable
    assert not np.shares_memory(a, b)
    a[...], b[...] = 1.5, np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(np.array(first * 2 + second), np.broadcast_to([3, 4, 5], (64, 3)))


@pytest.mark.parametrize("unfilled", [True, False], ids=["unfilled", "zero-filled"])
def test_new_bf16_arrays_are_written_as_bits(unfilled: bool, monkeypatch) -> None:
    if not unfilled:
        monkeypatch.setattr(buffers, "unfilled", lambda shape, dtype: None)
    array, bits = new_array((4, 5), mx.bfloat16)
    assert array.dtype == mx.bfloat16 and bits.dtype == np.uint16 and bits.shape == (4, 5) and bits.flags.writeable
    bits[...] = 0x3FC0  # 1.5
    assert mx.array_equal(array, mx.full((4, 5), 1.5, mx.bfloat16))


def test_new_arrays_of_nothing_and_of_bad_shapes() -> None:
    empty, view = new_array((0, 5))
    assert empty.shape == (0, 5) and view.size == 0
    if buffers._unfilled() is not None:
        with pytest.raises(ValueError, match="negative"):
            buffers._unfilled()([2, -1], mx.float32)


def test_an_extension_built_for_another_mlx_is_refused(monkeypatch, caplog) -> None:
    try:
        extension = importlib.import_module("mlx_sd.cpu._uninitialized")
    except ImportError:
        pytest.skip("the extension was not built here")
    buffers._unfilled.cache_clear()
    monkeypatch.setattr(extension, "mlx_version", "0.0.1")
    try:
        with caplog.at_level("WARNING"):
            assert buffers._unfilled() is None
            result, out = new_array((2, 3))
        assert "reinstalled" in caplog.text and (out == 0).all()
    finally:
        monkeypatch.undo()
        buffers._unfilled.cache_clear()
    assert buffers._unfilled() is not None


def test_an_extension_that_cannot_make_mlx_arrays_is_refused(monkeypatch, caplog) -> None:
    try:
        extension = importlib.import_module("mlx_sd.cpu._uninitialized")
    except ImportError:
        pytest.skip("the extension was not built here")

    def foreign(shape: list[int], dtype: mx.Dtype) -> mx.array:
        raise TypeError("Unable to convert function return value to a Python type!")

    buffers._unfilled.cache_clear()
    monkeypatch.setattr(extension, "empty", foreign)
    try:
        with caplog.at_level("WARNING"):
            assert buffers._unfilled() is None
        assert "cannot make MLX arrays" in caplog.text
    finally:
        monkeypatch.undo()
        buffers._unfilled.cache_clear()
    assert buffers._unfilled() is not None
