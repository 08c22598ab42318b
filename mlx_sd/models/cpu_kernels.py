"""The fused CPU kernels of cpu_kernels.c: the attention's softmax numerators, GEGLU, SiLU-style
gates, GroupNorm's moments and scale-and-shift, LayerNorm, rounding to bf16, and the
convolutions' padding, cropping and unfolding; each one vectorised pass over a block instead of
a chain of numpy or MLX passes. And amx_attention.c: a whole attention head for bf16 models on
Intel's AMX tile units, where the processor has them.

MLX's CPU elementwise transcendentals are scalar (`nn.silu`, `nn.gelu` about 50 ns per element
here) and numpy's formulas make a pass over memory per operation (GELU about twenty).
benchmarks/cpu_kernels.py measures each kernel against the numpy form or MLX op it replaced:
2x (softmax numerators) to 19x (GEGLU) on one thread.

The library is compiled when mlx-sd is installed (setup.py) and is optional: `kernels()` is None
where it was not built, and the callers then use MLX's own ops. These functions take numpy
arrays and check that each is C-contiguous float32, because the C code reads raw pointers; they
release the GIL (ctypes), so the callers run blocks of them on every core (cpu_threads).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging

import mlx.core as mx
import numpy as np

_log = logging.getLogger(__name__)
_SIZE, _POINTER, _FLOAT, _INT = ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
_SIGNATURES = {  # name: (argument types, result type)
    "softmax_numerators": ([_POINTER, _SIZE, _SIZE, _POINTER, _POINTER], None),
    "geglu": ([_POINTER, _SIZE, _SIZE, _POINTER], None),
    "sigmoid_gate": ([_POINTER, _SIZE, _FLOAT, _POINTER], None),
    "scale_shift": ([_POINTER, _SIZE, _SIZE, _POINTER, _POINTER, _INT, _POINTER], None),
    "channel_moments": ([_POINTER, _SIZE, _SIZE, _POINTER, _POINTER, _POINTER, _POINTER], None),
    "layer_norm": ([_POINTER, _SIZE, _SIZE, _POINTER, _POINTER, _FLOAT, _POINTER], None),
    "to_bf16": ([_POINTER, _SIZE, _POINTER], None),
    "pad_image": ([_POINTER] + [_SIZE] * 6 + [_POINTER, _POINTER], None),
    "crop_bias": ([_POINTER] + [_SIZE] * 5 + [_POINTER, _SIZE, _POINTER, _SIZE, _SIZE, _POINTER], None),
    "im2col": ([_POINTER] + [_SIZE] * 7 + [_POINTER, _POINTER], None),
    "amx_available": ([], _INT),
    "amx_attention": ([_POINTER] * 3 + [_SIZE] * 6 + [_FLOAT, _SIZE, _POINTER], _INT),
}


# cpu_kernels.c's kernels_abi_version(): the two change together.
ABI_VERSION = 4


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The compiled library, or None: not built (no C compiler when mlx-sd was installed), or
    built from another version of cpu_kernels.c (a checkout updated without reinstalling)."""
    spec = importlib.util.find_spec("mlx_sd.models._cpu_kernels")
    if spec is None or spec.origin is None:
        _log.warning("CPU kernels not built (no C compiler at install?): using MLX's slower CPU ops")
        return None
    library = ctypes.CDLL(spec.origin)
    version = getattr(library, "kernels_abi_version", lambda: 0)()
    if version != ABI_VERSION:
        _log.warning("CPU kernels at %s are version %d, not %d: using MLX's slower CPU ops until mlx-sd "
                     "is reinstalled (pip install -e .)", spec.origin, version, ABI_VERSION)
        return None
    for name, (argtypes, restype) in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, restype
    return library


def active() -> bool:
    """Whether MLX computes on the CPU here and the kernels are there to help it."""
    return mx.default_device() == mx.cpu and kernels() is not None


def _pointer(array: np.ndarray, dtype: type = np.float32) -> int:
    if array.dtype != dtype or not array.flags.c_contiguous:
        raise ValueError(f"the CPU kernels take C-contiguous {np.dtype(dtype)} arrays, "
                         f"not {array.dtype} with strides {array.strides}")
    return array.ctypes.data


