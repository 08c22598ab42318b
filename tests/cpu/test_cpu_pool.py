"""The C kernels' thread pool (cpu_pool.c): every kernel gives the same result on the pool as on
one thread, concurrent callers and forked children are served, and it is as large as the cores.

A job touching fewer than 32Ki values runs on the calling thread, so each kernel is compared
over an input large enough for the pool against the same kernel run on pieces small enough not
to use it."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from mlx_sd.cpu import kernels, threads
from mlx_sd.cpu.blas import gemm

SMALL = 1 << 15  # POOL_MIN_VALUES in cpu_pool.h
pytestmark = pytest.mark.skipif(kernels.kernels() is None, reason="the CPU kernels are not built")


def values(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * 3


def test_the_pool_has_a_thread_per_core_where_mkl_limits_each_threads_gemms() -> None:
    mkl = gemm() is not None and gemm().per_thread
    assert kernels.kernels().pool_threads() == (threads.cores() if mkl else 1)


def in_pieces(kernel, x: np.ndarray, out: np.ndarray, rows: int) -> None:
    for start in range(0, len(x), rows):
        kernel(x[start:start + rows], out[start:start + rows])


ROW_KERNELS = {
    "to_bf16": (lambda x, out: kernels.to_bf16(x, out), 1, np.uint16),
    "sigmoid_gate": (lambda x, out: kernels.sigmoid_gate(x, 1.0, out), 1, np.float32),
    "geglu": (kernels.geglu, 0.5, np.float32),
    "layer_norm": (lambda x, out: kernels.layer_norm(x, values(96, seed=1), values(96, seed=2), 1e-5, out), 1,
                   np.float32),
}


@pytest.mark.parametrize("name", ROW_KERNELS)
def test_row_kernels_on_the_pool_match_one_thread(name: str) -> None:
    kernel, width, dtype = ROW_KERNELS[name]
    x = values(1001, 96)  # an odd row count: chunks of unequal length
    whole, pieces = (np.empty((1001, int(96 * width)), dtype) for _ in range(2))
    kernel(x, whole)
    in_pieces(kernel, x, pieces, SMALL // (96 * 3))
    np.testing.assert_array_equal(whole, pieces)


def test_scale_shift_on_the_pool_matches_one_thread() -> None:
    x, scale, offset = values(3, 401, 64), values(3, 64, seed=1), values(3, 64, seed=2)
    whole, pieces = np.empty_like(x), np.empty_like(x)
    kernels.scale_shift(x, scale, offset, True, whole)
    for i in range(3):
        kernels.scale_shift(x[i:i + 1], scale[i:i + 1], offset[i:i + 1], True, pieces[i:i + 1])
    np.testing.assert_array_equal(whole, pieces)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_image_kernels_on_the_pool_match_one_thread(bf16: bool) -> None:
    x = values(2, 37, 29, 24)
    out_type = np.uint16 if bf16 else np.float32
    padded = np.empty((2, 39, 31, 24), out_type)
    kernels.pad_image(x, 1, 0, 78, padded)
    rows = np.empty_like(padded)
    for first in range(0, 78, 7):  # 7 rows of 31x24: under the pool's threshold
        kernels.pad_image(x, 1, first, min(first + 7, 78), rows)
    np.testing.assert_array_equal(padded, rows)

    patches, rows = (np.empty((2 * 37 * 29, 9 * 24), out_type) for _ in range(2))
    kernels.im2col(x, 3, 1, 0, len(patches), patches)
    for first in range(0, len(patches), 100):
        kernels.im2col(x, 3, 1, first, min(first + 100, len(patches)), rows)
    np.testing.assert_array_equal(patches, rows)

    source, bias, residual = values(2, 39, 31, 24, seed=3), values(2, 24, seed=4), values(2, 37, 29, 24, seed=5)
    cropped, rows = np.empty_like(residual), np.empty_like(residual)
    kernels.crop_bias(source, bias, 0, 74, cropped, residual)
    for first in range(0, 74, 10):
        kernels.crop_bias(source, bias, first, min(first + 10, 74), rows, residual)
    np.testing.assert_array_equal(cropped, rows)


def test_concurrent_callers_each_get_their_own_result() -> None:
    """One caller at a time has the pool; the others run their job on their own thread."""
    weight, bias = values(320, seed=1), values(320, seed=2)
    inputs = [values(2048, 320, seed=10 + i) for i in range(4)]
    expected = []
    for x in inputs:
        expected.append(np.empty_like(x))
        kernels.layer_norm(x, weight, bias, 1e-5, expected[-1])
    results = [np.empty_like(x) for x in inputs]

    def run(i: int) -> None:
        for _ in range(20):
            kernels.layer_norm(inputs[i], weight, bias, 1e-5, results[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_runs_its_kernels_on_one_thread() -> None:
    """The pool's threads do not survive a fork: the child must neither wait for them nor fail."""
    x, weight, bias = values(2048, 320), values(320, seed=1), values(320, seed=2)
    expected = np.empty_like(x)
    kernels.layer_norm(x, weight, bias, 1e-5, expected)
    child = os.fork()
    if child == 0:  # only C kernels and numpy here: nothing that needs the parent's other threads
        out = np.empty_like(x)
        kernels.layer_norm(x, weight, bias, 1e-5, out)
        os._exit(0 if kernels.kernels().pool_threads() == 1 and np.array_equal(out, expected) else 1)
    _, status = os.waitpid(child, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
