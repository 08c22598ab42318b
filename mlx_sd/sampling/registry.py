"""The sampler names the API accepts, matched case-insensitively: A1111's spelling, then the samplers of
Draw Things' `SamplerType` that A1111 lacks (Draw Things' names with "Euler A" written "Euler a").

Kept free of MLX so that request validation stays light; `catalog` maps each name to what it runs, and
docs/samplers.md lists each name's algorithm, schedule and reference.
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
    "Euler a Substep",
    "DPM++ SDE Substep",
    "TCD",
    "Euler a Trailing",
    "DPM++ SDE Trailing",
    "DPM++ 2M AYS",
    "Euler a AYS",
    "DPM++ SDE AYS",
    "DPM++ 2M Trailing",
    "DDIM Trailing",
    "UniPC Trailing",
    "UniPC AYS",
    "TCD Trailing",
)

DEFAULT_SAMPLER = "DPM++ 2M Karras"
# Samplers that pick their steps from a 50-timestep distillation schedule (LCM's, which TCD shares).
MAX_STEPS_BY_SAMPLER = {"LCM": 50, "TCD": 50}
# TCD's gamma (diffusers' `eta`, Draw Things' `stochasticSamplingGamma`): the default both use.
DEFAULT_TCD_GAMMA = 0.3


def canonical_sampler_name(name: str) -> str | None:
    """The canonical spelling of `name` (case-insensitive); the default for ""; None if unknown."""
    wanted = name.strip().casefold()
    if not wanted:
        return DEFAULT_SAMPLER
    return next((n for n in SAMPLER_NAMES if n.casefold() == wanted), None)
