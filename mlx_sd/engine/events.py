"""What a generation run yields: progress events as stages finish, then the result.

These are structures, not transport bytes: the servers and the CLI turn them into PNGs, A1111's
parameters text, tensors or progress bars at their own edges.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np

from mlx_sd.engine.images import Parameters


class EventType(enum.IntEnum):
    """Stages of a run; the values are those of the API's SignpostEvent.EventType."""

    TEXT_ENCODED = 0
    IMAGE_DECODED = 1
    IMAGE_ENCODED = 2
    SAMPLING = 3
    FACE_RESTORED = 4
    IMAGE_UPSCALED = 5
    SECOND_PASS_IMAGE_DECODED = 6
    SECOND_PASS_IMAGE_ENCODED = 7
    SECOND_PASS_SAMPLING = 8


SAMPLING_STAGES = (EventType.SAMPLING, EventType.SECOND_PASS_SAMPLING)


def now_ms() -> int:
    """Milliseconds since the Unix epoch, the API's timestamp unit."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class ProgressEvent:
    """A stage finished; `name` describes it, e.g. "sampling step 3/20".

    Sampling events carry `step` (1-based, within its pass) and `total` (the pass's steps), and
    every `preview_every` steps (a request field) `preview`: the batch's first latents, (h, w, 4)
    float32, for clients that draw a preview themselves."""

    type: EventType
    name: str
    step: int | None = None
    total: int | None = None
    preview: np.ndarray | None = field(default=None, compare=False, repr=False)
    timestamp_ms: int = field(default_factory=now_ms)


@dataclass(frozen=True)
class GeneratedImage:
    """One finished image: (H, W, 3) uint8 RGB pixels, the seed it was made from, and what it
    takes to reproduce it."""

    pixels: np.ndarray = field(compare=False, repr=False)
    seed: int
    parameters: Parameters


@dataclass(frozen=True)
class GenerationResult:
    """The last item of a run: its images, in request order (batch by batch)."""

    images: list[GeneratedImage]
