"""The sampler names the API accepts (A1111's spelling), matched case-insensitively.

Kept free of MLX so that request validation stays light; `catalog` maps each name to what it runs.
"""

from __future__ import annotations

SAMPLER_NAMES: tuple[str, ...] = (
    "Euler",
    "Euler a",
    "Heun",
    "LMS",
    "DPM2",
    "DPM2 a",
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DPM++ SDE",
    "DPM++ SDE Karras",
    "DPM++ 2M SDE Karras",
    "DDIM",
    "PLMS",
    "UniPC",
    "LCM",
)

DEFAULT_SAMPLER = "DPM++ 2M Karras"


def canonical_sampler_name(name: str) -> str | None:
    """The canonical spelling of `name` (case-insensitive); the default for ""; None if unknown."""
    wanted = name.strip().casefold()
    if not wanted:
        return DEFAULT_SAMPLER
    return next((n for n in SAMPLER_NAMES if n.casefold() == wanted), None)
