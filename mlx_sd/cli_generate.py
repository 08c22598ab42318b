"""The workings of `mlx-sd generate`: follow a run's progress, write its PNGs, name bad options.

Local and remote runs both produce the engine's stream of domain items (ProgressEvents, then one
GenerationResult; the remote one via `ImageServiceClient.generate`), so one `follow` and one
`write_images` serve both. MLX is imported only when a local engine is made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mlx_sd import hires
from mlx_sd.errors import InvalidRequest, MlxSdError
from mlx_sd.events import EventType, GenerationResult, ProgressEvent
from mlx_sd.request import GenerationRequest

if TYPE_CHECKING:
    from mlx_sd.worker import GenerationWorker

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
    "denoising_strength": "--denoise",
    "batch_size": "--batch-size",
    "batch_count": "--batch-count",
}
_STEP_EVENTS = (EventType.SAMPLING, EventType.SECOND_PASS_SAMPLING)
# The fields line of an image's parameters (the last line, see mlx_sd.images.Parameters.text).
_SEED_FIELD = re.compile(r"(?:^|, )Seed: (-?\d+)(?:,|$)")


def validated_as_sent(request: GenerationRequest) -> GenerationRequest:
    """`request.validated()` with its floats rounded to float32, as the API carries them, so that a
    local run is the very request a server would run (int(0.7 * 10) is 7, but 6 with float32's 0.7)."""
    request = request.validated()
    return dataclasses.replace(
        request, cfg_scale=_float32(request.cfg_scale), denoising_strength=_float32(request.denoising_strength)
    )


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def option_error(error: InvalidRequest) -> str:
    """`error` naming the option behind the field, e.g. "--cfg (cfg_scale): must be ..."."""
    detail = str(error).removeprefix(f"{error.field}: ")
    return f"{OPTION_OF_FIELD.get(error.field, error.field)} ({error.field}): {detail}"


@contextlib.contextmanager
def local_engine(models_dir: Path, cache_dir: Path | None, dtype: str | None,
                 quantize_bits: int | None = None, low_memory: bool = False) -> Iterator[GenerationWorker]:
    """The pipeline on its worker thread; on leaving, waits for the job in flight, which stops at the
    next sampling step once its reader has gone (say after Ctrl-C)."""
    from mlx_sd.engine import create_engine

    engine = create_engine(models_dir, cache_dir=cache_dir, dtype=dtype, quantize_bits=quantize_bits, max_queued=1,
                           low_memory=low_memory)
    try:
        yield engine
    finally:
        engine.close()


def follow(items: Iterable[ProgressEvent | GenerationResult], request: GenerationRequest) -> GenerationResult:
    """Shows a progress bar on stderr that advances per sampling step of the validated `request`'s
    run, labelled with the latest stage, and returns the run's result."""
    first_pass = request.steps * request.batch_count
    result = None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task("starting", total=first_pass)
        second_pass_seen = False
        for item in items:  # read to the end, so that a remote stream's final status is checked
            if isinstance(item, GenerationResult):
                result = item
                continue
            if item.type is EventType.SECOND_PASS_SAMPLING and not second_pass_seen:
                # Whether a hires second pass runs depends on the model's native size, which only the
                # engine knows; its steps join the total when the first of them arrives.
                second_pass_seen = True
                progress.update(task, total=first_pass + _second_pass_steps(request) * request.batch_count)
            progress.update(task, description=item.name)
            if item.type in _STEP_EVENTS:
                progress.advance(task)
    if result is None:
        raise MlxSdError("the generation ended without images")
    return result


def _second_pass_steps(request: GenerationRequest) -> int:
    strength = request.denoising_strength or hires.DEFAULT_STRENGTH
    return request.steps - hires.img2img_start(request.steps, strength)


def write_images(result: GenerationResult, out_dir: Path) -> Iterator[Path]:
    """Writes each PNG to the folder `out_dir` as `<seed>-<n>.png`, `seed` being the image's own and
    `n` the first number whose file does not exist yet; yields each path once written."""
    for index, png in enumerate(result.images):
        info = result.info[index] if index < len(result.info) else ""
        yield _write_new(out_dir, _seed_of(info), png)


def _seed_of(info: str) -> str:
    match = _SEED_FIELD.search(info.rsplit("\n", 1)[-1])
    return match.group(1) if match else "image"


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
