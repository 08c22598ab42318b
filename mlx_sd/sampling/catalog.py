"""What each sampler name runs: a sampler function, its step schedule, and how its latents start
and end.

A1111 runs its k-diffusion samplers on k-diffusion's schedules ("Karras" names: Karras sigmas), with
DPM2's next-to-last sigma discarded; those are reproduced here. DDIM, PLMS, UniPC and LCM follow the
diffusers schedulers with the SD-1.5 scheduler config (betas scaled_linear 0.00085..0.012,
`steps_offset=1`, `set_alpha_to_one=False`) and each scheduler's default options: DDIM eta 0 on
"leading" timesteps, PNDM with `skip_prk_steps`, UniPC bh2 order 2 on "linspace" timesteps, LCM with
50 original steps. These start from unit-variance noise in diffusers' VP form and may end at a small
sigma (DDIM/PLMS stop at alphas_cumprod[0]); `initial_latents` / `output_latents` handle both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_sd.sampling import samplers as single
from mlx_sd.sampling import samplers_multistep as multi
from mlx_sd.sampling import schedules
from mlx_sd.sampling.denoisers import Denoiser, lcm_denoiser
from mlx_sd.sampling.registry import canonical_sampler_name

# (steps, training sigmas) -> the descending sigmas a sampler walks through.
Schedule = Callable[[int, np.ndarray], np.ndarray]


def _karras(steps: int, train: np.ndarray) -> np.ndarray:
    return schedules.karras_sigmas(steps, float(train[0]), float(train[-1]))


def _dpm2(steps: int, train: np.ndarray) -> np.ndarray:
    return schedules.drop_next_to_last(schedules.spaced_sigmas(steps + 1, train))


def _leading(steps: int, train: np.ndarray) -> np.ndarray:
    return schedules.sigmas_at(schedules.leading_timesteps(steps), train, float(train[0]))


def _linspace(steps: int, train: np.ndarray) -> np.ndarray:
    return schedules.sigmas_at(schedules.linspace_timesteps(steps), train, 0.0)


def _lcm(steps: int, train: np.ndarray) -> np.ndarray:
    return schedules.sigmas_at(schedules.lcm_timesteps(steps), train, 0.0)


@dataclass(frozen=True)
class SamplerSpec:
    sample: single.Sampler
    schedule: Schedule
    vp_start: bool = False  # diffusers schedulers start from unit-variance VP latents
    consistency: bool = False  # LCM: the denoiser gets LCM's boundary condition

    def sigmas(self, steps: int, train_sigmas: np.ndarray) -> np.ndarray:
        return self.schedule(steps, train_sigmas)

    def denoiser(self, denoise: Denoiser, train_sigmas: np.ndarray) -> Denoiser:
        return lcm_denoiser(denoise, train_sigmas) if self.consistency else denoise

    def initial_latents(self, noise: mx.array, sigmas: np.ndarray) -> mx.array:
        """x at sigmas[0] from unit noise: noise * sigma_max (k-diffusion, A1111) or the VE form of a
        unit-variance VP latent, noise * sqrt(1 + sigma_max**2) (diffusers)."""
        sigma = float(sigmas[0])
        return noise * (math.sqrt(1.0 + sigma * sigma) if self.vp_start else sigma)

    @staticmethod
    def output_latents(x: mx.array, sigmas: np.ndarray) -> mx.array:
        """The latent to decode: the VP form of the last x (x itself when the schedule ends at 0)."""
        return x * (1.0 / math.sqrt(1.0 + float(sigmas[-1]) ** 2))


SAMPLERS: dict[str, SamplerSpec] = {
    "Euler": SamplerSpec(single.sample_euler, schedules.spaced_sigmas),
    "Euler a": SamplerSpec(single.sample_euler_ancestral, schedules.spaced_sigmas),
    "Heun": SamplerSpec(single.sample_heun, schedules.spaced_sigmas),
    "LMS": SamplerSpec(multi.sample_lms, schedules.spaced_sigmas),
    "DPM2": SamplerSpec(single.sample_dpm_2, _dpm2),
    "DPM2 a": SamplerSpec(single.sample_dpm_2_ancestral, _dpm2),
    "DPM++ 2M": SamplerSpec(multi.sample_dpmpp_2m, schedules.spaced_sigmas),
    "DPM++ 2M Karras": SamplerSpec(multi.sample_dpmpp_2m, _karras),
    "DPM++ SDE": SamplerSpec(single.sample_dpmpp_sde, schedules.spaced_sigmas),
    "DPM++ SDE Karras": SamplerSpec(single.sample_dpmpp_sde, _karras),
    "DPM++ 2M SDE Karras": SamplerSpec(multi.sample_dpmpp_2m_sde, _karras),
    "DDIM": SamplerSpec(single.sample_euler, _leading, vp_start=True),
    "PLMS": SamplerSpec(multi.sample_plms, _leading, vp_start=True),
    "UniPC": SamplerSpec(multi.sample_unipc, _linspace, vp_start=True),
    "LCM": SamplerSpec(single.sample_lcm, _lcm, vp_start=True, consistency=True),
}


def sampler_spec(name: str) -> SamplerSpec | None:
    """What `name` runs (case-insensitive, "" = the default); None if unknown."""
    canonical = canonical_sampler_name(name)
    return None if canonical is None else SAMPLERS[canonical]
