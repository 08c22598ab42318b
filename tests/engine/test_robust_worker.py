"""The worker at shutdown: queued jobs are cancelled at once, the running one gets its grace."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from mlx_sd.engine.errors import QueueFull, ShuttingDown
from mlx_sd.engine.worker import GenerationWorker


def stepping(step_s: float, steps: int, started: list[str]) -> Callable[[str, Callable[[], bool]], Iterator[int]]:
    def generate(request: str, is_cancelled: Callable[[], bool]) -> Iterator[int]:
        started.append(request)
        for i in range(steps):
            time.sleep(step_s)
            if is_cancelled():
                return
            yield i
    return generate


def read_in_background(events: Iterator[int]) -> tuple[threading.Thread, list[object]]:
    got: list[object] = []

    def read() -> None:
        try:
            got.extend(events)
        except Exception as exc:
            got.append(exc)

    thread = threading.Thread(target=read)
    thread.start()
    return thread, got


def test_a_job_running_past_the_grace_is_cancelled_within_a_step() -> None:
    started: list[str] = []
    worker = GenerationWorker(stepping(0.05, 1000, started))
    thread, got = read_in_background(worker("long"))
    while not started:
        time.sleep(0.005)
    # The job would take 50 s; it stops at its next step once the grace has passed.
    assert worker.shutdown(grace=0.2, timeout=30.0)
    thread.join(5)
    assert isinstance(got[-1], ShuttingDown) and len(got) < 1000


def test_shutdown_ends_the_queued_job_at_once_and_lets_the_running_one_finish_within_its_grace() -> None:
    release, started = threading.Event(), []

    def generate(request: str, is_cancelled: Callable[[], bool]) -> Iterator[str]:
        started.append(request)
        assert release.wait(30)  # the running job cannot finish before the shutdown has begun
        yield request

    worker = GenerationWorker(generate)
    running, running_got = read_in_background(worker("running"))
    queued, queued_got = read_in_background(worker("queued"))
    while not started:
        time.sleep(0.005)
    stopping = threading.Thread(target=worker.shutdown, kwargs={"grace": 60.0, "timeout": 30.0})
    stopping.start()
    queued.join(30)  # while the running job is still held inside its grace
    assert not running_got and len(queued_got) == 1 and isinstance(queued_got[0], ShuttingDown)
    release.set()
    stopping.join(30)
    running.join(30)
    assert running_got == ["running"] and started == ["running"]


def test_no_work_is_taken_after_shutdown() -> None:
    worker = GenerationWorker(stepping(0, 1, []))
    worker.shutdown(grace=0, timeout=5.0)
    with pytest.raises(ShuttingDown):
        worker("late")


def test_the_depth_counts_only_waiting_jobs() -> None:
    gate = threading.Event()

    def generate(request: str, is_cancelled: Callable[[], bool]) -> Iterator[str]:
        gate.wait(5)
        yield request

    worker = GenerationWorker(generate, max_queued=1)
    first = worker("first")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # until the worker has taken the first job off the queue
        try:
            second = worker("second")
            break
        except QueueFull:
            time.sleep(0.01)
    with pytest.raises(QueueFull):
        worker("third")
    gate.set()
    assert list(first) == ["first"] and list(second) == ["second"]
    worker.close(5)
