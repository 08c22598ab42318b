"""GenerateImage: validation, the stand-in engine's statuses, streaming and error mapping."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from PIL import Image

from grpc_service.generated import imageservice_pb2 as pb
from grpc_service.status import INTERNAL_ERROR_DETAILS
from mlx_sd.engine.errors import CheckpointError, InvalidRequest, MissingWeights, ModelNotFound, QueueFull
from mlx_sd.engine.events import EventType, GenerationResult, ProgressEvent
from mlx_sd.engine.request import (
    DEFAULT_CFG_SCALE,
    DEFAULT_STEPS,
    MAX_BATCH_COUNT,
    MAX_BATCH_SIZE,
    MAX_CFG_SCALE,
    MAX_PROMPT_CHARS,
    MAX_SIDE,
    MAX_STEPS,
    GenerationRequest,
)
from mlx_sd.sampling.registry import DEFAULT_SAMPLER, SAMPLER_NAMES
from tests.conftest import fake_result


class RecordingEngine:
    """Yields a few progress events and two images, recording what it was asked for."""

    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []

    def __call__(self, request: GenerationRequest, is_cancelled: Callable[[], bool]) -> Iterator[object]:
        self.requests.append(request)
        yield ProgressEvent(EventType.TEXT_ENCODED, "text encoded", timestamp_ms=1_700_000_000_000)
        for step in range(1, 3):
            yield ProgressEvent(EventType.SAMPLING, f"step {step}/2", step, 2, timestamp_ms=1_700_000_000_000 + step)
        yield ProgressEvent(EventType.IMAGE_DECODED, "image decoded", timestamp_ms=1_700_000_000_010)
        yield GenerationResult(fake_result(1).images + fake_result(2, color=(0, 0, 255)).images)


def generate(stub, **fields) -> list[pb.ImageGenerationResponse]:
    return list(stub.GenerateImage(pb.ImageGenerationRequest(**fields)))


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_streams_events_then_images(server_factory, stub_for) -> None:
    engine = RecordingEngine()
    responses = generate(stub_for(server_factory(engine)), prompt="a cat", sampler="euler A", seed=-5)
    events = [(e.type, e.name, e.timestamp, e.step, e.total) for r in responses[:-1] for e in r.events]
    assert events == [
        (pb.SignpostEvent.TEXT_ENCODED, "text encoded", 1_700_000_000_000, 0, 0),
        (pb.SignpostEvent.SAMPLING, "step 1/2", 1_700_000_000_001, 1, 2),
        (pb.SignpostEvent.SAMPLING, "step 2/2", 1_700_000_000_002, 2, 2),
        (pb.SignpostEvent.IMAGE_DECODED, "image decoded", 1_700_000_000_010, 0, 0),
    ]
    assert all(len(r.events) == 1 and not r.images for r in responses[:-1])
    final = responses[-1]
    assert [Image.open(io.BytesIO(png)).getpixel((0, 0)) for png in final.images] == [(255, 0, 0), (0, 0, 255)]
    # The server writes each image's parameters as its info and into its PNG.
    assert [info.splitlines()[-1].split(", ")[3] for info in final.info] == ["Seed: 1", "Seed: 2"]
    assert [Image.open(io.BytesIO(png)).text["parameters"] for png in final.images] == list(final.info)
    assert not final.events
    (request,) = engine.requests
    assert (request.prompt, request.sampler, request.seed) == ("a cat", "Euler a", -5)


def test_zero_fields_get_the_documented_defaults(server_factory, stub_for) -> None:
    engine = RecordingEngine()
    generate(stub_for(server_factory(engine)))
    (request,) = engine.requests
    # a size of 0 is the model's native size, which the pipeline fills in once the model is loaded
    assert (request.width, request.height, request.steps) == (0, 0, DEFAULT_STEPS)
    assert (request.cfg_scale, request.sampler) == (DEFAULT_CFG_SCALE, DEFAULT_SAMPLER)
    assert (request.batch_size, request.batch_count) == (1, 1)


def test_the_model_field_names_the_model(server_factory, stub_for) -> None:
    engine = RecordingEngine()
    generate(stub_for(server_factory(engine)), model="sdxl/base.safetensors")
    assert [request.model for request in engine.requests] == ["sdxl/base.safetensors"]


def test_progress_arrives_while_the_engine_is_still_working(server_factory, stub_for) -> None:
    first_seen = threading.Event()

    def engine(request: GenerationRequest, is_cancelled: Callable[[], bool]) -> Iterator[object]:
        yield ProgressEvent(EventType.SAMPLING, "step 1/1")
        assert first_seen.wait(5), "the first event was not delivered before the run finished"
        yield fake_result(9)

    stream = stub_for(server_factory(engine)).GenerateImage(pb.ImageGenerationRequest())
    assert next(stream).events[0].name == "step 1/1"
    first_seen.set()
    assert "Seed: 9" in next(stream).info[0]


def test_client_cancellation_reaches_the_engine(server_factory, stub_for) -> None:
    working, saw_cancel = threading.Event(), threading.Event()

    def engine(request: GenerationRequest, is_cancelled: Callable[[], bool]) -> Iterator[object]:
        yield ProgressEvent(EventType.SAMPLING, "step 1")
        working.set()
        for _ in range(500):  # a long step that polls for cancellation
            if is_cancelled():
                saw_cancel.set()
                return
            threading.Event().wait(0.01)

    stream = stub_for(server_factory(engine)).GenerateImage(pb.ImageGenerationRequest())
    next(stream)
    assert working.wait(5)
    stream.cancel()
    assert saw_cancel.wait(4)


ACCEPTED = {
    "smallest sizes": {"width": 64, "height": 64},
    "largest sizes": {"width": MAX_SIDE, "height": MAX_SIDE},
    "most steps": {"steps": MAX_STEPS},
    "largest cfg": {"cfg_scale": MAX_CFG_SCALE},
    "full strength": {"denoising_strength": 1.0},
    "largest batch": {"batch_size": MAX_BATCH_SIZE, "batch_count": MAX_BATCH_COUNT},
    "longest prompts": {"prompt": "p" * MAX_PROMPT_CHARS, "negative_prompt": "n" * MAX_PROMPT_CHARS},
    "int64 seed": {"seed": 2**63 - 1},
}


@pytest.mark.parametrize("fields", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_values_at_the_limits_are_accepted(server_factory, stub_for, fields) -> None:
    engine = RecordingEngine()
    generate(stub_for(server_factory(engine)), **fields)
    (request,) = engine.requests
    assert all(getattr(request, name) == pytest.approx(value) for name, value in fields.items())


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_registered_sampler_is_accepted(server_factory, stub_for, sampler: str) -> None:
    engine = RecordingEngine()
    generate(stub_for(server_factory(engine)), sampler=sampler.upper())
    assert engine.requests[0].sampler == sampler


REJECTED = {
    "width not a multiple of 64": ("width", {"width": 500}),
    "width too large": ("width", {"width": MAX_SIDE + 64}),
    "negative height": ("height", {"height": -64}),
    "too many steps": ("steps", {"steps": MAX_STEPS + 1}),
    "negative steps": ("steps", {"steps": -1}),
    "cfg too large": ("cfg_scale", {"cfg_scale": MAX_CFG_SCALE + 1}),
    "cfg not finite": ("cfg_scale", {"cfg_scale": float("nan")}),
    "negative strength": ("denoising_strength", {"denoising_strength": -0.5}),
    "strength above one": ("denoising_strength", {"denoising_strength": 1.5}),
    "strength infinite": ("denoising_strength", {"denoising_strength": float("inf")}),
    "batch too large": ("batch_size", {"batch_size": MAX_BATCH_SIZE + 1}),
    "too many batches": ("batch_count", {"batch_count": MAX_BATCH_COUNT + 1}),
    "prompt too long": ("prompt", {"prompt": "p" * (MAX_PROMPT_CHARS + 1)}),
    "negative prompt too long": ("negative_prompt", {"negative_prompt": "n" * (MAX_PROMPT_CHARS + 1)}),
    "unknown sampler": ("sampler", {"sampler": "Euler b"}),
    "seeds past int64": ("seed", {"seed": 2**63 - 1, "batch_size": 2}),
}


@pytest.mark.parametrize("field, fields", REJECTED.values(), ids=REJECTED.keys())
def test_out_of_range_fields_are_invalid_arguments(server_factory, stub_for, field: str, fields) -> None:
    engine = RecordingEngine()
    error = rpc_error(lambda: generate(stub_for(server_factory(engine)), **fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field}: ")
    assert engine.requests == []


def test_unknown_sampler_error_lists_the_supported_ones(server, stub_for) -> None:
    error = rpc_error(lambda: generate(stub_for(server), sampler="nope"))
    assert all(name in error.details() for name in SAMPLER_NAMES)


def test_without_the_model_file_the_answer_is_not_found(server, stub_for) -> None:
    error = rpc_error(lambda: generate(stub_for(server), prompt="x"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "stable-diffusion/model.safetensors" in error.details()


def test_stray_files_beside_a_missing_model_file_are_not_found_naming_it(server, stub_for, models_dir: Path) -> None:
    (models_dir / "stable-diffusion").mkdir()
    (models_dir / "stable-diffusion" / "a.bin").write_bytes(b"a pickle, say")
    error = rpc_error(lambda: generate(stub_for(server), prompt="x"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details().endswith(": stable-diffusion/model.safetensors")


def test_an_unreadable_model_file_is_an_internal_error_naming_it(server, stub_for, models_dir: Path) -> None:
    (models_dir / "stable-diffusion").mkdir()
    (models_dir / "stable-diffusion" / "model.safetensors").write_bytes(b"weights")
    error = rpc_error(lambda: generate(stub_for(server), prompt="x"))
    assert error.code() == grpc.StatusCode.INTERNAL
    # Named relative to the model directory: the server's own paths stay its own.
    assert error.details().startswith("stable-diffusion/model.safetensors is not a safetensors file")
    assert str(models_dir.resolve()) not in error.details() and str(models_dir) not in error.details()


@pytest.mark.parametrize(
    "error, code, details",
    [
        (InvalidRequest("seed", "bad"), grpc.StatusCode.INVALID_ARGUMENT, "seed: bad"),
        (ModelNotFound("vae/model.safetensors"), grpc.StatusCode.NOT_FOUND, "vae/model.safetensors"),
        (MissingWeights("face_restoration/gfpgan.safetensors"), grpc.StatusCode.FAILED_PRECONDITION,
         "face_restoration/gfpgan.safetensors"),
        (CheckpointError("unknown checkpoint layout"), grpc.StatusCode.INTERNAL, "unknown checkpoint layout"),
        (QueueFull(8), grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full"),
    ],
)
def test_library_errors_mid_stream_map_to_statuses(server_factory, stub_for, error, code, details) -> None:
    def engine(request: GenerationRequest, is_cancelled: Callable[[], bool]) -> Iterator[object]:
        yield ProgressEvent(EventType.TEXT_ENCODED, "text encoded")
        raise error

    stream = stub_for(server_factory(engine)).GenerateImage(pb.ImageGenerationRequest())
    assert next(stream).events[0].name == "text encoded"
    failure = rpc_error(lambda: next(stream))
    assert failure.code() == code and details in failure.details()


def test_unexpected_errors_are_internal_and_logged(server_factory, stub_for, caplog) -> None:
    def engine(request: GenerationRequest, is_cancelled: Callable[[], bool]) -> Iterator[object]:
        raise ZeroDivisionError("secret internals")

    with caplog.at_level(logging.ERROR, logger="grpc_service.interceptors"):
        failure = rpc_error(lambda: generate(stub_for(server_factory(engine))))
    assert failure.code() == grpc.StatusCode.INTERNAL
    assert failure.details() == INTERNAL_ERROR_DETAILS
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)
