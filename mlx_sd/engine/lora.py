"""A request's LoRAs and their limits (the merging is in `mlx_sd.engine.lora_merge`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mlx_sd.engine.errors import InvalidRequest
from mlx_sd.engine.model_names import name_problem, shown_name

MAX_LORAS = 16
MAX_WEIGHT = 10.0


@dataclass(frozen=True)
class LoraWeight:
    """A LoRA of the request: its file relative to `<models>/lora/` (the suffix may be left out)
    and its weight."""

    file: str
    weight: float = 1.0


def validated(loras: Sequence[LoraWeight]) -> tuple[LoraWeight, ...]:
    """The request's LoRAs, checked against the documented limits (InvalidRequest naming `loras`)."""
    if len(loras) > MAX_LORAS:
        raise InvalidRequest("loras", f"at most {MAX_LORAS} LoRAs at once (got {len(loras)})")
    for lora in loras:
        if (problem := name_problem(lora.file)) is not None:
            raise InvalidRequest("loras", f"{shown_name(lora.file)!r} {problem}")
        if not -MAX_WEIGHT <= lora.weight <= MAX_WEIGHT:  # also false for NaN
            raise InvalidRequest("loras", f"{lora.file!r}: the weight must be between {-MAX_WEIGHT:g} and "
                                          f"{MAX_WEIGHT:g} (got {lora.weight})")
    return tuple(loras)
