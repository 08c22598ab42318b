"""Convolutions and bf16 matrix products on the CPU, called straight into the fast BLAS.

Two gaps in MLX's CPU backend (measured with benchmarks/cpu_gemm.py on a 2-core AMX Xeon):

- `conv2d` builds an im2col buffer nine times the input (1.5 GiB peak for one 512² VAE layer)
  and reaches 170-350 GFLOP/s. A 3x3 convolution is the sum of nine 1x1 convolutions of shifted
  inputs. Laid out on a zero-padded image flattened to rows of `W + 2` pixels, each shift is a
  constant offset, so each tap is one GEMM reading the padded input in place and accumulating
  into the output (beta = 1): no im2col, a fifth of the memory, and 270-370 GFLOP/s in fp32
  from the same BLAS (1.6x MLX's speed at the VAE's largest layers, even at the UNet's). The
  padding columns produce junk outputs, which are dropped. The fused kernels (kernels.py)
  write the padded input, already in the GEMM's input type, and the cropped output plus bias,
  on all cores: MLX's pad, cast, slice and add each make a single-threaded pass, which had cost
  as much as the GEMMs at the VAE's 512² layers. Small images (the UNet's 8x8 and 16x16
  levels) instead unfold their input (im2col, also a kernel) into one larger GEMM. Where the
  processor's class takes oneDNN's bf16 GEMM, larger bf16 convolutions run on oneDNN's direct
  convolution instead (onednn.py).
- MLX has no bf16 GEMM on the CPU: bf16 weights are widened to fp32 on every call. A bf16 GEMM
  (bf16 inputs, fp32 sums) is faster where the processor has bf16 units: MKL's on AMX
  (860-1800 GFLOP/s for the convolutions and 730-1150 for the linear layers, 2 cores), oneDNN's
  with AVX-512 BF16 (about 200 GFLOP/s per core on a Zen 4, 2-3x fp32); mlx_sd.cpu.dispatch
  picks it per processor class, and none where bf16 would be slower.

So on the CPU backend, convolutions go through `conv2d` here, and layers whose weights are
stored in bf16 (`--dtype bfloat16`) compute their products in bf16 with fp32 accumulation, as
torch does for bf16 models, where the processor's class has a bf16 GEMM. Activations, normalisation and everything else stay fp32. These
calls leave MLX's lazy graph (their inputs are evaluated), as the CPU attention already does.
With no fast BLAS loaded, the layers (layers.py) keep MLX's ops.
"""

from __future__ import annotations

import ctypes
import math

import mlx.core as mx
import numpy as np

from mlx_sd.cpu import kernels, onednn
from mlx_sd.cpu.blas import gemm
from mlx_sd.cpu.buffers import as_fp32, bf16_view, new_array

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
# Output rows per GEMM call: large enough to amortise the call, small enough that the rows
# being accumulated by the nine taps stay cache-resident.
BLOCK_ROWS = 4096
# Convolutions with at most this many output pixels (over the batch) unfold their input into
# one GEMM of k² C terms: the shifted GEMMs are too small there to keep the BLAS busy (bf16,
# batch 2: 2.7 ms against 5.6 at 8x8x1280, 2.6 against 3.1 at 16x16x640, 9.2 against 11.7 at
# 16x16x1280; even at 32x32, slower beyond; benchmarks/cpu_gemm.py), and the unfolded copy is
# at most a few MiB.
IM2COL_ROWS = 1024
# A shifted convolution sums the batch's taps in fp32 scratch of its padded size; past this size
# (the VAE's 256² and 512² layers, 68-270 MB) it goes in blocks of rows instead, each cropped as
# soon as it is summed: a 512² bf16 VAE decode peaked at 3.1 GiB against 3.4 GiB, in the same
# 2.4-2.6 s. Below it, one run over the whole batch keeps the UNet's GEMMs larger.
SUMS_BYTES = 64 << 20
# Whether bf16 convolutions of more than IM2COL_ROWS pixels take oneDNN's direct convolution where
# this class has it (`gemm().conv`, onednn.py): 0.70-1.02x the time of the shifted GEMMs at the
# VAE's layers, 0.38x at its last (3 outputs), 0.82-0.89x at the UNet's 32² and 64² ones on a
# Zen 4 (benchmarks/cpu_gemm.py). At the UNet's smaller levels the unfolded GEMM was as fast in
# one run and faster in another (8x8x1280: 36 ms against 41): reordering the weights into
# oneDNN's layout, on every call, costs most there. Benchmarks and tests turn it off to run the
# GEMM forms.
DIRECT = True
# Rows per block of feed_forward: each block's projection (up to 10240 wide) and gated
# activations live in reused per-thread scratch. At 128 rows the BLAS calls cost more (33-35 ms
# against 26-28 for the 64² feed-forward), at 512 the scratch outgrew the cache (20 against 17
# ms at 16²).
FF_ROWS = 256


