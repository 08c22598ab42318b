"""SD-1 noise schedules: the training schedule and the inference step spacings the samplers use.

Sigmas are in k-diffusion's variance-exploding form, x = x0 + sigma * eps, with
sigma(t) = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]); a diffusers (variance-preserving) latent
is x / sqrt(1 + sigma**2). All functions are pure and return float64 numpy arrays.

Spacings, with the reference each follows:
* `spaced_sigmas`: k-diffusion's `DiscreteSchedule.get_sigmas`, what A1111 uses for its k-diffusion
  samplers ("Automatic" schedule): timesteps linspace(999, 0, n), sigma interpolated in log space.
  (diffusers' Euler/LMS/Heun interpolate sigma linearly instead, which differs by up to ~0.1%.)
* `karras_sigmas`: Karras et al. (rho = 7) between the model's smallest and largest sigma, as both
  k-diffusion (`get_sigmas_karras`, used by A1111) and diffusers (`use_karras_sigmas=True`) do.
* `leading_timesteps`: diffusers' DDIM/PNDM default for the SD-1.5 config
  (`timestep_spacing="leading"`, `steps_offset=1`, `set_alpha_to_one=False`).
* `linspace_timesteps`: diffusers' UniPC default (`timestep_spacing="linspace"`, rounded timesteps).
* `lcm_timesteps`: diffusers' LCMScheduler (50 original steps, evenly spaced indices); TCDScheduler
  picks its timesteps the same way.
* `trailing_timesteps`: diffusers' `timestep_spacing="trailing"` (Lin et al. 2023, "Common Diffusion
  Noise Schedules and Sample Steps are Flawed", table 2): the first step starts at the last timestep.
* `substep_timesteps`: Draw Things' timesteps for its "Substep" samplers (draw-things-community,
  LocalImageGenerator.swift `manualSubsteps`).
* `ays_sigmas`: NVIDIA's Align Your Steps schedule for SD 1.5 (Sabour et al. 2024), published for 10
  steps and interpolated log-linearly to other step counts as the AYS project describes.
"""

from __future__ import annotations

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
SD1_BETA_START = 0.00085
SD1_BETA_END = 0.012


def scaled_linear_alphas_cumprod(
    beta_start: float = SD1_BETA_START,
    beta_end: float = SD1_BETA_END,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> np.ndarray:
    """DDPM "scaled_linear" schedule: betas linear in sqrt(beta), as SD-1 was trained.

    Computed in float64 and rounded to float32, as ldm stores it (the `alphas_cumprod` buffer that
    k-diffusion's CompVisDenoiser, and so A1111, reads). The rounding matters: sigma at small t comes
    from 1 - alphas_cumprod, so it shifts sigma_min by ~1e-5 relative. (diffusers' float32 cumprod
    lands within 15 float32 ulps of this.)"""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas).astype(np.float32).astype(np.float64)


def train_sigmas(alphas_cumprod: np.ndarray | None = None) -> np.ndarray:
    """sigma for each training timestep, ascending (index = timestep)."""
    ac = scaled_linear_alphas_cumprod() if alphas_cumprod is None else np.asarray(alphas_cumprod, np.float64)
    return np.sqrt((1.0 - ac) / ac)


