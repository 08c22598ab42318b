"""ctypes bindings to the GEMMs the CPU kernels call directly (gemm.py, layers.c, the attention):
the fp32 GEMM of the BLAS that `mlx_sd.cpu.runtime` loaded, the bf16 GEMM that
`mlx_sd.cpu.dispatch` picks for this processor (MKL's, or oneDNN's through an adapter in
layers.c with MKL's arguments), with oneDNN's its direct bf16 convolutions (onednn.py), and the
per-thread thread counts of their runtimes."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_sd.cpu import dispatch, onednn, runtime

log = logging.getLogger(__name__)

# PyPI's onednn-cpu-gomp puts oneDNN's library beside MKL's, in the environment's data prefix.
ONEDNN = Path(sysconfig.get_paths()["data"]) / "lib" / "libdnnl.so.3"


@dataclass(frozen=True)
class Gemm:
    """The GEMM entry points, each with cblas_sgemm's arguments: `sgemm` always; `bf16` where
    `choice` names a bf16 GEMM; `conv`, oneDNN's direct bf16 convolutions, where its bf16 GEMM is
    the choice and they run here. `set_local_threads` (MKL's) and `set_omp_threads` (the OpenMP
    runtime oneDNN runs on) set the calling thread's own thread count, where present."""

    sgemm: ctypes._CFuncPtr
    bf16: ctypes._CFuncPtr | None
    choice: dispatch.Choice
    set_local_threads: ctypes._CFuncPtr | None
    set_omp_threads: ctypes._CFuncPtr | None = None
    get_omp_threads: ctypes._CFuncPtr | None = None
    conv: onednn.Convolutions | None = None

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
def _libraries() -> tuple[ctypes.CDLL, ctypes.CDLL | None] | None:
    """The BLAS that `mlx_sd.cpu.runtime` loaded and oneDNN (None where not installed), or None
    (reference BLAS, macOS)."""
    blas = runtime.configure()
    if blas.path is None:
        return None
    try:
        library = ctypes.CDLL(str(blas.path))
        _bind(library.cblas_sgemm)
    except (OSError, AttributeError):
        return None
    return library, _onednn()


def installed() -> list[dispatch.Bf16Gemm]:
    """The bf16 GEMMs installed here, whether or not this processor runs them well."""
    libraries = _libraries()
    if libraries is None:
        return []
    blas, onednn = libraries
    return [g for g, present in ((dispatch.Bf16Gemm.MKL, hasattr(blas, "cblas_gemm_bf16bf16f32")),
                                 (dispatch.Bf16Gemm.ONEDNN, onednn is not None)) if present]


@functools.cache
def gemm() -> Gemm | None:
    """The fast GEMMs, the bf16 one as `MLX_SD_BF16_GEMM` asks (by default, this processor's
    class decides: mlx_sd.cpu.dispatch), or None (reference BLAS, macOS). Logs the choice."""
    functions = bound(os.environ.get(dispatch.ENV_VAR, "auto").strip() or "auto")
    if functions is not None:
        log.info("%s", functions.choice.describe())
    return functions


def bound(setting: str) -> Gemm | None:
    """The GEMMs under an `MLX_SD_BF16_GEMM` setting (see `gemm`)."""
    libraries = _libraries()
    if libraries is None:
        return None
    blas, onednn = libraries
    from mlx_sd.cpu import kernels

    flags = kernels.cpu_flags()
    choice = dispatch.choose(runtime.cpu_flags() if flags is None else flags, installed(), setting)
    sgemm = blas.cblas_sgemm
    local_threads = getattr(blas, "MKL_Set_Num_Threads_Local", None)
    if local_threads is not None:
        local_threads.argtypes, local_threads.restype = [ctypes.c_int], ctypes.c_int
    if choice.bf16_gemm is dispatch.Bf16Gemm.MKL:
        return Gemm(sgemm, _bind(blas.cblas_gemm_bf16bf16f32), choice, local_threads)
    if choice.bf16_gemm is dispatch.Bf16Gemm.ONEDNN:
        adapter = kernels.onednn_adapter(onednn.dnnl_gemm_bf16bf16f32)
        if adapter is None:
            choice = choice.without("the CPU kernels, which adapt oneDNN's GEMM, are not built")
        elif not _runs(_bind(adapter)):
            choice = choice.without("oneDNN's bf16 GEMM does not run on this processor")
        else:
            return Gemm(sgemm, _bind(adapter), choice, local_threads, *_omp_threads(onednn),
                        conv=_convolutions(onednn))
    return Gemm(sgemm, None, choice, local_threads)


def _runs(bf16: ctypes._CFuncPtr) -> bool:
    """Whether a bf16 GEMM computes a small product right here (oneDNN refuses to run its bf16
    GEMM below AVX-512, and an emulator may report flags its CPU model lacks)."""
    from mlx_sd.cpu import kernels

    a = np.array([[1.5, -2.0], [0.25, 4.0]], np.float32)
    bits, out = (a.view(np.uint32) >> 16).astype(np.uint16), np.zeros((2, 2), np.float32)
    bf16(101, 111, 112, 2, 2, 2, 1.0, bits.ctypes.data, 2, bits.ctypes.data, 2, 0.0, out.ctypes.data, 2)
    return kernels._library().gemm_failures() == 0 and np.array_equal(out, a @ a.T)


def _convolutions(library: ctypes.CDLL) -> onednn.Convolutions | None:
    """oneDNN's direct bf16 convolutions, where they compute a small one right here, else None
    (logged): the bf16 GEMM then computes them as shifted GEMMs."""
    rng = np.random.default_rng(0)  # quarters in [-2, 2): exact in bf16, and so every sum
    x, w = (rng.integers(-8, 8, shape).astype(np.float32) / 4 for shape in ((1, 5, 6, 16), (8, 3, 3, 16)))
    bits = [(a.view(np.uint32) >> 16).astype(np.uint16) for a in (x, w)]
    padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    expected = sum(padded[:, dy:dy + 5, dx:dx + 6] @ w[:, dy, dx].T for dy in range(3) for dx in range(3))
    out = np.empty((1, 5, 6, 8), np.float32)
    try:
        convolutions = onednn.Convolutions(library)
        runs = convolutions.conv2d(*bits, None, None, out)
    except (AttributeError, onednn.ConvolutionError) as exc:
        log.warning("oneDNN's convolutions cannot be used (%s): bf16 convolutions run as GEMMs", exc)
        return None
    if not runs or not np.array_equal(out, expected):
        log.warning("oneDNN's bf16 convolution does not run right here: bf16 convolutions run as GEMMs")
        return None
    return convolutions
