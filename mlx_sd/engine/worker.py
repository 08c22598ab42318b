"""The one thread that owns MLX: generations run here one at a time, in arrival order.

RPC threads never touch MLX arrays. They submit a request and read its events from a
per-job queue; cancelling a job sets a flag that the pipeline checks between sampling steps,
and a job cancelled while still queued never starts. At shutdown, queued jobs are cancelled
and the running one gets a grace period; their readers then get ShuttingDown.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from .errors import QueueFull, ShuttingDown

log = logging.getLogger(__name__)

_DONE = object()
_POLL_S = 0.1  # how often a waiting reader re-checks its own cancellation
_SHUTDOWN_MESSAGE = "the server is shutting down; try again once it is back"


class Generate(Protocol):
    def __call__(self, request: Any, is_cancelled: Callable[[], bool]) -> Iterator[Any]: ...


class _Job:
    def __init__(self, request: Any, is_cancelled: Callable[[], bool]) -> None:
        self.request = request
        self.outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.stop_reason: Exception | None = None  # handed to the reader when the worker stopped the job
        self._cancelled = threading.Event()
        self._caller_cancelled = is_cancelled

    def cancel(self, reason: Exception | None = None) -> None:
        if reason is not None and not self._cancelled.is_set():
            self.stop_reason = reason
        self._cancelled.set()

    def is_cancelled(self) -> bool:
        return self._cancelled.is_set() or self._caller_cancelled()


class GenerationWorker:
    """Runs `generate` on a single thread behind a bounded FIFO queue.

    Calling the worker has the same shape as calling `generate` itself, so the server can
    take either: `worker(request, is_cancelled)` yields the job's events in the caller's thread.
    """

    def __init__(self, generate: Generate, max_queued: int = 8,
                 after_job: Callable[[], None] | None = None, on_exit: Callable[[], None] | None = None) -> None:
        """`after_job` runs after every job and `on_exit` once as the thread ends, both on the thread."""
        self._generate = generate
        self._max_queued = max_queued
        self._after_job = after_job
        self._on_exit = on_exit
        self._lock = threading.Lock()  # guards the three fields below and the closing of the queue
        self._waiting: deque[_Job] = deque()  # jobs queued and not yet started, oldest first
        self._running: _Job | None = None
        self._closed = False
        # Unbounded so that closing never blocks; _waiting enforces the depth.
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mlx-worker", daemon=True)
        self._thread.start()

    def __call__(self, request: Any, is_cancelled: Callable[[], bool] = lambda: False) -> Iterator[Any]:
        job = _Job(request, is_cancelled)
        with self._lock:
            if self._closed:
                raise ShuttingDown(_SHUTDOWN_MESSAGE)
            if len(self._waiting) >= self._max_queued:
                raise QueueFull(self._max_queued)
            self._waiting.append(job)
            self._jobs.put(job)
        return self._events(job)

    @property
    def queued(self) -> int:
        """How many jobs wait behind the running one."""
        with self._lock:
            return len(self._waiting)

    def close(self, timeout: float | None = None) -> None:
        """Stops taking work once the queued jobs are done (cancel them first to stop sooner)."""
        self._stop_taking_work()
        self._thread.join(timeout)

    def shutdown(self, grace: float, timeout: float | None = None) -> bool:
        """Stops taking work: ends the queued jobs at once (their readers get ShuttingDown now, not
        when the worker would have reached them) and gives the running one `grace` seconds to
        finish before cancelling it too (it then stops within a step). Waits up to `timeout` more
        seconds for the thread to end; returns whether it did."""
        self._stop_taking_work()
        self._abandon_waiting()
        self._thread.join(grace)
        if self._thread.is_alive():
            self.cancel_all()
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def cancel_all(self) -> None:
        """Cancels every queued and running job; their readers get ShuttingDown."""
        self._abandon_waiting()
        with self._lock:
            running = self._running
        if running is not None:
            running.cancel(ShuttingDown(_SHUTDOWN_MESSAGE))

    def abandon(self, reason: Exception) -> None:
        """Stops taking work and ends every job with `reason` at once, the running one too, without
        waiting for the thread, which may never come back (a collective a lost machine never joins)."""
        self._stop_taking_work()
        self._abandon_waiting(reason)
        with self._lock:
            running = self._running
        if running is not None:
            _end(running, reason)

    def _abandon_waiting(self, reason: Exception | None = None) -> None:
        """Ends every job still queued: taken off the queue, its reader told at once."""
        with self._lock:
            jobs, self._waiting = list(self._waiting), deque()
        for job in jobs:
            _end(job, reason or ShuttingDown(_SHUTDOWN_MESSAGE))

    def _stop_taking_work(self) -> None:
        """Refuses new jobs from now on."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._jobs.put(None)

    @staticmethod
    def _events(job: _Job) -> Iterator[Any]:
        try:
            while True:
                try:
                    item = job.outbox.get(timeout=_POLL_S)
                except queue.Empty:
                    if job.is_cancelled():
                        job.cancel()  # latch, so the worker sees it even if the caller's flag resets
                    continue
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # The reader went away (finished, cancelled or failed): nothing more is wanted.
            job.cancel()

    def _run(self) -> None:
        try:
            while (job := self._jobs.get()) is not None:
                with self._lock:
                    if job not in self._waiting:  # ended while queued
                        continue
                    self._waiting.remove(job)
                    self._running = job
                try:
                    self._run_job(job)
                finally:
                    with self._lock:
                        self._running = None
        finally:
            if self._on_exit is not None:
                self._on_exit()

    def _run_job(self, job: _Job) -> None:
        try:
            if not job.is_cancelled():
                for event in self._generate(job.request, job.is_cancelled):
                    job.outbox.put(event)
                    if job.is_cancelled():
                        break
        except Exception as exc:  # handed to the reader, which raises it in its own thread
            job.outbox.put(exc)
        finally:
            if job.stop_reason is not None:
                job.outbox.put(job.stop_reason)
            job.outbox.put(_DONE)
            if self._after_job is not None:
                self._after_job()


def _end(job: _Job, reason: Exception) -> None:
    """Cancels `job` and tells its reader why, now."""
    job.cancel(reason)
    job.outbox.put(job.stop_reason)
    job.outbox.put(_DONE)
