"""Independent numpy and C-kernel work spread over the CPU's cores.

numpy's passes and BLAS calls run on one thread but release the GIL, so blocks of such work
can run on a small pool of threads, one per core: the checkpoint reader's reads, the BLAS form
of the attention. (The C kernels spread their own work over a pool in C, pool.c, which
hands work over without waking threads.) Each pool thread limits its own GEMMs to one
thread (MKL's per-thread setting, and OpenMP's where oneDNN computes the bf16 products), so
GEMMs made inside the blocks do not oversubscribe the cores. Without that setting (no MKL), work stays on the calling thread, as it would be with a
1-core machine.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait

from mlx_sd.cpu.blas import gemm

# Jobs reading fewer values than this run on the calling thread: waking the pool costs more
# (LayerNorm over 2x77x768, CLIP's size: 0.17 ms on one thread, 0.30 ms on two).
SMALL_JOB = 1 << 18


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _one_blas_thread() -> None:
    gemm().one_thread()


@functools.cache
def _pool() -> tuple[ThreadPoolExecutor, int] | None:
    count, functions = cores(), gemm()
    if count < 2 or functions is None or not functions.per_thread:
        return None
    pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="mlx-sd-cpu", initializer=_one_blas_thread)
    return pool, count


def for_each_chunk(fn: Callable[[int, int], None], total: int, values: int | None = None) -> None:
    """Calls fn(start, stop) on contiguous chunks that cover range(total), one per core, in
    parallel, and returns when all are done. `values`, about how many values the whole job
    reads, sends jobs under SMALL_JOB to the calling thread alone. `fn` must not call this itself.

    The calling thread runs the first chunk itself, its BLAS calls on one thread meanwhile:
    handing a chunk to the pool and waiting for it cost 50-90 µs each way, as much as a small
    kernel (a 512x640 bf16 linear layer: 0.55 ms, of which the GEMMs took 0.24)."""
    small = total < 2 or (values is not None and values < SMALL_JOB)
    pooled = None if small else _pool()
    if pooled is None:
        fn(0, total)
        return
    pool, count = pooled
    chunks = min(count, total)
    bounds = [total * i // chunks for i in range(chunks + 1)]
    futures = [pool.submit(fn, start, stop) for start, stop in zip(bounds[1:], bounds[2:])]
    previous = gemm().one_thread()
    try:
        fn(bounds[0], bounds[1])
    finally:
        gemm().restore(previous)
        wait(futures)  # all done before returning or raising: they write the caller's buffers
    for future in futures:
        future.result()


def least_loaded(sizes: Iterable[int], count: int) -> list[int]:
    """For each item of `sizes`, in order, the least loaded of `count` bins when it is assigned."""
    loads, bins = [0] * count, []
    for size in sizes:
        chosen = loads.index(min(loads))
        bins.append(chosen)
        loads[chosen] += size
    return bins
