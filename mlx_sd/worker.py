"""The one thread that owns MLX: generations run here one at a time, in arrival order.

RPC threads never touch MLX arrays. They submit a request and read its events from a
per-job queue; cancelling a job sets a flag that the pipeline checks between sampling steps,
and a job cancelled while still queued never starts.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from .errors import QueueFull

log = logging.getLogger(__name__)

_DONE = object()
_POLL_S = 0.1  # how often a waiting reader re-checks its own cancellation


class Generate(Protocol):
    def __call__(self, request: Any, is_cancelled: Callable[[], bool]) -> Iterator[Any]: ...


class _Job:
    def __init__(self, request: Any, is_cancelled: Callable[[], bool]) -> None:
        self.request = request
        self.outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._caller_cancelled = is_cancelled

    def cancel(self) -> None:
        self._cancelled.set()

    def is_cancelled(self) -> bool:
        return self._cancelled.is_set() or self._caller_cancelled()


class GenerationWorker:
    """Runs `generate` on a single thread behind a bounded FIFO queue.

    Calling the worker has the same shape as calling `generate` itself, so the server can
    take either: `worker(request, is_cancelled)` yields the job's events in the caller's thread.
    """

    def __init__(self, generate: Generate, max_queued: int = 8,
                 after_job: Callable[[], None] | None = None) -> None:
        self._generate = generate
        self._after_job = after_job
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queued)
        self._thread = threading.Thread(target=self._run, name="mlx-worker", daemon=True)
        self._thread.start()

    def __call__(self, request: Any, is_cancelled: Callable[[], bool] = lambda: False) -> Iterator[Any]:
        job = _Job(request, is_cancelled)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(self._jobs.maxsize) from None
        return self._events(job)

    def close(self, timeout: float | None = None) -> None:
        """Stops taking work once the queued jobs are done (cancel them first to stop sooner)."""
        self._jobs.put(None)
        self._thread.join(timeout)

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
        while (job := self._jobs.get()) is not None:
            try:
                if not job.is_cancelled():
                    for event in self._generate(job.request, job.is_cancelled):
                        job.outbox.put(event)
                        if job.is_cancelled():
                            break
            except Exception as exc:  # handed to the reader, which raises it in its own thread
                job.outbox.put(exc)
            finally:
                job.outbox.put(_DONE)
                if self._after_job is not None:
                    self._after_job()
