"""new_array hands out buffers that nothing else holds."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_sd.models.cpu_buffers import new_array


@pytest.mark.parametrize("shape", [(4,), (1, 4), (1, 1, 4), (3, 4)])
def test_writing_a_new_array_leaves_its_rows_alone(shape: tuple[int, ...]) -> None:
    # A bias broadcast to its own shape, or with leading 1s (a batch-1 linear layer, a 1x1
    # image), once came back as the bias's own buffer.
    bias = mx.arange(4).astype(mx.float32)
    mx.eval(bias)
    result, out = new_array(shape, bias)
    np.testing.assert_array_equal(out, np.broadcast_to(np.arange(4, dtype=np.float32), shape))
    out[...] = 99
    assert np.array(bias).tolist() == [0, 1, 2, 3]
    assert (np.array(result) == 99).all()


def test_zeros_by_default() -> None:
    result, out = new_array((2, 3))
    assert result.dtype == mx.float32 and (out == 0).all() and out.flags.writeable
