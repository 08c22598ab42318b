"""threads.for_each_chunk: the chunks, who runs them, the BLAS threads, and failures."""

from __future__ import annotations

import threading
import time

import pytest

from mlx_sd.cpu import threads

pytestmark = pytest.mark.skipif(threads._pool() is None, reason="no pool here (one core, or no MKL)")


class Counting:
    """Stands in for the GEMMs' per-thread thread counts (blas.Gemm)."""

    def __init__(self) -> None:
        self.local: dict[int, int] = {}
        self.seen: dict[int, int] = {}

    def one_thread(self) -> int:
        me = threading.get_ident()
        previous = self.local.get(me, 0)
        self.local[me] = 1
        return previous

    def restore(self, previous: int) -> None:
        self.local[threading.get_ident()] = previous


def test_chunks_cover_the_range_once_and_the_caller_runs_one_with_one_blas_thread(monkeypatch) -> None:
    blas = Counting()
    monkeypatch.setattr(threads, "gemm", lambda: blas)
    runs: list[tuple[int, int, int, int]] = []

    def chunk(start: int, stop: int) -> None:
        me = threading.get_ident()
        runs.append((start, stop, me, blas.local.get(me, 1)))  # pool threads were set to 1 when made

    threads.for_each_chunk(chunk, 101, values=1 << 30)
    spans = sorted((start, stop) for start, stop, _, _ in runs)
    assert spans[0][0] == 0 and spans[-1][1] == 101 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert len(runs) == min(threads.cores(), 101)
    caller = [run for run in runs if run[2] == threading.get_ident()]
    assert [run[:2] for run in caller] == [spans[0]] and caller[0][3] == 1
    assert blas.local[threading.get_ident()] == 0  # restored afterwards


@pytest.mark.parametrize("failing", [0, 1], ids=["caller's chunk", "pool's chunk"])
def test_a_failing_chunk_raises_after_every_chunk_has_finished(failing: int) -> None:
    finished: list[int] = []

    def chunk(start: int, stop: int) -> None:
        if start == 0:
            index = 0
        else:
            index = 1
            time.sleep(0.05)  # the pool's chunk finishes last
        if index == failing:
            raise RuntimeError(f"chunk {index}")
        finished.append(index)

    with pytest.raises(RuntimeError, match=f"chunk {failing}"):
        threads.for_each_chunk(chunk, 2, values=1 << 30)
    assert finished == [1 - failing]
