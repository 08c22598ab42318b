"""The fused CPU kernels of cpu_kernels.c: softmax numerators, GEGLU, SiLU-style gates,
GroupNorm's moments and scale-and-shift, and LayerNorm, each one vectorised pass over a block
instead of a chain of numpy or MLX passes.

MLX's CPU elementwise transcendentals are scalar (`nn.silu`, `nn.gelu` about 50 ns per element
here) and numpy's formulas make a pass over memory per operation (GELU about twenty).
benchmarks/cpu_kernels.py measures each kernel against the numpy form it replaced.

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
_SIZE, _POINTER, _FLOAT = ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_float
_SIGNATURES = {
    "softmax_numerators": [_POINTER, _SIZE, _SIZE, _POINTER],
    "geglu": [_POINTER, _SIZE, _SIZE, _POINTER],
    "sigmoid_gate": [_POINTER, _SIZE, _FLOAT, _POINTER],
    "scale_shift": [_POINTER, _SIZE, _SIZE, _POINTER, _POINTER, ctypes.c_int, _POINTER],
    "channel_moments": [_POINTER, _SIZE, _SIZE, _POINTER, _POINTER, _POINTER, _POINTER],
    "layer_norm": [_POINTER, _SIZE, _SIZE, _POINTER, _POINTER, _FLOAT, _POINTER],
}


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The compiled library, or None (not built: no C compiler when mlx-sd was installed)."""
    spec = importlib.util.find_spec("mlx_sd.models._cpu_kernels")
    if spec is None or spec.origin is None:
        _log.warning("CPU kernels not built (no C compiler at install?): using MLX's slower CPU ops")
        return None
    library = ctypes.CDLL(spec.origin)
    for name, argtypes in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, None
    return library


def active() -> bool:
    """Whether MLX computes on the CPU here and the kernels are there to help it."""
    return mx.default_device() == mx.cpu and kernels() is not None


def _pointer(array: np.ndarray, dtype: type = np.float32) -> int:
    if array.dtype != dtype or not array.flags.c_contiguous:
        raise ValueError(f"the CPU kernels take C-contiguous {np.dtype(dtype)} arrays, "
                         f"not {array.dtype} with strides {array.strides}")
    return array.ctypes.data


def softmax_numerators(scores: np.ndarray) -> np.ndarray:
    """Replaces each row of `scores` (rows, cols) by exp(row - max(row)); returns the row sums."""
    rows, cols = scores.shape
    sums = np.empty(rows, np.float32)
    kernels().softmax_numerators(_pointer(scores), rows, cols, _pointer(sums))
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
