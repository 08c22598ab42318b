"""What a generation run yields: progress events as stages finish, then the result."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


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


def now_ms() -> int:
    """Milliseconds since the Unix epoch, the API's timestamp unit."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class ProgressEvent:
    """A stage finished (for SAMPLING: one step); `name` describes it, e.g. "step 3/20"."""

    type: EventType
    name: str
    timestamp_ms: int = field(default_factory=now_ms)


@dataclass(frozen=True)
class GenerationResult:
    """The last item of a run: PNG-encoded images and one parameter summary per image."""

    images: list[bytes]
    info: list[str]