def softmax_numerators(scores: np.ndarray, bf16: np.ndarray | None = None) -> np.ndarray:
    """Replaces each row of `scores` (rows, cols) by exp(row - max(row)), also written rounded to
    bf16 (uint16 bits) into `bf16` if given; returns the row sums of the float values."""
    rows, cols = scores.shape
    if bf16 is not None and bf16.shape != scores.shape:
        raise ValueError(f"shape mismatch: {scores.shape} and {bf16.shape}")
    sums = np.empty(rows, np.float32)
    kernels().softmax_numerators(_pointer(scores), rows, cols, None if bf16 is None else _pointer(bf16, np.uint16),
                                 _pointer(sums))
    return sums


def geglu(x: np.ndarray, out: np.ndarray) -> None:
    """out = x[:, :w] * GELU(x[:, w:]) with w = out.shape[1], GELU exact (erf)."""
    rows, width = out.shape
    if x.shape != (rows, 2 * width):
        raise ValueError(f"GEGLU of {x.shape} cannot fill {out.shape}")
    kernels().geglu(_pointer(x), rows, width, _pointer(out))


def sigmoid_gate(x: np.ndarray, slope: float, out: np.ndarray) -> None:
    """out = x * sigmoid(slope * x): SiLU at slope 1, CLIP's quick GELU at 1.702."""
    if x.shape != out.shape:
        raise ValueError(f"shape mismatch: {x.shape} and {out.shape}")
    kernels().sigmoid_gate(_pointer(x), x.size, slope, _pointer(out))


def scale_shift(x: np.ndarray, scale: np.ndarray, offset: np.ndarray, silu: bool, out: np.ndarray) -> None:
    """out = x * scale + offset (then SiLU if `silu`), with per-channel scale and offset, for
    x and out (rows, channels)."""
    rows, channels = x.shape
    if out.shape != x.shape or scale.shape != (channels,) or offset.shape != (channels,):
        raise ValueError(f"shape mismatch: {x.shape}, {scale.shape}, {offset.shape}, {out.shape}")
    kernels().scale_shift(_pointer(x), rows, channels, _pointer(scale), _pointer(offset), int(silu), _pointer(out))


def channel_moments(x: np.ndarray, shift: np.ndarray, sums: np.ndarray, squares: np.ndarray) -> None:
    """Adds to the float64 `sums` and `squares` (channels,) the per-channel sums of d and d² over
    the rows of x (rows, channels), d = x - shift."""
    rows, channels = x.shape
    if shift.shape != (channels,) or sums.shape != (channels,) or squares.shape != (channels,):
        raise ValueError(f"shape mismatch: {x.shape}, {shift.shape}, {sums.shape}, {squares.shape}")
    scratch = np.empty(2 * channels, np.float32)
    kernels().channel_moments(_pointer(x), rows, channels, _pointer(shift), _pointer(scratch),
                              _pointer(sums, np.float64), _pointer(squares, np.float64))


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float, out: np.ndarray) -> None:
    """Each row of x (rows, width) normalised to mean 0 and variance 1, then * weight + bias."""
    rows, width = x.shape
    if out.shape != x.shape or weight.shape != (width,) or bias.shape != (width,):
        raise ValueError(f"shape mismatch: {x.shape}, {weight.shape}, {bias.shape}, {out.shape}")
    kernels().layer_norm(_pointer(x), rows, width, _pointer(weight), _pointer(bias), eps, _pointer(out))


def to_bf16(x: np.ndarray, out: np.ndarray) -> None:
    """out (uint16 bits) = x rounded to bf16, nearest even."""
    if out.shape != x.shape:
        raise ValueError(f"shape mismatch: {x.shape} and {out.shape}")
    kernels().to_bf16(_pointer(x), x.size, _pointer(out, np.uint16))


def _f32_or_bf16(out: np.ndarray) -> tuple[int | None, int | None]:
    """The (f32, bf16) output pointers the image kernels take: one is None, by `out`'s dtype."""
    return (None, _pointer(out, np.uint16)) if out.dtype == np.uint16 else (_pointer(out), None)


def pad_image(x: np.ndarray, pad: int, first: int, last: int, out: np.ndarray) -> None:
    """Rows [first, last) (counted over the batch) of out = x (B, H, W, C) zero-padded by `pad`
    pixels on each side, as fp32 or, for a uint16 `out`, as bf16 bits."""
    b, h, w, c = x.shape
    if out.shape != (b, h + 2 * pad, w + 2 * pad, c) or not 0 <= first <= last <= b * (h + 2 * pad):
        raise ValueError(f"cannot pad {x.shape} by {pad} into {out.shape}, rows {first}:{last}")
    kernels().pad_image(_pointer(x), h, w, c, pad, first, last, *_f32_or_bf16(out))


