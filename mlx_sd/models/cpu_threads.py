"""Independent numpy work spread over the CPU's cores.

numpy's elementwise passes (the attention's softmax, the activations) run on one thread but
release the GIL, so blocks of such work can run on a small pool of threads, one per core. Each
pool thread limits its own BLAS calls to one thread (MKL's per-thread setting), so GEMMs made
inside the blocks do not oversubscribe the cores. Without that setting (no MKL), work stays on
the calling thread, as it would be with a 1-core machine.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from mlx_sd.models import cpu_gemm


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _one_blas_thread() -> None:
    cpu_gemm.gemm().set_local_threads(1)


@functools.cache
def _pool() -> tuple[ThreadPoolExecutor, int] | None:
    cores, functions = _cores(), cpu_gemm.gemm()
    if cores < 2 or functions is None or functions.set_local_threads is None:
        return None
    pool = ThreadPoolExecutor(max_workers=cores, thread_name_prefix="mlx-sd-cpu", initializer=_one_blas_thread)
    return pool, cores


def for_each_chunk(fn: Callable[[int, int], None], total: int) -> None:
    """Calls fn(start, stop) on contiguous chunks that cover range(total), one per core, in
    parallel, and returns when all are done. `fn` must not call this itself."""
    pooled = _pool()
    if pooled is None or total < 2:
        fn(0, total)
        return
    pool, cores = pooled
    chunks = min(cores, total)
    bounds = [total * i // chunks for i in range(chunks + 1)]
    for future in [pool.submit(fn, start, stop) for start, stop in zip(bounds, bounds[1:])]:
        future.result()
