"""Several processes (one per Mac) behind one server, over MLX's distributed runtime (`mx.distributed`).

Rank 0 runs the server and its one MLX thread; every other rank runs `follow`, the same pipeline on
its own MLX thread. Everything between them goes through collectives of fixed-size buffers, so the
ranks always agree on the size of the next exchange:

1. the request: rank 0's JSON of the domain request (its seed already drawn), padded to MESSAGE_BYTES;
2. a status after every sampling step (running, rank 0's cancel flag); once a rank's share is done it
   keeps exchanging "done" until every rank is, which tells all of them the shape of the pixels;
3. the pixels: every rank's images padded to the largest share, gathered on rank 0.

Image i of a request is made by rank i mod N, from the seed it has on one machine. Rank 0 reports a
sampling step after the status exchange that follows it, so a step counts once every rank finished it,
and its cancel flag reaches the other ranks within that step.

Faults: a collective that fails (a rank died: its socket closed) or that does not finish within
`timeout` seconds (a rank stopped answering) ends the running request with RankLost (UNAVAILABLE) and
calls `on_lost`: the server then exits with a failure status (mlx_sd.app.distributed), for the
service manager to restart the whole group. The ring backend's collectives cannot be interrupted or
given a timeout, and a group cannot be formed again within a process, so rank 0 cannot go on alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from mlx_sd.engine.errors import MlxSdError, RankLost
from mlx_sd.engine.events import SAMPLING_STAGES, GeneratedImage, GenerationResult, ProgressEvent
from mlx_sd.engine.lora import LoraWeight
from mlx_sd.engine.request import GenerationRequest
from mlx_sd.engine.worker import GenerationWorker

if TYPE_CHECKING:
    import mlx.core as mx

    from mlx_sd.engine.pipeline import Pipeline

log = logging.getLogger(__name__)

# The request's JSON: two prompts of at most 10,000 characters, each at most 6 bytes (a \u escape), and the rest.
MESSAGE_BYTES = 1 << 17
_HEADER = struct.Struct("<I")
# A rank's status: state, rank 0's cancel flag, failed, images made, their height and width.
_RUNNING, _DONE = 0, 1
_SIGNATURE = 8  # bytes after each rank's part of a collective: its rank + 1
_RANK_0_FIELDS = ("init_image", "mask", "source")  # image to image's, which only rank 0 holds
_DEFAULT = GenerationRequest()
# Fields JSON carries as lists of objects, and how each is rebuilt (every other field is a scalar).
_REBUILD = {"loras": lambda items: tuple(LoraWeight(**item) for item in items)}


def _signature(rank: int) -> np.ndarray:
    return np.frombuffer(struct.pack("<q", rank + 1), np.uint8)


def spreads(request: GenerationRequest) -> bool:
    """Whether the request's images are spread over the group: image to image runs on rank 0 alone,
    since its init image and mask (megabytes) do not fit a fixed-size message."""
    return all(getattr(request, name) == getattr(_DEFAULT, name) for name in _RANK_0_FIELDS)


def encode_request(request: GenerationRequest | None) -> np.ndarray:
    """The request (one that `spreads`) as a fixed-size message; None asks the other ranks to stop."""
    fields = None if request is None else {
        field.name: getattr(request, field.name) for field in dataclasses.fields(request)
        if field.name not in _RANK_0_FIELDS
    }
    body = json.dumps(fields, ensure_ascii=False, default=dataclasses.asdict).encode()
    if len(body) > MESSAGE_BYTES - _HEADER.size:
        raise MlxSdError(f"the request takes {len(body)} bytes, more than the {MESSAGE_BYTES} a message holds")
    message = np.zeros(MESSAGE_BYTES, np.uint8)
    message[:_HEADER.size + len(body)] = np.frombuffer(_HEADER.pack(len(body)) + body, np.uint8)
    return message


def decode_request(message: np.ndarray) -> GenerationRequest | None:
    (length,) = _HEADER.unpack(message[:_HEADER.size].tobytes())
    fields = json.loads(message[_HEADER.size:_HEADER.size + length].tobytes())
    if fields is None:
        return None
    return GenerationRequest(**{name: _REBUILD.get(name, lambda value: value)(value) for name, value in fields.items()})


class Links:
    """The group's collectives, each of fixed-size buffers, each failing with RankLost when the group
    breaks, after calling `on_lost`. With a `timeout` (rank 0), a watchdog calls `on_lost` once a
    collective has run that long: the thread stuck in it cannot be freed, so `on_lost` must end the
    running request and the process."""

    def __init__(self, group: mx.distributed.Group, timeout: float | None = None,
                 on_lost: Callable[[RankLost], None] = lambda error: None) -> None:
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self._timeout = timeout
        self._on_lost = on_lost
        self._deadline: float | None = None
        self._what = ""
        self._changed = threading.Condition()
        if timeout is not None:
            threading.Thread(target=self._watch, name="collective-watchdog", daemon=True).start()

    def gather(self, buffer: np.ndarray, what: str) -> np.ndarray:
        """Every rank's `buffer` (the same shape on all), stacked in rank order."""
        import mlx.core as mx

        # Each rank signs its part: a ring that broke may complete a collective with parts unfilled.
        part = np.concatenate([np.ascontiguousarray(buffer).reshape(-1).view(np.uint8), _signature(self.rank)])
        with self._watched(what):
            try:
                parts = np.array(mx.distributed.all_gather(mx.array(part), group=self.group, stream=mx.cpu))
            except RuntimeError as exc:  # the ring backend's "connection to a peer was lost"
                raise self._lost(f"was lost while exchanging {what} ({exc})") from exc
        parts = parts.reshape(self.size, part.size)
        if unsigned := [rank for rank in range(self.size) if not (parts[rank, -_SIGNATURE:] == _signature(rank)).all()]:
            raise self._lost(f"sent nothing while exchanging {what}", unsigned[0])
        return parts[:, :-_SIGNATURE].copy().view(buffer.dtype).reshape(self.size, *buffer.shape)

    def _lost(self, how: str, rank: int | None = None) -> RankLost:
        error = self.lost(how, rank)
        self._on_lost(error)
        return error

    def lost(self, how: str, rank: int | None = None) -> RankLost:
        """The error for a rank that failed `how`; which rank, when known (else: with two ranks, the
        other one; in a larger ring the sockets do not say)."""
        if rank is None and self.size == 2:
            rank = 1 - self.rank
        who = f"rank {rank}" if rank is not None else "one of the other ranks"
        return RankLost(f"{who} {how}; the group restarts, try again once it is back")

    @contextlib.contextmanager
    def _watched(self, what: str) -> Iterator[None]:
        if self._timeout is None:
            yield
            return
        with self._changed:
            self._deadline, self._what = time.monotonic() + self._timeout, what
            self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                self._deadline = None
                self._changed.notify()

    def _watch(self) -> None:
        with self._changed:
            while True:
                if self._deadline is None:
                    self._changed.wait()
                elif (left := self._deadline - time.monotonic()) > 0:
                    self._changed.wait(left)
                else:
                    break
            what = self._what
        self._on_lost(self.lost(f"did not answer within {self._timeout:g} s while exchanging {what}"))


