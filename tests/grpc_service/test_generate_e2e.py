"""GenerateImage end to end: a real TLS server running the MLX pipeline on the tiny SD-1 model."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from PIL import Image

from grpc_service.generated import imageservice_pb2 as pb
from mlx_sd.engine.events import EventType, ProgressEvent
from mlx_sd.engine.model_store import ModelStore
from mlx_sd.engine.pipeline import Pipeline
from mlx_sd.engine.worker import GenerationWorker

SignpostType = pb.SignpostEvent.EventType


class CountingPipeline:
    """The real pipeline, counting the events it produced, so tests can see where work stopped.

    After `hold()`, the next run pauses at its first sampling step (`sampling` is set) until it is
    cancelled, so a test can cancel it while it is known to be mid-run; `ended` is set when a run's
    generator finishes or is closed."""

    def __init__(self, models_dir: Path) -> None:
        self._pipeline = Pipeline(ModelStore(models_dir))
        self.produced = 0
        self.sampling, self.ended = threading.Event(), threading.Event()
        self._held = False

    def hold(self) -> None:
        self._held = True

    def __call__(self, request, is_cancelled: Callable[[], bool]) -> Iterator[object]:
        try:
            for item in self._pipeline(request, is_cancelled):
                self.produced += 1
                if self._held and isinstance(item, ProgressEvent) and item.type == EventType.SAMPLING:
                    self._held = False
                    self.sampling.set()
                    deadline = time.monotonic() + 60
                    while not is_cancelled():  # the cancellation travels from the client
                        assert time.monotonic() < deadline, "the run was never cancelled"
                        threading.Event().wait(0.01)
                yield item
        finally:
            self.ended.set()


def request(**fields) -> pb.ImageGenerationRequest:
    base = dict(prompt="a lighthouse", negative_prompt="fog", width=64, height=64, steps=2, cfg_scale=5,
                seed=9, sampler="dpm++ 2m karras")
    return pb.ImageGenerationRequest(**{**base, **fields})


def test_progress_streams_then_pngs_arrive(server_factory, stub_for, tiny_models: Path) -> None:
    responses = list(stub_for(server_factory()).GenerateImage(request(batch_size=2, batch_count=2, width=128)))
    *progress, last = responses
    types = [event.type for r in progress for event in r.events]
    per_batch = [SignpostType.SAMPLING] * 2 + [SignpostType.IMAGE_DECODED]
    assert types == [SignpostType.TEXT_ENCODED] + per_batch * 2
    assert all(len(r.events) == 1 and not r.images for r in progress)
    assert len(last.images) == len(last.info) == 4 and not last.events
    for i, (png, info) in enumerate(zip(last.images, last.info)):
        image = Image.open(io.BytesIO(png))
        assert image.size == (128, 64)
        assert image.text["parameters"] == info
        assert f"Seed: {9 + i}," in info and "Sampler: DPM++ 2M Karras" in info


def test_the_same_request_gives_byte_identical_pngs(server_factory, stub_for, tiny_models: Path) -> None:
    stub = stub_for(server_factory())
    first = list(stub.GenerateImage(request()))[-1].images
    assert list(stub.GenerateImage(request()))[-1].images == first


def test_hires_fix_events_arrive_in_order(server_factory, stub_for, tiny_models: Path) -> None:
    responses = list(stub_for(server_factory()).GenerateImage(request(width=192, height=128, enable_hr=True, steps=2, denoising_strength=1.0)))
    types = [event.type for r in responses for event in r.events]
    assert types[-5:] == [SignpostType.IMAGE_UPSCALED, SignpostType.SECOND_PASS_IMAGE_ENCODED,
                          SignpostType.SECOND_PASS_SAMPLING, SignpostType.SECOND_PASS_SAMPLING,
                          SignpostType.SECOND_PASS_IMAGE_DECODED]
    assert Image.open(io.BytesIO(responses[-1].images[0])).size == (192, 128)


def test_a_cancelled_generation_stops_within_a_step(server_factory, stub_for, tiny_models: Path) -> None:
    pipeline = CountingPipeline(tiny_models)
    stub = stub_for(server_factory(GenerationWorker(pipeline)))
    pipeline.hold()
    stream = stub.GenerateImage(request(steps=150))
    assert pipeline.sampling.wait(60)
    produced_at_cancel = pipeline.produced
    stream.cancel()
    assert pipeline.ended.wait(60)
    assert pipeline.produced == produced_at_cancel  # the step in hand was the last
    # The worker is free again: the next request runs to completion.
    assert list(stub.GenerateImage(request()))[-1].images


def test_a_passed_deadline_stops_the_generation(server_factory, stub_for, tiny_models: Path) -> None:
    pipeline = CountingPipeline(tiny_models)
    stub = stub_for(server_factory(GenerationWorker(pipeline)))
    list(stub.GenerateImage(request()))  # load the model first, so the deadline falls while sampling
    pipeline.hold()
    with pytest.raises(grpc.RpcError) as caught:  # the deadline passes while the run is held mid-sampling
        list(stub.GenerateImage(request(steps=150), timeout=3.0))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert pipeline.sampling.is_set()
    produced_at_deadline = pipeline.produced
    assert pipeline.ended.wait(60)
    assert pipeline.produced == produced_at_deadline


def test_a_full_queue_is_refused_with_resource_exhausted(server_factory, stub_for, tiny_models: Path) -> None:
    worker = GenerationWorker(Pipeline(ModelStore(tiny_models)), max_queued=1)
    stub = stub_for(server_factory(worker))
    running = stub.GenerateImage(request(steps=150))
    assert next(running).events[0].type == SignpostType.TEXT_ENCODED  # the worker is busy with it
    queued: list[object] = []
    waiter = threading.Thread(target=lambda: queued.extend(stub.GenerateImage(request())))
    waiter.start()
    deadline = time.monotonic() + 60
    while worker.queued < 1:  # the second request takes the single queue slot
        assert time.monotonic() < deadline, "the second request was never queued"
        threading.Event().wait(0.01)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.GenerateImage(request()))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    running.cancel()
    waiter.join(30)
    assert queued and queued[-1].images
