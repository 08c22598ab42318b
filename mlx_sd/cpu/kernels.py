"""The fused CPU kernels of kernels.c: the attention's softmax numerators, GEGLU, SiLU-style
gates, GroupNorm's moments and scale-and-shift, LayerNorm, rounding to bf16, and the
convolutions' padding, cropping and unfolding; each one vectorised pass over a block instead of
a chain of numpy or MLX passes. amx_attention.c: a whole attention head for bf16 models on
Intel's AMX tile units, where the processor has them. layers.c: whole linear and
feed-forward layers, spread over pool.c's threads.

MLX's CPU elementwise transcendentals are scalar (`nn.silu`, `nn.gelu` about 50 ns per element
here) and numpy's formulas make a pass over memory per operation (GELU about twenty).
benchmarks/cpu_kernels.py measures each kernel against the numpy form or MLX op it replaced:
2x (softmax numerators) to 19x (GEGLU) on one thread.

The library is compiled when mlx-sd is installed (setup.py) and is optional: `kernels()` is None
where it was not built, and the networks then run on MLX's own ops (mlx_sd.engine.backends). These functions take numpy
arrays and check that each is C-contiguous float32, because the C code reads raw pointers. Each
call releases the GIL (ctypes) and spreads its work over pool.c's threads, one per core,
started when the library is loaded.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from mlx_sd.cpu.blas import gemm
from mlx_sd.cpu.buffers import as_fp32, new_array
from mlx_sd.cpu.threads import cores

_log = logging.getLogger(__name__)
_SIZE, _POINTER, _FLOAT, _INT = ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
_SIGNATURES = {  # name: (argument types, result type)
    "softmax_numerators": ([_POINTER, _SIZE, _SIZE, _POINTER, _POINTER], None),
    "geglu": ([_POINTER, _SIZE, _SIZE, _POINTER], None),
    "sigmoid_gate": ([_POINTER, _SIZE, _FLOAT, _POINTER], None),
    "scale_shift": ([_POINTER, _SIZE, _SIZE, _SIZE, _POINTER, _POINTER, _INT, _POINTER, _POINTER], None),
    "channel_moments": ([_POINTER, _SIZE, _SIZE, _SIZE, _POINTER, _POINTER, _POINTER], _INT),
    "layer_norm": ([_POINTER, _SIZE, _SIZE, _POINTER, _POINTER, _FLOAT, _POINTER], None),
    "to_bf16": ([_POINTER, _SIZE, _POINTER], None),
    "pad_image": ([_POINTER] + [_SIZE] * 6 + [_POINTER, _POINTER], None),
    "crop_bias": ([_POINTER] + [_SIZE] * 5 + [_POINTER, _SIZE, _POINTER, _SIZE, _SIZE, _POINTER], None),
    "im2col": ([_POINTER] + [_SIZE] * 7 + [_POINTER, _POINTER], None),
    "transpose_taps": ([_POINTER] + [_SIZE] * 4 + [_POINTER], None),
    "convert_values": ([_POINTER, _INT, _SIZE, _INT, _POINTER], _INT),
    "amx_available": ([], _INT),
    "cpu_features": ([], _INT),
    "pool_start": ([_INT, _POINTER, _POINTER, _POINTER], _INT),
    "pool_threads": ([], _INT),
    "linear": ([_POINTER] * 4 + [_SIZE] * 3 + [_INT, _POINTER, _POINTER], _INT),
    "feed_forward": ([_POINTER] * 6 + [_SIZE] * 5 + [_INT, _POINTER, _POINTER], _INT),
    "amx_attention": ([_POINTER] * 3 + [_SIZE] * 5 + [_FLOAT, _INT, _POINTER], _INT),
    "onednn_adapter": ([_POINTER], _POINTER),
    "gemm_failures": ([], _INT),
}


# kernels.c's kernels_abi_version(): the two change together.
ABI_VERSION = 8


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled library with its signatures bound, or None: not built (no C compiler when
    mlx-sd was installed), or built from another version of kernels.c (a checkout updated
    without reinstalling)."""
    spec = importlib.util.find_spec("mlx_sd.cpu._kernels")
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


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The compiled library (see `_library`), its thread pool started."""
    library = _library()
    if library is not None:
        _start_pool(library)
    return library


def _start_pool(library: ctypes.CDLL) -> None:
    """Starts the kernels' pool (pool.c): a thread per core, each of whose GEMMs runs on one
    thread (MKL's per-thread setting, and OpenMP's for oneDNN's GEMMs). Without MKL's setting
    (no MKL), the kernels' fp32 GEMMs would each start the BLAS's own threads on every core, so
    there is no pool: one thread."""
    functions = gemm()
    if functions is None or not functions.per_thread:
        library.pool_start(1, None, None, None)
        return
    omp = [None if f is None else _address(f) for f in (functions.set_omp_threads, functions.get_omp_threads)]
    library.pool_start(cores(), _address(functions.set_local_threads), *omp)


def onednn_adapter(function: ctypes._CFuncPtr) -> ctypes._CFuncPtr | None:
    """A function with cblas_gemm_bf16bf16f32's arguments that calls oneDNN's
    dnnl_gemm_bf16bf16f32 `function` (layers.c), or None where the kernels are not built."""
    library = _library()
    if library is None:
        return None
    address = library.onednn_adapter(_address(function))
    return ctypes.CFUNCTYPE(None)(address)


# cpu_features()'s bits, as the /proc/cpuinfo flags mlx_sd.cpu.dispatch reads.
_FEATURES = ({"avx2", "fma"}, {"avx512f"}, {"avx512_bf16"}, {"amx_bf16", "amx_tile"})


def cpu_flags() -> set[str] | None:
    """The instruction sets that matter to mlx_sd.cpu.dispatch, as CPUID reports them to the
    kernels (an emulator's CPU model, say, where /proc/cpuinfo shows the host's), or None where
    the kernels are not built."""
    library = _library()
    if library is None:
        return None
    bits = library.cpu_features()
    return set().union(*(names for i, names in enumerate(_FEATURES) if bits >> i & 1))


def check_gemms() -> None:
    """Raises if an adapted GEMM failed since the last check (oneDNN's status: out of memory)."""
    if _library().gemm_failures():
        raise MemoryError("oneDNN's bf16 GEMM failed (out of memory?)")


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
    """out = x * scale + offset (then SiLU if `silu`) for x and out (B, N, C), with a row of
    scale and offset (B, C) per image; out is fp32 or, as uint16, bf16 bits (rounded to nearest
    even, as `to_bf16` rounds)."""
    images, rows, channels = x.shape
    if out.shape != x.shape or scale.shape != (images, channels) or offset.shape != (images, channels):
        raise ValueError(f"shape mismatch: {x.shape}, {scale.shape}, {offset.shape}, {out.shape}")
    kernels().scale_shift(_pointer(x), images * rows, rows, channels, _pointer(scale), _pointer(offset), int(silu),
                          *_f32_or_bf16(out))


def channel_moments(x: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float64 per-channel sums of d and d² (each (B, C)) over the N rows of each image of x
    (B, N, C), d = x - shift, with a row of shift (B, C) per image."""
    images, rows, channels = x.shape
    if shift.shape != (images, channels):
        raise ValueError(f"shape mismatch: {x.shape} and {shift.shape}")
    sums, squares = np.empty((images, channels)), np.empty((images, channels))
    if kernels().channel_moments(_pointer(x), images, rows, channels, _pointer(shift), _pointer(sums, np.float64),
                                 _pointer(squares, np.float64)) != 0:
        raise MemoryError("no memory for GroupNorm's partial sums")
    return sums, squares


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


def map_rows(kernel: Callable[[np.ndarray, np.ndarray], None], x: mx.array, width: int) -> mx.array:
    """kernel(rows, out) over the rows of x viewed as fp32 (rows, x.shape[-1]), filling `width`
    columns of out: a new MLX array of shape (*x.shape[:-1], width) and x's dtype."""
    rows = as_fp32(x).reshape(-1, x.shape[-1])
    result, out = new_array((*x.shape[:-1], width))
    kernel(rows, out.reshape(-1, width))
    return result if x.dtype == mx.float32 else result.astype(x.dtype)


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


def _optional(array: np.ndarray | None, shape: tuple[int, ...]) -> int | None:
    """The pointer to an optional C-contiguous float32 operand of the given shape, or None."""
    if array is None:
        return None
    if array.shape != shape:
        raise ValueError(f"expected an operand of shape {shape}, not {array.shape}")
    return _pointer(array)


def _weights(weight: np.ndarray) -> tuple[int, int]:
    """(pointer, bf16 flag) for a GEMM weight: float32, or bf16 as uint16 bits."""
    bf16 = weight.dtype == np.uint16
    return _pointer(weight, np.uint16 if bf16 else np.float32), int(bf16)


def _address(function: ctypes._CFuncPtr) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, add: np.ndarray | None,
           gemm: ctypes._CFuncPtr, out: np.ndarray) -> None:
    """out (rows, n) = x (rows, k) @ weightᵀ + bias (n,) + add (rows, n), bias and add optional, all
    float32 except `weight` (n, k): float32, or uint16 bf16 bits, which rounds x to bf16 for the
    products. `gemm` is the BLAS's cblas_sgemm or cblas_gemm_bf16bf16f32 to match. Spread over
    the pool's threads by rows, or by columns when there are few rows."""
    (rows, k), n = x.shape, weight.shape[0]
    if weight.shape != (n, k) or out.shape != (rows, n):
        raise ValueError(f"cannot multiply {x.shape} by {weight.shape}ᵀ into {out.shape}")
    pointer, bf16 = _weights(weight)
    status = kernels().linear(_pointer(x), pointer, _optional(bias, (n,)), _optional(add, (rows, n)), rows, n, k,
                              bf16, _address(gemm), _pointer(out))
    if status != 0:
        raise MemoryError(f"no memory for a linear layer's scratch ({rows}x{k})")


def feed_forward(x: np.ndarray, weight1: np.ndarray, bias1: np.ndarray | None, weight2: np.ndarray,
                 bias2: np.ndarray | None, add: np.ndarray | None, block: int, gemm: ctypes._CFuncPtr,
                 out: np.ndarray) -> None:
    """out (rows, dim) = GEGLU(x @ weight1ᵀ + bias1) @ weight2ᵀ + bias2 + add for x (rows, k),
    weight1 (n, k), weight2 (dim, n / 2), in blocks of `block` rows spread over the pool's
    threads; operand types as in `linear` (both weights of one type; bf16 also rounds the gated
    activations)."""
    (rows, k), n, dim = x.shape, weight1.shape[0], weight2.shape[0]
    if weight1.shape != (n, k) or n % 2 or weight2.shape != (dim, n // 2) or weight2.dtype != weight1.dtype:
        raise ValueError(f"feed-forward weights {weight1.shape} {weight1.dtype}, {weight2.shape} {weight2.dtype} "
                         f"do not fit inputs of width {k}")
    if out.shape != (rows, dim) or block < 1:
        raise ValueError(f"cannot write {rows} rows of {dim} into {out.shape} in blocks of {block}")
    first, bf16 = _weights(weight1)
    status = kernels().feed_forward(_pointer(x), first, _optional(bias1, (n,)), _weights(weight2)[0],
                                    _optional(bias2, (dim,)), _optional(add, (rows, dim)), rows, k, n, dim, block, bf16,
                                    _address(gemm), _pointer(out))
    if status != 0:
        raise MemoryError(f"no memory for a feed-forward's scratch ({block} rows of {n})")


def transpose_taps(source: np.ndarray, out: np.ndarray) -> None:
    """out (O, H, W, C) = source (O, C, H, W): convolution weights moved into MLX's layout, for
    C-contiguous arrays of one type of 2- or 4-byte elements (their bits, say, as uint16)."""
    o, c, h, w = source.shape
    if out.shape != (o, h, w, c) or out.dtype != source.dtype or source.itemsize not in (2, 4):
        raise ValueError(f"cannot move {source.shape} {source.dtype} into {out.shape} {out.dtype}")
    if not (source.flags.c_contiguous and out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("transpose_taps takes C-contiguous arrays and a writable output")
    kernels().transpose_taps(source.ctypes.data, o, c, h * w, source.itemsize, out.ctypes.data)


# The casts convert_values makes (from, to): the exact widenings to fp32, and roundings to bf16.
CONVERSIONS = frozenset({(mx.float16, mx.float32), (mx.bfloat16, mx.float32), (mx.float16, mx.bfloat16),
                         (mx.float32, mx.bfloat16)})
_VALUE_TYPES = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}


def convert_values(source: np.ndarray, source_type: mx.Dtype, out: np.ndarray, out_type: mx.Dtype) -> None:
    """out = the values of `source` (the raw bits of `source_type` values) as `out_type` (raw bits,
    as many values), one of CONVERSIONS; bf16 rounds to nearest even. On one thread: the checkpoint
    reader calls it on each of its threads."""
    if (source_type, out_type) not in CONVERSIONS:
        raise ValueError(f"no conversion from {source_type} to {out_type}")
    if source.itemsize != source_type.size or out.itemsize != out_type.size or source.size != out.size:
        raise ValueError(f"{source.size} values of {source.dtype} cannot become {out.size} of {out.dtype}")
    if not (source.flags.c_contiguous and out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("convert_values takes C-contiguous arrays and a writable output")
    kernels().convert_values(source.ctypes.data, _VALUE_TYPES[source_type], source.size, _VALUE_TYPES[out_type],
                             out.ctypes.data)


def amx_ready() -> bool:
    """Whether `amx_attention` runs here: the kernels are built, the processor has AMX-BF16 and
    AVX512-BF16, and Linux granted this process the tile registers."""
    library = kernels()
    return library is not None and library.amx_available() == 1


def amx_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int, scale: float, causal: bool,
                  out: np.ndarray) -> None:
    """out = softmax(q kᵀ scale) v per head, for token-major projections q and out (B, N, heads *
    dim), k and v (B, keys, heads * dim), C-contiguous float32; with `causal`, query i sees keys
    0..i only. The products are bf16 with fp32 sums, on AMX; only call it where `amx_ready()`."""
    images, queries, width = q.shape
    keys = k.shape[1]
    if keys == 0 or width % heads or k.shape != (images, keys, width) or v.shape != k.shape or out.shape != q.shape:
        raise ValueError(f"attention shapes do not match: q {q.shape}, k {k.shape}, v {v.shape}, out {out.shape}, "
                         f"{heads} heads")
    if not out.flags.writeable:
        raise ValueError("the attention's output must be writable")
    status = kernels().amx_attention(_pointer(q), _pointer(k), _pointer(v), images, heads, queries, keys,
                                     width // heads, scale, int(causal), _pointer(out))
    if status == -2:
        raise RuntimeError("the AMX attention kernel was called on a processor without AMX")
    if status != 0:
        raise MemoryError(f"no memory for the attention kernel's scratch ({keys} keys of {width // heads})")