def fast_blas() -> bool:
    """Whether a fast BLAS is loaded for these GEMMs to call."""
    return gemm() is not None


def uses_bf16(weight: mx.array) -> bool:
    """Whether a layer with this weight computes its products in bf16 here."""
    return weight.dtype == mx.bfloat16 and fast_blas() and gemm().bf16 is not None


def _leading_dimension(x: np.ndarray) -> int | None:
    """The BLAS leading dimension of a 2-D array whose rows are contiguous runs, else None."""
    size = x.itemsize
    row, column = x.strides
    if x.shape[0] == 1:
        row = x.shape[1] * size
    return row // size if column == size and row % size == 0 and row >= x.shape[1] * size else None


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray, transpose_b: bool = False, alpha: float = 1.0) -> None:
    """out = alpha * a @ b (or a @ bᵀ), written in place into the fp32 `out`. a and b are fp32
    matrices, or both bf16 given as uint16 bits (fp32 accumulation; needs `gemm().bf16`). Each
    may be a view whose rows are contiguous runs a fixed stride apart (one head's columns of a
    token-major projection, say): the BLAS reads and writes those in place. fp32 products go
    through the fast BLAS where one is loaded, numpy's own otherwise."""
    ldc = _leading_dimension(out)
    if ldc is None:
        raise ValueError("matmul writes `out` in place: its rows must be contiguous")
    bf16 = a.dtype == np.uint16
    if b.dtype != a.dtype or a.dtype not in (np.float32, np.uint16) or out.dtype != np.float32:
        raise ValueError(f"matmul takes fp32 or bf16-bit operands and an fp32 output, not {a.dtype}, {b.dtype}")
    if gemm() is None and not bf16:
        np.matmul(a, b.T if transpose_b else b, out=out)
        out *= np.float32(alpha)
        return
    a, b = (x if _leading_dimension(x) else np.ascontiguousarray(x) for x in (a, b))
    m, k = a.shape
    n = out.shape[1]
    _gemm(bf16)(ROW_MAJOR, NO_TRANS, TRANS if transpose_b else NO_TRANS, m, n, k, alpha, a.ctypes.data,
                _leading_dimension(a), b.ctypes.data, _leading_dimension(b), 0.0, out.ctypes.data, ldc)
    kernels.check_gemms()


def computes(weight: mx.array) -> bool:
    """Whether this module's GEMMs take a layer with this weight here: bf16 weights with bf16
    products (`uses_bf16`), fp32 weights in fp32."""
    return uses_bf16(weight) or (weight.dtype == mx.float32 and fast_blas())


def _weights(weight: mx.array, bf16: bool) -> np.ndarray:
    """A layer's weight as a C-contiguous numpy array of the GEMM's input type (bf16 as uint16
    bits): a view of MLX's buffer when it is stored that way."""
    if not bf16:
        return as_fp32(weight)
    bits = bf16_view(weight)
    return bits if bits is not None else np.ascontiguousarray(weight.astype(mx.bfloat16).view(mx.uint16))


def _fp32_or_none(x: mx.array | None) -> np.ndarray | None:
    return None if x is None else as_fp32(x)


def _gemm(bf16: bool) -> ctypes._CFuncPtr:
    """The BLAS call for bf16 (uint16 bits) or fp32 operands; both take the same arguments."""
    return gemm().bf16 if bf16 else gemm().sgemm


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """x rounded to bf16 on all cores (MLX's CPU `astype` runs on one)."""
    out = np.empty(x.shape, np.uint16)
    kernels.to_bf16(x, out)
    return out


def _start(out: np.ndarray, bias: np.ndarray | None, add: np.ndarray | None) -> float:
    """Fills `out` with what a GEMM then accumulates onto, bias and residual (each broadcast, either
    may be None), and returns the GEMM's beta: 0 when there was nothing to add."""
    if add is not None and bias is not None:
        np.add(add, bias, out=out)
    elif add is not None or bias is not None:
        out[...] = add if add is not None else bias
    else:
        return 0.0
    return 1.0