def crop_bias(source: np.ndarray, bias: np.ndarray | None, first: int, last: int, out: np.ndarray,
              add: np.ndarray | None = None) -> None:
    """Rows [first, last) (counted over the batch) of out (B, H, W, C) = the top-left H x W pixels
    of source (B, H', W', C), plus `bias` if given ((C,), or (B, C): one per image), plus `add`
    (out's shape) if given."""
    b, h, w, c = out.shape
    _, source_h, source_w, source_c = source.shape
    if source.shape[0] != b or source_h < h or source_w < w or source_c != c or not 0 <= first <= last <= b * h:
        raise ValueError(f"cannot crop {source.shape} to {out.shape}, rows {first}:{last}")
    if bias is not None and bias.shape not in ((c,), (b, c)):
        raise ValueError(f"bias {bias.shape} for {b} images of {c} channels")
    if add is not None and add.shape != out.shape:
        raise ValueError(f"cannot add {add.shape} to {out.shape}")
    kernels().crop_bias(_pointer(source), h, w, source_h, source_w, c, None if bias is None else _pointer(bias),
                        c if bias is not None and bias.ndim == 2 else 0, None if add is None else _pointer(add),
                        first, last, _pointer(out))


def im2col(x: np.ndarray, kernel: int, pad: int, first: int, last: int, out: np.ndarray) -> None:
    """Rows [first, last) of out (B * H * W, kernel² * C) = the kernel x kernel patches of
    x (B, H, W, C) around each pixel, zero-padded by `pad`, in (dy, dx, c) order; fp32, or bf16
    bits for a uint16 `out`."""
    b, h, w, c = x.shape
    if out.shape != (b * h * w, kernel * kernel * c) or not 0 <= first <= last <= b * h * w:
        raise ValueError(f"cannot unfold {x.shape} by {kernel}x{kernel} into {out.shape}, rows {first}:{last}")
    kernels().im2col(_pointer(x), h, w, c, kernel, pad, first, last, *_f32_or_bf16(out))


def amx_ready() -> bool:
    """Whether `amx_attention` runs here: the kernels are built, the processor has AMX-BF16 and
    AVX512-BF16, and Linux granted this process the tile registers."""
    library = kernels()
    return library is not None and library.amx_available() == 1


def _row_stride(array: np.ndarray) -> int:
    """The row stride, in floats, of a 2-D float32 array whose rows are contiguous."""
    rows, columns = array.shape
    row, column = array.strides
    if array.dtype != np.float32 or (column != 4 and columns > 1) or row % 4 or (rows > 1 and row < 4 * columns):
        raise ValueError(f"the attention kernel takes float32 rows of contiguous values, not {array.dtype} "
                         f"with strides {array.strides}")
    return row // 4 if rows > 1 else columns


def amx_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, out: np.ndarray,
                  causal_first: int | None = None) -> None:
    """out = softmax(q kᵀ scale) v for one head, q and out (queries, dim), k and v (keys, dim):
    float32 arrays with contiguous rows, such as one head's columns of token-major projections
    (k and v with the same row stride). The products are bf16 with fp32 sums, on AMX; only call
    it where `amx_ready()`. With `causal_first`, row i is query causal_first + i and sees the
    keys up to that one only."""
    queries, dim = q.shape
    keys = k.shape[0]
    if keys == 0 or out.shape != q.shape or k.shape != (keys, dim) or v.shape != k.shape:
        raise ValueError(f"attention shapes do not match: q {q.shape}, k {k.shape}, v {v.shape}, out {out.shape}")
    kv_stride = _row_stride(k)
    if _row_stride(v) != kv_stride or not out.flags.writeable:
        raise ValueError("k and v need the same row stride, and out must be writable")
    status = kernels().amx_attention(q.ctypes.data, k.ctypes.data, v.ctypes.data, queries, keys, dim, _row_stride(q),
                                     kv_stride, _row_stride(out), scale, -1 if causal_first is None else causal_first,
                                     out.ctypes.data)
    if status != 0:
        raise MemoryError(f"no memory for the attention kernel's scratch ({keys} keys of {dim})")
