"""ctypes bindings to the GEMMs the CPU kernels call directly (gemm.py, layers.c, the attention):
the fp32 GEMM of the BLAS that `mlx_sd.cpu.runtime` loaded, the bf16 GEMM that
`mlx_sd.cpu.dispatch` picks for this processor (MKL's, or oneDNN's through an adapter in
layers.c with MKL's arguments), and the per-thread thread counts of their runtimes."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from mlx_sd.cpu import dispatch, runtime

log = logging.getLogger(__name__)

# PyPI's onednn-cpu-gomp puts oneDNN's library beside MKL's, in the environment's data prefix.
ONEDNN = Path(sysconfig.get_paths()["data"]) / "lib" / "libdnnl.so.3"


@dataclass(frozen=True)
class Gemm:
    """The GEMM entry points, each with cblas_sgemm's arguments: `sgemm` always; `bf16` where
    `choice` names a bf16 GEMM. `set_local_threads` (MKL's) and `set_omp_threads` (the OpenMP
    runtime oneDNN runs on) set the calling thread's own thread count, where present."""

    sgemm: ctypes._CFuncPtr
    bf16: ctypes._CFuncPtr | None
    choice: dispatch.Choice
    set_local_threads: ctypes._CFuncPtr | None
    set_omp_threads: ctypes._CFuncPtr | None = None
    get_omp_threads: ctypes._CFuncPtr | None = None

    @property
    def per_thread(self) -> bool:
        """Whether each thread can limit its own GEMMs to one thread (so a pool of them may run)."""
        return self.set_local_threads is not None

    def one_thread(self) -> tuple[int, int]:
        """Limits the calling thread's GEMMs to one thread; returns what `restore` takes back."""
        mkl = self.set_local_threads(1) if self.set_local_threads is not None else 0
        omp = 0
        if self.set_omp_threads is not None:
            omp = self.get_omp_threads()
            self.set_omp_threads(1)
        return mkl, omp

    def restore(self, previous: tuple[int, int]) -> None:
        if self.set_local_threads is not None:
            self.set_local_threads(previous[0])
        if self.set_omp_threads is not None:
            self.set_omp_threads(previous[1])


def _bind(function: ctypes._CFuncPtr) -> ctypes._CFuncPtr:
    int_, ptr = ctypes.c_int, ctypes.c_void_p
    function.argtypes = [int_, int_, int_, int_, int_, int_, ctypes.c_float, ptr, int_, ptr, int_,
                         ctypes.c_float, ptr, int_]
    function.restype = None
    return function


def _onednn(path: Path = ONEDNN) -> ctypes.CDLL | None:
    """oneDNN's library, loaded privately, or None where it is not installed."""
    if not path.exists():
        return None
    try:
        return ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
    except OSError as exc:
        log.warning("could not load oneDNN (%s): no bf16 products from it", exc)
        return None


def _omp_threads(onednn: ctypes.CDLL) -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]:
    """omp_set_num_threads and omp_get_max_threads of the OpenMP runtime oneDNN's parallel
    regions bind to: Intel's, where MKL put it in the global scope, else oneDNN's own libgomp."""
    scope = ctypes.CDLL(None)
    source = scope if hasattr(scope, "GOMP_parallel") else onednn
    setter, getter = source.omp_set_num_threads, source.omp_get_max_threads
    setter.argtypes, setter.restype = [ctypes.c_int], None
    getter.argtypes, getter.restype = [], ctypes.c_int
    return setter, getter


@functools.cache
def gemm() -> Gemm | None:
    """The fast GEMMs, or None (reference BLAS, macOS)."""
    blas = runtime.configure()
    if blas.path is None:
        return None
    try:
        library = ctypes.CDLL(str(blas.path))
        sgemm = _bind(library.cblas_sgemm)
    except (OSError, AttributeError):
        return None
    mkl_bf16 = getattr(library, "cblas_gemm_bf16bf16f32", None)
    onednn = _onednn()
    installed = [g for g, present in ((dispatch.Bf16Gemm.MKL, mkl_bf16), (dispatch.Bf16Gemm.ONEDNN, onednn))
                 if present is not None]
    choice = dispatch.choose(runtime.cpu_flags(), installed, os.environ.get(dispatch.ENV_VAR, "auto").strip() or "auto")
    log.info("%s", choice.describe())
    local_threads = getattr(library, "MKL_Set_Num_Threads_Local", None)
    if local_threads is not None:
        local_threads.argtypes, local_threads.restype = [ctypes.c_int], ctypes.c_int
    if choice.bf16_gemm is dispatch.Bf16Gemm.MKL:
        return Gemm(sgemm, _bind(mkl_bf16), choice, local_threads)
    if choice.bf16_gemm is dispatch.Bf16Gemm.ONEDNN:
        from mlx_sd.cpu import kernels

        adapter = kernels.onednn_adapter(onednn.dnnl_gemm_bf16bf16f32)
        if adapter is not None:
            return Gemm(sgemm, _bind(adapter), choice, local_threads, *_omp_threads(onednn))
        choice = dispatch.Choice(choice.cpu, None, "the CPU kernels, which adapt oneDNN's GEMM, are not built")
    return Gemm(sgemm, None, choice, local_threads)