@dataclasses.dataclass
class _Share:
    """One rank's share of a request (images rank, rank + N, ...), run in step with the other ranks."""

    pipeline: Pipeline
    links: Links
    request: GenerationRequest
    images: list[GeneratedImage] | None = None
    error: Exception | None = None
    stop: bool = False
    steps: int = 0  # sampling steps made

    def run(self, is_cancelled: Callable[[], bool]) -> Iterator[ProgressEvent]:
        """The pipeline's events, each sampling step after every rank finished it. Errors are kept
        for `settle`, since the other ranks wait for this one."""
        share = share_of(self.links.rank, self.links.size, self.request.batch_size * self.request.batch_count)
        try:
            for event in self.pipeline(self.request, lambda: self.stop, images=share):
                if isinstance(event, GenerationResult):
                    self.images = event.images
                    continue
                if event.type in SAMPLING_STAGES:
                    self.steps += 1
                    statuses = self._exchange(_RUNNING, cancel=is_cancelled())
                    self.stop = bool(statuses[0, 1])
                yield event
        except Exception as exc:  # noqa: BLE001  (reported to the group, then raised by rank 0)
            if isinstance(exc, RankLost):
                raise
            self.error = exc

    def settle(self, cancel: bool) -> list[GeneratedImage] | None:
        """Exchanges "done" until every rank is, then gathers the pixels. Returns the request's images
        on rank 0 (this rank's elsewhere), None when cancelled; raises the error a rank met."""
        while True:
            mine = self.images or []
            height, width = mine[0].pixels.shape[:2] if mine else (0, 0)
            statuses = self._exchange(_DONE, cancel, failed=self.error is not None, count=len(mine),
                                      height=height, width=width)
            if (statuses[:, 0] == _DONE).all():
                break
            self.stop = self.stop or bool(statuses[0, 1])
        log.info("rank %d made %d sampling steps of a request", self.links.rank, self.steps)
        if statuses[0, 1]:
            return None
        if failed := [rank for rank in range(self.links.size) if statuses[rank, 2]]:
            if self.error is not None:
                raise self.error
            raise MlxSdError(f"rank {failed[0]} could not make its images (its log says why)")
        count, height, width = int(statuses[:, 3].max()), int(statuses[0, 4]), int(statuses[0, 5])
        pixels = np.zeros((count, height, width, 3), np.uint8)
        for i, image in enumerate(mine):
            pixels[i] = image.pixels
        gathered = self.links.gather(pixels, "the pixels")
        return mine if self.links.rank else self._in_request_order(gathered, statuses[:, 3])

    def _in_request_order(self, gathered: np.ndarray, counts: np.ndarray) -> list[GeneratedImage]:
        """Image i is rank i mod N's image i // N; its parameters are rank 0's but for its seed."""
        assert self.images  # rank 0 makes image 0
        first = self.images[0]
        out = []
        for i in range(int(counts.sum())):
            rank, j = i % self.links.size, i // self.links.size
            seed = first.seed + i
            out.append(GeneratedImage(gathered[rank, j].copy(), seed,
                                      dataclasses.replace(first.parameters, seed=seed)))
        return out

    def _exchange(self, state: int, cancel: bool, failed: bool = False, count: int = 0, height: int = 0,
                  width: int = 0) -> np.ndarray:
        status = np.array([state, cancel and self.links.rank == 0, failed, count, height, width], np.int64)
        return self.links.gather(status, "the progress")


