import threading
import time

import pytest

from mlx_sd.engine.errors import QueueFull
from mlx_sd.engine.worker import GenerationWorker


def counting_generate(steps, started, gate=None, progress=None):
    def generate(request, is_cancelled):
        started.append(request)
        for i in range(steps):
            if progress is not None:
                progress.append(i)
            if gate is not None:
                assert gate.acquire(timeout=5)
            if is_cancelled():
                return
            yield (request, i)
    return generate


def test_jobs_run_in_order_and_stream_events():
    started = []
    worker = GenerationWorker(counting_generate(3, started))
    assert list(worker("a")) == [("a", 0), ("a", 1), ("a", 2)]
    assert list(worker("b")) == [("b", 0), ("b", 1), ("b", 2)]
    assert started == ["a", "b"]
    worker.close(5)


def test_errors_reach_the_reader():
    def generate(request, is_cancelled):
        yield 1
        raise ValueError("boom")

    worker = GenerationWorker(generate)
    events = worker("x")
    assert next(events) == 1
    with pytest.raises(ValueError, match="boom"):
        next(events)
    worker.close(5)


def test_full_queue_is_refused_at_once():
    gate = threading.Semaphore(0)
    started = []
    worker = GenerationWorker(counting_generate(1, started, gate), max_queued=1)
    running = worker("running")
    deadline = time.monotonic() + 5
    while not started and time.monotonic() < deadline:
        time.sleep(0.01)
    queued = worker("queued")  # takes the single queue slot
    with pytest.raises(QueueFull):
        worker("overflow")
    gate.release(2)
    assert list(running) == [("running", 0)]
    assert list(queued) == [("queued", 0)]
    worker.close(5)


def test_cancelled_queued_job_never_starts_and_running_job_stops():
    gate = threading.Semaphore(0)  # one release lets the generator take one step
    started, progress = [], []
    worker = GenerationWorker(counting_generate(100, started, gate, progress))
    running = worker("running")
    cancelled_flag = threading.Event()
    queued = worker("queued", cancelled_flag.is_set)
    cancelled_flag.set()
    gate.release()
    assert next(running) == ("running", 0)
    running.close()  # the reader goes away: the job is cancelled
    gate.release(100)
    assert list(queued) == []
    worker.close(5)
    assert started == ["running"]
    assert len(progress) <= 2  # stopped within a step of the cancel, not run to the end
