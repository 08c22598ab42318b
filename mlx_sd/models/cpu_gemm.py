"""Convolutions and bf16 matrix products on the CPU, called straight into the fast BLAS.

Two gaps in MLX's CPU backend (measured with benchmarks/cpu_gemm.py on a 2-core AMX Xeon):

- `conv2d` builds an im2col buffer nine times the input (1.5 GiB peak for one 512² VAE layer)
  and reaches 170-350 GFLOP/s. A 3x3 convolution is the sum of nine 1x1 convolutions of shifted
  inputs. Laid out on a zero-padded image flattened to rows of `W + 2` pixels, each shift is a
  constant offset, so each tap is one GEMM reading the padded input in place and accumulating
  into the output (beta = 1): no im2col, a fifth of the memory, and 270-370 GFLOP/s in fp32
  from the same BLAS (1.6x MLX's speed at the VAE's largest layers, even at the UNet's). The
  padding columns produce junk outputs, which are dropped.
- MLX has no bf16 GEMM on the CPU: bf16 weights are widened to fp32 on every call. MKL's
  `cblas_gemm_bf16bf16f32` takes bf16 inputs, accumulates in fp32 and runs on AMX or
  AVX512-BF16 units: 550-1400 GFLOP/s for the convolutions and 500-1000 for the linear layers.

So on the CPU, convolutions go through `conv2d` here, and layers whose weights are stored in
bf16 (`--dtype bfloat16`) compute their products in bf16 with fp32 accumulation, as torch
does for bf16 models. Activations, normalisation and everything else stay fp32. These calls
leave MLX's lazy graph (their inputs are evaluated), as the CPU attention already does. On the
GPU, or with no fast BLAS loaded, nothing here is used.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_sd import backend
from mlx_sd.models.cpu_buffers import new_array

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
# Output rows per GEMM call: large enough to amortise the call, small enough that the rows
# being accumulated by the nine taps stay cache-resident.
BLOCK_ROWS = 4096


@dataclass(frozen=True)
class Gemm:
    """The BLAS entry points: `sgemm` always; `bf16` where MKL and the processor provide it;
    `set_local_threads` (the calling thread's BLAS thread count) with MKL."""

    sgemm: ctypes._CFuncPtr
    bf16: ctypes._CFuncPtr | None
    set_local_threads: ctypes._CFuncPtr | None


def _bind(function: ctypes._CFuncPtr) -> ctypes._CFuncPtr:
    int_, ptr = ctypes.c_int, ctypes.c_void_p
    function.argtypes = [int_, int_, int_, int_, int_, int_, ctypes.c_float, ptr, int_, ptr, int_,
                         ctypes.c_float, ptr, int_]
    function.restype = None
    return function


@functools.cache
def gemm() -> Gemm | None:
    """The fast BLAS that `mlx_sd.backend` loaded, or None (reference BLAS, macOS)."""
    blas = backend.configure()
    if blas.path is None:
        return None
    try:
        library = ctypes.CDLL(str(blas.path))
        sgemm = _bind(library.cblas_sgemm)
    except (OSError, AttributeError):
        return None
    bf16 = getattr(library, "cblas_gemm_bf16bf16f32", None)
    # Without bf16 units MKL emulates the bf16 products, slower than fp32.
    has_units = {"amx_bf16", "avx512_bf16"} & backend.cpu_flags()
    local_threads = getattr(library, "MKL_Set_Num_Threads_Local", None)
    if local_threads is not None:
        local_threads.argtypes, local_threads.restype = [ctypes.c_int], ctypes.c_int
    return Gemm(sgemm, _bind(bf16) if bf16 is not None and has_units else None, local_threads)


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu and gemm() is not None


def uses_bf16(weight: mx.array) -> bool:
    """Whether a layer with this weight computes its products in bf16 here."""
    return weight.dtype == mx.bfloat16 and on_cpu() and gemm().bf16 is not None


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray, transpose_b: bool = False, alpha: float = 1.0) -> None:
    """out = alpha * a @ b (or a @ bᵀ) for fp32 numpy matrices, through the fast BLAS where one is
    loaded (numpy's own otherwise); `out` must be C-contiguous, as it is written in place."""
    if not out.flags.c_contiguous:
        raise ValueError("matmul writes `out` in place: it must be C-contiguous")
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if gemm() is None:
        np.matmul(a, b.T if transpose_b else b, out=out)
        out *= np.float32(alpha)
        return
    m, k = a.shape
    n = out.shape[1]
    gemm().sgemm(ROW_MAJOR, NO_TRANS, TRANS if transpose_b else NO_TRANS, m, n, k, alpha, a.ctypes.data, k,
                 b.ctypes.data, b.shape[1], 0.0, out.ctypes.data, n)