def linear(x: mx.array, weight: mx.array, bias: mx.array | None, add: mx.array | None = None) -> mx.array:
    """x @ weightᵀ + bias (+ add, an array of the result's shape: a residual) with bf16 products
    and fp32 accumulation; `weight` is (out, in), or a 1x1 convolution's (out, 1, 1, in). One C
    call (kernels.linear) rounds each thread's rows to bf16 in its scratch, starts them from
    the bias and residual and runs their GEMM: a 2x1024x320 layer of a UNet step took 0.6 ms,
    against 0.9-1.1 ms with the same passes driven from Python, which paid two thread wake-ups
    and several MLX evaluations around 0.3 ms of GEMM."""
    *lead, k = x.shape
    n = weight.shape[0]
    y, out = new_array((*lead, n))
    kernels.linear(as_fp32(x).reshape(-1, k), _weights(weight, True).reshape(n, k), _fp32_or_none(bias),
                       None if add is None else as_fp32(add).reshape(-1, n), gemm().bf16, out.reshape(-1, n))
    kernels.check_gemms()
    return y


def feed_forward(x: mx.array, proj_weight: mx.array, proj_bias: mx.array | None, out_weight: mx.array,
                 out_bias: mx.array | None, add: mx.array | None = None) -> mx.array:
    """The UNet's feed-forward, out(GEGLU(proj(x))), GEGLU being the first half of the
    projection's columns times the exact GELU of the second half, in blocks of FF_ROWS rows: each
    block is projected onto the bias in per-thread scratch, gated, and projected again onto its
    rows of the output, so neither the projection (84 MB at 64²) nor the gated activations
    (42 MB) are ever held whole or read back from memory; one C call (kernels.feed_forward).
    bf16 products (the input and the gated activations rounded to bf16, as a bf16 model's
    layers would) for bf16 weights, else fp32; both weights of one type, where `computes`
    holds. `add`, of the result's shape (a residual), is added by accumulating onto it."""
    bf16 = uses_bf16(proj_weight)
    *lead, k = x.shape
    dim = out_weight.shape[0]
    y, out = new_array((*lead, dim))
    kernels.feed_forward(as_fp32(x).reshape(-1, k), _weights(proj_weight, bf16), _fp32_or_none(proj_bias),
                             _weights(out_weight, bf16), _fp32_or_none(out_bias),
                             None if add is None else as_fp32(add).reshape(-1, dim), FF_ROWS, _gemm(bf16),
                             out.reshape(-1, dim))
    kernels.check_gemms()
    return y


def reads_bf16(weight: mx.array, shape: tuple[int, ...]) -> bool:
    """Whether `conv2d` of an input of this shape by `weight` reads that input as bf16 (oneDNN's
    direct convolution): a bf16 input then spares it rounding a copy."""
    return (uses_bf16(weight) and DIRECT and gemm().conv is not None and weight.shape[1] > 1
            and math.prod(shape[:-1]) > IM2COL_ROWS)


def conv2d(x: mx.array, weight: mx.array, bias: mx.array | None, padding: int, add: mx.array | None = None) -> mx.array:
    """A stride-1 NHWC convolution with an odd square kernel (`weight` is (out, k, k, in)) and
    `padding` = k // 2: as one GEMM over the unfolded input for images of at most IM2COL_ROWS
    pixels, else by oneDNN's direct convolution (bf16, DIRECT, where the class has it) or as
    shifted GEMMs; bf16 products when `weight` is bf16, else fp32. `add`, the
    result's shape (a residual) or (B, 1, 1, out) (a vector per image), is added in the same
    pass as the bias. `x` may be bf16 where `reads_bf16` holds; any other input is read as fp32."""
    bf16 = uses_bf16(weight)
    w = _weights(weight, bf16)
    batch, out_channels = x.shape[0], weight.shape[0]
    bias_rows, residual = _fp32_or_none(bias), _fp32_or_none(add)
    if residual is not None and residual.shape[1:3] == (1, 1):  # one vector per image: part of the bias
        bias_rows = residual.reshape(batch, out_channels) + (0 if bias_rows is None else bias_rows)
        residual = None
    if reads_bf16(weight, x.shape):
        bits = bf16_view(x)
        y = _conv_direct(gemm().conv, bf16_bits(as_fp32(x)) if bits is None else bits, w, bias_rows, residual)
        if y is not None:
            kernels.check_gemms()
            return y
    image = as_fp32(x)
    if image.size // image.shape[-1] <= IM2COL_ROWS:
        y = _conv_unfolded(image, w, bias_rows, residual, padding, bf16)
    else:
        y = _conv_shifted(image, w, bias_rows, residual, padding, bf16)
    kernels.check_gemms()
    return y


def _conv_direct(direct: onednn.Convolutions, bits: np.ndarray, w: np.ndarray, bias: np.ndarray | None,
                 residual: np.ndarray | None) -> mx.array | None:
    """The convolution by oneDNN of the bf16 bits of an image (bf16 bits `w`), or None where it
    has no fast form for this shape. A bias per image (B, out) goes image by image, as oneDNN's
    bias is one vector."""
    batch, height, width, _ = bits.shape
    y, out = new_array((batch, height, width, w.shape[0]))
    per_image = bias is not None and bias.ndim == 2
    for i, part in enumerate([slice(i, i + 1) for i in range(batch)] if per_image else [slice(None)]):
        image_bias = bias[i] if per_image else bias
        if not direct.conv2d(bits[part], w, image_bias, None if residual is None else residual[part], out[part]):
            return None
    return y


