"""ctypes bindings to the fast BLAS that `mlx_sd.cpu.runtime` loaded: fp32 and bf16 GEMMs and MKL's
per-thread thread count, for the CPU kernels that call it directly (gemm.py, the attention)."""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

from mlx_sd.cpu import runtime


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
    """The fast BLAS that `mlx_sd.cpu.runtime` loaded, or None (reference BLAS, macOS)."""
    blas = runtime.configure()
    if blas.path is None:
        return None
    try:
        library = ctypes.CDLL(str(blas.path))
        sgemm = _bind(library.cblas_sgemm)
    except (OSError, AttributeError):
        return None
    bf16 = getattr(library, "cblas_gemm_bf16bf16f32", None)
    # Without bf16 units MKL emulates the bf16 products, slower than fp32.
    has_units = {"amx_bf16", "avx512_bf16"} & runtime.cpu_flags()
    local_threads = getattr(library, "MKL_Set_Num_Threads_Local", None)
    if local_threads is not None:
        local_threads.argtypes, local_threads.restype = [ctypes.c_int], ctypes.c_int
    return Gemm(sgemm, _bind(bf16) if bf16 is not None and has_units else None, local_threads)