def _operand(x: mx.array, bf16: bool) -> np.ndarray:
    """`x`'s data as a C-contiguous numpy array of the GEMM's input type (bf16 as uint16 bits);
    a view of MLX's buffer when `x` is already contiguous."""
    x = x.astype(mx.bfloat16).view(mx.uint16) if bf16 else x.astype(mx.float32)
    return np.ascontiguousarray(x)


def linear(x: mx.array, weight: mx.array, bias: mx.array | None) -> mx.array:
    """x @ weightᵀ + bias with bf16 products and fp32 accumulation; `weight` is (out, in)."""
    *lead, k = x.shape
    n = weight.shape[0]
    a, b = _operand(x.reshape(-1, k), True), _operand(weight, True)
    y, out = new_array((a.shape[0], n), bias)  # the bias is added by accumulating onto it
    gemm().bf16(ROW_MAJOR, NO_TRANS, TRANS, a.shape[0], n, k, 1.0, a.ctypes.data, k, b.ctypes.data, k,
                0.0 if bias is None else 1.0, out.ctypes.data, n)
    return y.reshape(*lead, n)


def conv2d(x: mx.array, weight: mx.array, bias: mx.array | None, padding: int) -> mx.array:
    """A stride-1 NHWC convolution with an odd square kernel (`weight` is (out, k, k, in)) and
    `padding` = k // 2, as shifted GEMMs; bf16 products when `weight` is bf16, else fp32."""
    bf16 = uses_bf16(weight)
    call, size = (gemm().bf16, 2) if bf16 else (gemm().sgemm, 4)
    batch, height, width, channels = x.shape
    out_channels, kernel = weight.shape[0], weight.shape[1]
    padded = mx.pad(x.astype(mx.bfloat16 if bf16 else mx.float32), [(0, 0), (padding, padding), (padding, padding), (0, 0)])
    source, w = _operand(padded, bf16), _operand(weight, bf16)
    _, rows, row, _ = padded.shape
    # Output pixel p of the flattened padded batch sums input pixels p + dy * row + dx, so the
    # whole batch is one run of rows; those that land in padding are junk and dropped below.
    # The last `reach` rows would read past the end and are never needed.
    reach = (kernel - 1) * (row + 1)
    total = batch * rows * row - reach
    y, out = new_array((batch, rows, row, out_channels))
    taps = kernel * kernel
    for start in range(0, total, BLOCK_ROWS):
        m = min(BLOCK_ROWS, total - start)
        for tap in range(taps):
            shift = start + (tap // kernel) * row + tap % kernel
            # Tap `tap` of the weight, read transposed in place: row o starts at o * taps * C.
            call(ROW_MAJOR, NO_TRANS, TRANS, m, out_channels, channels, 1.0,
                 source.ctypes.data + shift * channels * size, channels,
                 w.ctypes.data + tap * channels * size, taps * channels,
                 1.0 if tap else 0.0, out.ctypes.data + start * out_channels * 4, out_channels)
    y = y[:, :height, :width]
    return y if bias is None else y + bias.astype(mx.float32)  # the add also drops the junk