class Leader:
    """Rank 0's generate: the pipeline's shape for the worker (`GenerationWorker(Leader(...))`), with
    the request's images made by every rank."""

    def __init__(self, pipeline: Pipeline, links: Links) -> None:
        self._pipeline = pipeline
        self._links = links

    def __call__(self, request: GenerationRequest,
                 is_cancelled: Callable[[], bool] = lambda: False) -> Iterator[ProgressEvent | GenerationResult]:
        if not spreads(request):
            yield from self._pipeline(request, is_cancelled)
            return
        # Every rank makes its images from the same seeds, so the random one is drawn here.
        request = dataclasses.replace(request, seed=request.seed if request.seed >= 0 else secrets.randbelow(2**32))
        self._links.gather(encode_request(request), "the request")
        share = _Share(self._pipeline, self._links, request)
        try:
            yield from share.run(is_cancelled)
        except GeneratorExit:  # the worker stopped reading (cancelled): the other ranks still wait
            share.settle(cancel=True)
            raise
        images = share.settle(cancel=is_cancelled())
        if images is not None:
            yield GenerationResult(images)

    def stop_followers(self) -> None:
        """Tells the other ranks to exit (the server is stopping)."""
        self._links.gather(encode_request(None), "the stop message")


def follow(pipeline: Pipeline, links: Links, after_job: Callable[[], None] | None = None) -> None:
    """A rank > 0: makes its share of each request rank 0 sends, until it sends none. Raises RankLost
    when the group breaks (the process should then exit, for the service manager to restart it)."""
    empty = np.zeros(MESSAGE_BYTES, np.uint8)
    while (request := decode_request(links.gather(empty, "the request")[0])) is not None:
        share = _Share(pipeline, links, request)
        for _ in share.run(lambda: False):
            pass
        try:
            share.settle(cancel=False)
        except RankLost:
            raise
        except Exception:  # this rank's failure: rank 0 reports it; this rank takes the next request
            log.exception("rank %d could not make its share of a request", links.rank)
        if after_job is not None:
            after_job()


class GroupEngine:
    """Rank 0's engine (the `Engine` contract): the one MLX thread runs Leader. Once the group is lost,
    the running and queued requests end with RankLost, later ones are refused with it, and `lost` is
    set, for the server to exit and the service manager to restart the group."""

    def __init__(self, pipeline: Pipeline, group: mx.distributed.Group, timeout: float,
                 max_queued: int = 8, after_job: Callable[[], None] | None = None,
                 on_exit: Callable[[], None] | None = None) -> None:
        self.lost = threading.Event()
        self._error: RankLost | None = None
        self._leader = Leader(pipeline, Links(group, timeout, self._on_lost))
        self._then = on_exit
        self._worker = GenerationWorker(self._leader, max_queued=max_queued, after_job=after_job,
                                        on_exit=self._on_exit)

    def __call__(self, request: GenerationRequest,
                 is_cancelled: Callable[[], bool] = lambda: False) -> Iterator[ProgressEvent | GenerationResult]:
        if self._error is not None:
            raise self._error
        return self._worker(request, is_cancelled)

    def shutdown(self, grace: float, timeout: float | None = None) -> bool:
        if self.lost.is_set():  # the MLX thread may be stuck in a collective for good; the process exits
            return True
        return self._worker.shutdown(grace, timeout)

    def _on_lost(self, error: RankLost) -> None:
        if self.lost.is_set():
            return
        log.error("%s", error)
        self._error = error
        self._worker.abandon(error)
        self.lost.set()

    def _on_exit(self) -> None:
        if not self.lost.is_set():
            with contextlib.suppress(RankLost):
                self._leader.stop_followers()
        if self._then is not None:
            self._then()


def share_of(rank: int, size: int, images: int) -> Sequence[int]:
    """The indices of a request's images that `rank` makes."""
    return range(rank, images, size)
