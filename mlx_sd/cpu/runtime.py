"""Choose the BLAS that MLX's CPU backend calls on Linux.

The mlx[cpu] wheel resolves `cblas_sgemm` & co. from a bundled reference BLAS that is about
50x slower than an optimised one. The dynamic linker searches libraries loaded with
RTLD_GLOBAL before a module's own dependencies, so loading a fast BLAS that way *before*
`mlx.core` is first imported makes MLX use it. Matrix products and convolutions (MLX lowers
convolutions to GEMM) are where the CPU time goes.

This is the package's one deliberate exception to "no import-time environment reads": the
choice has to be made before MLX loads, i.e. before settings are parsed, so `configure()`
reads `MLX_SD_BLAS` (and sets `OPENBLAS_CORETYPE` if the user has not). Entry points call
`configure()` before anything imports `mlx.core`; importing this module does nothing.

On glibc, `configure()` also keeps freed heap pages mapped for reuse (see `keep_heap_pages`), and
on Linux asks numpy not to advise huge pages (see `keep_numpy_pages_small`).

`MLX_SD_BLAS`: `auto` (default: the first candidate found, in `PREFERENCE` order),
`reference` (MLX's bundled BLAS), a candidate name (`mkl`, `openblas`), or a library path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform
import sys
import sysconfig
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ENV_VAR = "MLX_SD_BLAS"
# Fastest first, as measured by benchmarks/blas_candidates.py (see the README).
PREFERENCE = ("mkl", "openblas")


@dataclass(frozen=True)
class Blas:
    """A BLAS library: `path` is None for the one MLX was built with."""

    name: str
    path: Path | None = None


REFERENCE = Blas("reference")
ACCELERATE = Blas("accelerate")


def candidate_paths(data_dir: Path, site_dir: Path, multiarch: str | None) -> dict[str, list[Path]]:
    """Where each fast BLAS would be, by name.

    PyPI's `mkl` installs into the environment's data prefix (`<venv>/lib`); Debian's
    `libopenblas0-*` packages provide the `libopenblas.so.0` alternative. OpenBLAS builds
    shipped inside numpy/scipy wheels export prefixed symbols (`scipy_cblas_sgemm`), which
    MLX cannot bind to, so they are not candidates.
    """
    system_dirs = [Path("/usr/lib") / multiarch] if multiarch else []
    system_dirs += [Path("/usr/lib64"), Path("/usr/lib")]
    return {
        "mkl": [data_dir / "lib" / "libmkl_rt.so.3", data_dir / "lib" / "libmkl_rt.so.2"],
        "openblas": [d / "libopenblas.so.0" for d in system_dirs]
        + [site_dir / "cmeel.prefix" / "lib" / "libopenblas.so.0"],
    }


def find_candidates(paths: dict[str, list[Path]], exists: Callable[[Path], bool] = Path.exists) -> list[Blas]:
    """The installed candidates in preference order (first existing path of each)."""
    found = []
    for name in PREFERENCE:
        path = next((p for p in paths.get(name, []) if exists(p)), None)
        if path is not None:
            found.append(Blas(name, path))
    return found


def select(choice: str, candidates: Iterable[Blas]) -> Blas:
    """Resolve an `MLX_SD_BLAS` value against the installed candidates."""
    candidates = list(candidates)
    if choice == "reference":
        return REFERENCE
    if choice == "auto":
        return candidates[0] if candidates else REFERENCE
    if "/" in choice:
        name = Path(choice).name
        return Blas(next((n for n in PREFERENCE if n in name), "custom"), Path(choice))
    for blas in candidates:
        if blas.name == choice:
            return blas
    raise ValueError(f"{ENV_VAR}={choice!r}: not installed (found: {[b.name for b in candidates] or 'none'})")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def openblas_coretype(flags: set[str]) -> str | None:
    """The OpenBLAS kernel family for these CPU flags.

    Some OpenBLAS releases (Debian 12's 0.3.21) misdetect virtualised Xeons as "Prescott"
    and run ~4x slower; naming the family from the flags avoids that.
    """
    if "avx512f" in flags:
        return "SkylakeX"
    if "avx2" in flags:
        return "Haswell"
    if "avx" in flags:
        return "Sandybridge"
    return None


def preload(
    blas: Blas,
    env: MutableMapping[str, str],
    flags: Callable[[], set[str]] = cpu_flags,
    load: Callable[..., object] = ctypes.CDLL,
) -> Blas:
    """Load `blas` globally; on failure log why and return the reference BLAS instead."""
    if blas.path is None:
        return blas
    if blas.name == "openblas" and "OPENBLAS_CORETYPE" not in env:
        coretype = openblas_coretype(flags())
        if coretype:
            env["OPENBLAS_CORETYPE"] = coretype  # read by OpenBLAS when it loads
    if blas.name == "mkl":
        # MKL's OpenMP threads spin for 200 ms after each parallel GEMM, yielding in a loop (257k
        # sched_yield calls in one 512² UNet step), and so take the cores from the CPU kernels'
        # pool threads that run in between. At 1 ms they still bridge the microseconds between
        # back-to-back GEMMs (a convolution's taps), but sleep before the kernels run. bf16 at
        # 512²: UNet step 2.43-2.49 s against 2.53, VAE decode 3.40-3.47 s against 3.69; at 0 ms
        # every GEMM waits for its threads to wake (VAE decode 4.09 s). Read when MKL loads.
        env.setdefault("KMP_BLOCKTIME", "1")
    try:
        load(str(blas.path), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        log.warning("could not load %s BLAS (%s); using MLX's reference BLAS, which is much slower", blas.name, exc)
        return REFERENCE
    return blas


# glibc's mallopt parameters.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c"))


def keep_heap_pages(libc: ctypes.CDLL | None = None) -> bool:
    """Keep freed memory mapped for reuse (glibc only); returns whether it was set.

    glibc serves blocks over its mmap threshold (at most 32 MiB) from fresh mappings and unmaps
    them when freed, and MLX keeps no buffer cache on the CPU, so each large activation pays a
    page fault per 4 KiB page: an elementwise op over 84 MB took 34 ms, against 13 ms with the
    heap's pages kept for reuse. `trim_heap()` hands the pages back when a job ends.

    All threads share one arena: MLX allocates its results on its stream's thread and the CPU
    kernels on the caller's (cpu_buffers), and with an arena each, both kept their freed pages
    (a 512², 20-step bf16 generation peaked at 3.55 GiB, against 3.35 GiB with one arena, in the
    same time). Set before MLX starts its threads.
    """
    libc = libc or _glibc()
    if libc is None:
        return False
    return all(libc.mallopt(param, value) for param, value in
               ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_ARENA_MAX, 1)))


def keep_numpy_pages_small(env: MutableMapping[str, str]) -> None:
    """Ask numpy not to advise 2 MiB pages (MADV_HUGEPAGE) for its large arrays, unless the user
    set NUMPY_MADVISE_HUGEPAGE; read when numpy is imported.

    The CPU kernels' scratch arrays come from the heap that MLX's results share, and where numpy
    had advised huge pages the first touch of fresh memory went through the kernel's huge-page
    allocation: the first 512² bf16 VAE decode of a process took 3.5 s (1.4 s of it in the
    kernel), against 2.8 s without; later decodes, which reuse the memory, took 2.5 s either way.
    """
    env.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")


# madvise(2) advice that maps a range's pages in, writable (Linux 5.14 and later).
MADV_POPULATE_WRITE = 23
PAGE = 4096


def populate(address: int, length: int, libc: ctypes.CDLL | None = None) -> bool:
    """Map in the whole pages of [address, address + length), writable, in one system call,
    before memory is written whole (glibc on Linux 5.14+; elsewhere nothing). Returns whether it
    was done.

    Fresh memory otherwise takes a page fault per 4 KiB page at its first write, each a trip in
    and out of the kernel: a cold fp16 load (2.1 GB, 525k pages) took 0.83 s, against 0.75 s
    with each tensor's pages mapped in first."""
    libc = libc or _glibc()
    first, last = -(-address // PAGE) * PAGE, (address + length) // PAGE * PAGE
    if libc is None or last <= first:
        return False
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(first, last - first, MADV_POPULATE_WRITE) == 0


def trim_heap(libc: ctypes.CDLL | None = None) -> None:
    """Return the heap's free pages to the system (glibc only)."""
    libc = libc or _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def release_memory() -> None:
    """Hands back what a finished generation held beyond the loaded model: MLX's cache of freed
    buffers, and on glibc the freed heap pages kept for reuse while it ran."""
    import mlx.core as mx

    mx.clear_cache()
    trim_heap()


@functools.cache
def configure() -> Blas:
    """Pick and load the BLAS once per process; call before `mlx.core` is imported.

    Logs one line naming the BLAS in use. Called after `mlx.core` was imported, it still loads the
    BLAS for the CPU kernels, and warns that MLX's own products keep the BLAS MLX bound.
    """
    if sys.platform == "darwin":
        return ACCELERATE  # MLX uses Accelerate (and Metal); nothing to do
    if sys.platform != "linux":
        return REFERENCE
    keep_heap_pages()
    keep_numpy_pages_small(os.environ)
    late = "mlx.core" in sys.modules
    paths = candidate_paths(
        Path(sysconfig.get_paths()["data"]),
        Path(sysconfig.get_paths()["purelib"]),
        sysconfig.get_config_var("MULTIARCH"),
    )
    choice = os.environ.get(ENV_VAR, "auto").strip() or "auto"
    chosen = select(choice, find_candidates(paths))
    blas = preload(chosen, os.environ)
    if blas is not chosen:
        return blas  # preload logged the failure and the fallback
    if late and blas.path is not None:
        # MLX bound its bundled BLAS when it was imported (Python loads extensions with RTLD_NOW), so
        # its own products stay on it; the CPU kernels, which call the BLAS loaded here, and their
        # pool of threads are unaffected (without it they would run on one thread).
        log.warning("mlx.core was imported before the BLAS was chosen: MLX's own matrix products keep its "
                    "bundled reference BLAS (several times slower); the CPU kernels use %s. Call "
                    "mlx_sd.cpu.runtime.configure() before importing mlx.core", blas.name)
    elif blas.path is None:
        log.info("BLAS: MLX's bundled reference BLAS (slow; `pip install mkl` or install OpenBLAS)")
    else:
        coretype = os.environ.get("OPENBLAS_CORETYPE", "") if blas.name == "openblas" else ""
        log.info("BLAS: %s (%s%s)", blas.name, blas.path, f", OPENBLAS_CORETYPE={coretype}" if coretype else "")
    return blas
