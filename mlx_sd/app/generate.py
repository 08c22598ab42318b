"""The workings of `mlx-sd generate`: follow a run's progress, write its PNGs, name bad options.

Local and remote runs both stream ProgressEvents, then their images: a local run's GenerationResult
is encoded here, a remote one arrives as PNGs (`ImageServiceClient.generate`). The seed is fixed
before the request is sent, so each image's own seed (seed + its index) is known on both paths.
MLX is imported only when a local engine is made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mlx_sd.engine import img2img
from mlx_sd.engine.errors import InvalidRequest, MlxSdError
from mlx_sd.engine.events import SAMPLING_STAGES, EventType, GenerationResult, ProgressEvent
from mlx_sd.engine.images import encode_png
from mlx_sd.engine.lora import LoraWeight
from mlx_sd.engine.request import GenerationRequest

if TYPE_CHECKING:
    from grpc_service.servicer import EncodedImages
    from mlx_sd.engine import Engine

# The option that sets each request field, so that errors name what the user typed.
OPTION_OF_FIELD = {
    "prompt": "PROMPT",
    "negative_prompt": "--negative",
    "width": "--width",
    "height": "--height",
    "steps": "--steps",
    "cfg_scale": "--cfg",
    "seed": "--seed",
    "sampler": "--sampler",
    "model": "--model",
    "denoising_strength": "--denoise",
    "batch_size": "--batch-size",
    "batch_count": "--batch-count",
    "init_image": "--init-image",
    "mask": "--mask",
    "mask_blur": "--mask-blur",
    "mask_outset": "--mask-outset",
    "enable_hr": "--hires",
    "refiner_model": "--refiner",
    "refiner_start": "--refiner-start",
    "loras": "--lora",
    "clip_skip": "--clip-skip",
}


def validated_as_sent(request: GenerationRequest) -> GenerationRequest:
    """`request.validated()` with its floats rounded to float32, as the API carries them, so that a
    local run is the very request a server would run (int(0.7 * 10) is 7, but 6 with float32's 0.7),
    and a negative seed replaced by a random one, as the engine would pick it."""
    request = request.validated()
    return dataclasses.replace(
        request, cfg_scale=_float32(request.cfg_scale), denoising_strength=_float32(request.denoising_strength),
        refiner_start=_float32(request.refiner_start),
        seed=request.seed if request.seed >= 0 else secrets.randbelow(2**32),
        loras=tuple(dataclasses.replace(lora, weight=_float32(lora.weight)) for lora in request.loras),
    )


def lora_weights(values: list[str]) -> tuple[LoraWeight, ...]:
    """`--lora` values, FILE or FILE:WEIGHT, as the request's LoRAs (a FILE may hold colons)."""
    loras = []
    for value in values:
        file, _, weight = value.rpartition(":")
        try:
            loras.append(LoraWeight(file, float(weight)) if file else LoraWeight(value))
        except ValueError:
            loras.append(LoraWeight(value))
    return tuple(loras)


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def option_error(error: InvalidRequest) -> str:
    """`error` naming the option behind the field, e.g. "--cfg (cfg_scale): must be ..."."""
    detail = str(error).removeprefix(f"{error.field}: ")
    return f"{OPTION_OF_FIELD.get(error.field, error.field)} ({error.field}): {detail}"


@contextlib.contextmanager
def local_engine(models_dir: Path, cache_dir: Path | None, dtype: str | None,
                 quantize_bits: int | None = None, low_memory: bool = False,
                 pad_attention_heads: bool = False, prediction_type: str = "auto") -> Iterator[Engine]:
    """The pipeline on its worker thread; on leaving, waits for the job in flight, which stops at the
    next sampling step once its reader has gone (say after Ctrl-C)."""
    from mlx_sd.engine import create_engine

    engine = create_engine(models_dir, cache_dir=cache_dir, dtype=dtype, quantize_bits=quantize_bits, max_queued=1,
                           low_memory=low_memory, pad_attention_heads=pad_attention_heads,
                           prediction_type=prediction_type)
    try:
        yield engine
    finally:
        engine.shutdown(grace=0.0)


def follow(items: Iterable[ProgressEvent | GenerationResult | EncodedImages],
           request: GenerationRequest) -> GenerationResult | EncodedImages:
    """Shows a progress bar on stderr that advances per sampling step of the validated `request`'s
    run, labelled with the latest stage, and returns the run's images."""
    result = None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        steps = request.steps  # image to image runs the last steps of the schedule
        if request.source is not None:
            steps -= img2img.start_index(request.steps, request.denoising_strength)
        task = progress.add_task("starting", total=steps * request.batch_count)
        second_pass_seen = False
        for item in items:  # read to the end, so that a remote stream's final status is checked
            if not isinstance(item, ProgressEvent):
                result = item
                continue
            if item.type is EventType.SECOND_PASS_SAMPLING and not second_pass_seen and item.total:
                # Whether a hires second pass runs, and its length, arrive with its first step.
                second_pass_seen = True
                progress.update(task, total=steps * request.batch_count + item.total * request.batch_count)
            progress.update(task, description=item.name)
            if item.type in SAMPLING_STAGES:
                progress.advance(task)
    if result is None:
        raise MlxSdError("the generation ended without images")
    return result


def encoded(result: GenerationResult | EncodedImages, request: GenerationRequest) -> list[tuple[int, bytes]]:
    """(seed, PNG) of each image: a local result is encoded here; a remote one is already PNGs,
    whose seeds follow from the request's (image i of a request has seed + i)."""
    if isinstance(result, GenerationResult):
        return [(image.seed, encode_png(image.pixels, image.parameters.text())) for image in result.images]
    return [(request.seed + i, png) for i, png in enumerate(result.images)]


def write_images(images: Iterable[tuple[int, bytes]], out_dir: Path) -> Iterator[Path]:
    """Writes each PNG to the folder `out_dir` as `<seed>-<n>.png`, `n` being the first number whose
    file does not exist yet; yields each path once written."""
    for seed, png in images:
        yield _write_new(out_dir, str(seed), png)


def _write_new(out_dir: Path, stem: str, data: bytes) -> Path:
    n = 0
    while True:
        path = out_dir / f"{stem}-{n}.png"
        try:
            # Exclusive creation: a file that exists, even one made a moment ago, is never replaced.
            with path.open("xb") as handle:
                handle.write(data)
            return path
        except FileExistsError:
            n += 1