def sigma_to_t(sigma: np.ndarray | float, sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each sigma, interpolating linearly in log sigma between training
    timesteps (k-diffusion `DiscreteSchedule.sigma_to_t`, diffusers `_sigma_to_t`); clamped to [0, 999]."""
    log_sigmas = np.log(sigmas)
    log_sigma = np.log(np.asarray(sigma, dtype=np.float64))
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0.0, 1.0)
    return low + w


def t_to_sigma(t: np.ndarray | float, sigmas: np.ndarray) -> np.ndarray:
    """sigma at fractional timesteps, interpolating linearly in log sigma."""
    return np.exp(np.interp(np.asarray(t, dtype=np.float64), np.arange(len(sigmas)), np.log(sigmas)))


def spaced_sigmas(steps: int, sigmas: np.ndarray) -> np.ndarray:
    """`steps` sigmas at timesteps evenly spaced from the last to 0, then a final 0."""
    t = np.linspace(len(sigmas) - 1, 0, steps)
    return np.append(t_to_sigma(t, sigmas), 0.0)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) schedule: evenly spaced in sigma**(1/rho), then a final 0."""
    ramp = np.linspace(0.0, 1.0, steps)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return np.append((max_inv + ramp * (min_inv - max_inv)) ** rho, 0.0)


def drop_next_to_last(sigmas: np.ndarray) -> np.ndarray:
    """A1111's `discard_next_to_last_sigma` for DPM2: request steps + 1 sigmas, skip the tiny last step."""
    return np.append(sigmas[:-2], sigmas[-1])


def leading_timesteps(steps: int, steps_offset: int = 1) -> np.ndarray:
    """diffusers "leading" spacing: multiples of 1000 // steps, shifted by steps_offset, descending."""
    ratio = NUM_TRAIN_TIMESTEPS // steps
    return np.arange(steps)[::-1] * ratio + steps_offset


def linspace_timesteps(steps: int) -> np.ndarray:
    """diffusers "linspace" spacing for multistep solvers: steps + 1 rounded points over [0, 999],
    the last (0) dropped."""
    return np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps + 1).round()[::-1][:-1].astype(np.int64)


def lcm_timesteps(steps: int, original_steps: int = 50) -> np.ndarray:
    """LCM's schedule: `steps` of the `original_steps` distillation timesteps (k * i - 1), evenly
    spaced by index from the top."""
    if not 1 <= steps <= original_steps:
        raise ValueError(f"LCM takes 1..{original_steps} steps, got {steps}")
    k = NUM_TRAIN_TIMESTEPS // original_steps
    origin = (np.arange(original_steps, 0, -1) * k - 1).astype(np.int64)
    return origin[np.floor(np.linspace(0, original_steps, steps, endpoint=False)).astype(np.int64)]


# Draw Things' "Substep" samplers: at most this many steps on their own timesteps.
SUBSTEP_MAX_STEPS = 9


def substep_timesteps(steps: int) -> np.ndarray:
    """Draw Things' manual timesteps for its "Substep" samplers: 999, 899, ... (100 apart)."""
    if not 1 <= steps <= SUBSTEP_MAX_STEPS:
        raise ValueError(f"substep timesteps exist for 1..{SUBSTEP_MAX_STEPS} steps, got {steps}")
    return NUM_TRAIN_TIMESTEPS - 1 - 100 * np.arange(steps)


def trailing_timesteps(steps: int) -> np.ndarray:
    """diffusers "trailing" spacing: 1000 - k * 1000 / steps, rounded, minus 1, for k = 0..steps-1, taken
    from a float `arange` as diffusers does (its rounding ties follow that); for 61, 103, 121 and 122
    steps that `arange` has one more entry (-1 once shifted), which diffusers keeps and this drops."""
    spaced = np.arange(NUM_TRAIN_TIMESTEPS, 0, -NUM_TRAIN_TIMESTEPS / steps)[:steps]
    return (spaced.round() - 1).astype(np.int64)


# NVIDIA's published 10-step AYS sigmas for SD 1.5 (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html):
# 11 noise levels from sigma_max to the model's sigma_min.
AYS_SD1_SIGMAS = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)


def loglinear_interp(levels: np.ndarray, count: int) -> np.ndarray:
    """`count` descending levels, log-linearly interpolated over the evenly spaced positions of
    `levels` (AYS's `loglinear_interp`)."""
    positions = np.linspace(0.0, 1.0, count)
    return np.exp(np.interp(positions, np.linspace(0.0, 1.0, len(levels)), np.log(levels[::-1])))[::-1]


def ays_sigmas(steps: int) -> np.ndarray:
    """AYS: the published noise levels interpolated to steps + 1, the last one replaced by 0 so the
    final step denoises fully (as diffusers' `AysSchedules` and ComfyUI's AlignYourSteps node do)."""
    sigmas = loglinear_interp(np.array(AYS_SD1_SIGMAS), steps + 1)
    sigmas[-1] = 0.0
    return sigmas


def sigmas_at(timesteps: np.ndarray, sigmas: np.ndarray, final_sigma: float) -> np.ndarray:
    """The sigmas of integer timesteps, followed by the sigma the last step lands on."""
    return np.append(sigmas[np.asarray(timesteps, dtype=np.int64)], final_sigma)
