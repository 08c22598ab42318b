"""What each sampler name runs: a sampler function, its step schedule, and how its latents start
and end.

A1111 runs its k-diffusion samplers on k-diffusion's schedules ("Karras" names: Karras sigmas), with
DPM2's next-to-last sigma discarded; those are reproduced here. DDIM, PLMS, UniPC and LCM follow the
diffusers schedulers with the SD-1.5 scheduler config (betas scaled_linear 0.00085..0.012,
`steps_offset=1`, `set_alpha_to_one=False`) and each scheduler's default options: DDIM eta 0 on
"leading" timesteps, PNDM with `skip_prk_steps`, UniPC bh2 order 2 on "linspace" timesteps, LCM with
50 original steps. These start from unit-variance noise in diffusers' VP form and may end at a small
sigma (DDIM/PLMS stop at alphas_cumprod[0]); `initial_latents` / `output_latents` handle both.

Draw Things' samplers (docs/samplers.md has the table with references):
* "Trailing" names run the same algorithm on diffusers' `timestep_spacing="trailing"` timesteps, each
  ending where its diffusers scheduler does (DDIM and TCD at alphas_cumprod[0], the others at 0) and
  starting as it does (Euler a and DPM++ SDE from noise * sigma_max, the others in VP form).
* "AYS" names run on NVIDIA's Align Your Steps SD-1.5 sigmas (`schedules.ays_sigmas`), from
  noise * sigma_max as k-diffusion samplers do.
* "Substep" names use Draw Things' own discretization for them (draw-things-community,
  LocalImageGenerator.swift `manualSubsteps` and Denoiser.swift `LinearManualDiscretization`): up to
  9 steps, timesteps 999, 899, ... (100 apart) ending at alphas_cumprod[0]; from 10 steps, the plain
  k-diffusion spacing. The sampler itself is the ordinary Euler a / DPM++ SDE.
* "TCD" follows diffusers' TCDScheduler (LCM's timesteps from 50 original steps; its `eta` is the
  request's `stochastic_sampling_gamma`), "TCD Trailing" the same on trailing timesteps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import mlx.core as mx
import numpy as np

from mlx_sd.sampling import samplers as single
from mlx_sd.sampling import samplers_multistep as multi
from mlx_sd.sampling import schedules
from mlx_sd.sampling.denoisers import Denoiser, lcm_denoiser
from mlx_sd.sampling.registry import DEFAULT_TCD_GAMMA, canonical_sampler_name

# (steps, training sigmas) -> the descending sigmas a sampler walks through.
Schedule = Callable[[int, np.ndarray], np.ndarray]
# TCD reads timesteps off its sigmas, so it needs the (SD-1) training schedule the pipeline samples on.
_tcd_sampler = partial(single.sample_tcd, train_sigmas=schedules.train_sigmas())


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


def _trailing(steps: int, train: np.ndarray) -> np.ndarray:
    return schedules.sigmas_at(schedules.trailing_timesteps(steps), train, 0.0)


def _trailing_to_sigma_min(steps: int, train: np.ndarray) -> np.ndarray:
    """Trailing timesteps whose last step lands on alphas_cumprod[0] (DDIM's and TCD's end)."""
    return schedules.sigmas_at(schedules.trailing_timesteps(steps), train, float(train[0]))


def _ays(steps: int, train: np.ndarray) -> np.ndarray:
    return schedules.ays_sigmas(steps)


def _substep(steps: int, train: np.ndarray) -> np.ndarray:
    if steps > schedules.SUBSTEP_MAX_STEPS:
        return schedules.spaced_sigmas(steps, train)
    return schedules.sigmas_at(schedules.substep_timesteps(steps), train, float(train[0]))


def _tcd(steps: int, train: np.ndarray) -> np.ndarray:
    return schedules.sigmas_at(schedules.lcm_timesteps(steps), train, float(train[0]))


@dataclass(frozen=True)
class SamplerSpec:
    sample: single.Sampler
    schedule: Schedule
    vp_start: bool = False  # diffusers schedulers start from unit-variance VP latents
    consistency: bool = False  # LCM: the denoiser gets LCM's boundary condition
    takes_gamma: bool = False  # TCD: `sample` takes the request's stochastic_sampling_gamma

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
    "Euler a Substep": SamplerSpec(single.sample_euler_ancestral, _substep),
    "DPM++ SDE Substep": SamplerSpec(single.sample_dpmpp_sde, _substep),
    "TCD": SamplerSpec(_tcd_sampler, _tcd, vp_start=True, takes_gamma=True),
    "Euler a Trailing": SamplerSpec(single.sample_euler_ancestral, _trailing),
    "DPM++ SDE Trailing": SamplerSpec(single.sample_dpmpp_sde, _trailing),
    "DPM++ 2M AYS": SamplerSpec(multi.sample_dpmpp_2m, _ays),
    "Euler a AYS": SamplerSpec(single.sample_euler_ancestral, _ays),
    "DPM++ SDE AYS": SamplerSpec(single.sample_dpmpp_sde, _ays),
    "DPM++ 2M Trailing": SamplerSpec(multi.sample_dpmpp_2m, _trailing, vp_start=True),
    "DDIM Trailing": SamplerSpec(single.sample_euler, _trailing_to_sigma_min, vp_start=True),
    "UniPC Trailing": SamplerSpec(multi.sample_unipc, _trailing, vp_start=True),
    "UniPC AYS": SamplerSpec(multi.sample_unipc, _ays),
    "TCD Trailing": SamplerSpec(_tcd_sampler, _trailing_to_sigma_min, vp_start=True, takes_gamma=True),
}


def sampler_spec(name: str, gamma: float = DEFAULT_TCD_GAMMA) -> SamplerSpec | None:
    """What `name` runs (case-insensitive, "" = the default), with TCD's `gamma` bound where it takes
    one; None if unknown."""
    canonical = canonical_sampler_name(name)
    if canonical is None:
        return None
    spec = SAMPLERS[canonical]
    return replace(spec, sample=partial(spec.sample, gamma=gamma)) if spec.takes_gamma else spec