def _conv_unfolded(image: np.ndarray, w: np.ndarray, bias: np.ndarray | None, residual: np.ndarray | None,
                   padding: int, bf16: bool) -> mx.array:
    batch, height, width, channels = image.shape
    out_channels, kernel = w.shape[0], w.shape[1]
    pixels, terms = batch * height * width, kernel * kernel * channels
    patches = np.empty((pixels, terms), np.uint16 if bf16 else np.float32)
    kernels.im2col(image, kernel, padding, 0, pixels, patches)
    y, out = new_array((pixels, out_channels))
    # The bias (per image: (B, C)) and residual are added by accumulating onto them.
    beta = _start(out.reshape(batch, height, width, out_channels),
                  None if bias is None else bias.reshape(-1, 1, 1, out_channels), residual)
    # The weight's (out, k, k, in) rows are already in the patches' (dy, dx, c) order.
    _gemm(bf16)(
        ROW_MAJOR, NO_TRANS, TRANS, pixels, out_channels, terms, 1.0, patches.ctypes.data, terms, w.ctypes.data, terms,
        beta, out.ctypes.data, out_channels)
    return y.reshape(batch, height, width, out_channels)


def _conv_shifted(image: np.ndarray, w: np.ndarray, bias: np.ndarray | None, residual: np.ndarray | None,
                  padding: int, bf16: bool) -> mx.array:
    batch, height, width, channels = image.shape
    out_channels, kernel = w.shape[0], w.shape[1]
    rows, row = height + 2 * padding, width + 2 * padding
    source = np.empty((batch, rows, row, channels), np.uint16 if bf16 else np.float32)
    kernels.pad_image(image, padding, 0, batch * rows, source)
    # Output pixel p of the flattened padded batch sums input pixels p + dy * row + dx, so the
    # whole batch is one run of rows; those that land in padding are junk and dropped by the
    # crop, which also adds the bias and the residual. The last `reach` rows would read past the
    # end and are never needed (nor written).
    reach = (kernel - 1) * (row + 1)
    total = batch * rows * row - reach
    y, out = new_array((batch, height, width, out_channels))
    if batch * rows * row * out_channels * 4 <= SUMS_BYTES:
        sums = np.empty((batch, rows, row, out_channels), np.float32)
        _sum_taps(source, w, bf16, row, 0, total, sums)
        kernels.crop_bias(sums, bias, 0, batch * height, out, residual)
        return y
    # Larger images go in blocks of whole rows, each cropped as soon as it is summed.
    lines = max(1, BLOCK_ROWS // row)
    sums = np.empty((1, lines, row, out_channels), np.float32)
    for i in range(batch):
        image_bias = bias[i] if bias is not None and bias.ndim == 2 else bias
        for first in range(0, height, lines):
            count = min(lines, height - first)
            origin = (i * rows + first) * row
            _sum_taps(source, w, bf16, row, origin, min(count * row, total - origin), sums)
            block, target = sums[:, :count], out[i:i + 1, first:first + count]
            add = None if residual is None else residual[i:i + 1, first:first + count]
            kernels.crop_bias(block, image_bias, 0, count, target, add)
    return y


def _sum_taps(source: np.ndarray, w: np.ndarray, bf16: bool, row: int, origin: int, count: int,
              sums: np.ndarray) -> None:
    """sums' first `count` pixels = the kernel's taps summed for the padded source's pixels
    origin.. origin + count (flattened over the batch, rows of `row` pixels), in GEMMs of
    BLOCK_ROWS pixels."""
    call, size = _gemm(bf16), 2 if bf16 else 4
    out_channels, kernel, channels = w.shape[0], w.shape[1], w.shape[-1]
    taps = kernel * kernel
    for start in range(0, count, BLOCK_ROWS):
        m = min(BLOCK_ROWS, count - start)
        for tap in range(taps):
            shift = origin + start + (tap // kernel) * row + tap % kernel
            # Tap `tap` of the weight, read transposed in place: row o starts at o * taps * C.
            call(ROW_MAJOR, NO_TRANS, TRANS, m, out_channels, channels, 1.0,
                 source.ctypes.data + shift * channels * size, channels,
                 w.ctypes.data + tap * channels * size, taps * channels,
                 1.0 if tap else 0.0, sums.ctypes.data + start * out_channels * 4, out_channels)
