"""Single-step samplers in k-diffusion form (multistep ones are in `samplers_multistep`).

Every sampler has the signature `(denoise, x, sigmas, noise) -> Iterator[Step]`:
* `denoise(x, sigma) -> x0` (see `denoisers`), x in variance-exploding form x = x0 + sigma * eps;
* `sigmas`: the schedule, descending, one more entry than steps (usually ending in 0);
* `noise(shape) -> array`: the explicit noise source of stochastic samplers (`noise_source`);
  deterministic samplers never call it.
They yield a `Step` after each step, with x already evaluated, so a caller reports progress per step
and cancels by no longer iterating. The last yielded x is the result.

Algorithms follow k-diffusion 0.1.1 (`sampling.py`) with A1111's defaults: eta = 1, s_noise = 1,
no churn. Every noise draw is a fresh standard normal from the noise source, in k-diffusion's call
order, which is exactly what A1111 does for the ancestral samplers (Euler a, DPM2 a). For DPM++ SDE and
DPM++ 2M SDE, k-diffusion (and A1111) draw from a seeded Brownian tree (torchsde) instead, whose two
increments inside one DPM++ SDE step are correlated; these samplers compute the same update from the
same noise, but their images differ from A1111's for a given seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from mlx_sd.engine.random import BatchGenerator
from mlx_sd.sampling.denoisers import Denoiser
from mlx_sd.sampling.registry import DEFAULT_TCD_GAMMA
from mlx_sd.sampling.schedules import sigma_to_t

Noise = Callable[[tuple[int, ...]], mx.array]


def noise_source(generator: BatchGenerator, channels_last: bool = True) -> Noise:
    """mx noise from per-item torch-compatible generators. torch draws latents as (B, C, H, W); for
    NHWC latents (the MLX UNet's layout) draw that shape and transpose, so every value lands on the
    pixel and channel it has in torch and a seed gives the same image."""

    def draw(shape: tuple[int, ...]) -> mx.array:
        if not channels_last:
            return mx.array(generator.randn(shape))
        b, h, w, c = shape
        return mx.array(generator.randn((b, c, h, w)).transpose(0, 2, 3, 1))

    return draw


class Step(NamedTuple):
    index: int
    x: mx.array
    denoised: mx.array  # the step's x0 estimate, for previews


Sampler = Callable[[Denoiser, mx.array, np.ndarray, Noise | None], Iterator[Step]]


def step_result(index: int, x: mx.array, denoised: mx.array) -> Step:
    """Evaluate the step's arrays so each step's work happens before it is reported."""
    mx.eval(x, denoised)
    return Step(index, x, denoised)


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): step deterministically to sigma_down, then add sigma_up of fresh noise."""
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - sigma_up**2), sigma_up


def require_noise(noise: Noise | None) -> Noise:
    if noise is None:
        raise ValueError("this sampler is stochastic: pass a noise source")
    return noise


def euler_step(x: mx.array, denoised: mx.array, sigma: float, sigma_to: float) -> mx.array:
    """An Euler step of the probability-flow ODE dx/dsigma = (x - x0) / sigma from sigma to sigma_to,
    written as the blend (sigma_to / sigma) x + (1 - sigma_to / sigma) x0 (DPM-Solver++'s first-order
    update is the same expression), which lands exactly on x0 at sigma_to = 0."""
    ratio = sigma_to / sigma
    return ratio * x + (1.0 - ratio) * denoised


def sigma_pairs(sigmas: np.ndarray) -> Iterator[tuple[int, float, float]]:
    for i in range(len(sigmas) - 1):
        yield i, float(sigmas[i]), float(sigmas[i + 1])


def sample_euler(denoise: Denoiser, x: mx.array, sigmas: np.ndarray, noise: Noise | None = None) -> Iterator[Step]:
    """Euler (Karras et al. Algorithm 2 without churn). On diffusers' DDIM schedule this is DDIM, eta 0."""
    for i, sigma, sigma_next in sigma_pairs(sigmas):
        denoised = denoise(x, sigma)
        x = euler_step(x, denoised, sigma, sigma_next)
        yield step_result(i, x, denoised)


def sample_euler_ancestral(
    denoise: Denoiser, x: mx.array, sigmas: np.ndarray, noise: Noise | None = None
) -> Iterator[Step]:
    """Euler a: an Euler step down to sigma_down, then fresh noise up to the next sigma."""
    noise = require_noise(noise)
    for i, sigma, sigma_next in sigma_pairs(sigmas):
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
        x = euler_step(x, denoised, sigma, sigma_down)
        if sigma_next > 0:
            x = x + noise(x.shape) * sigma_up
        yield step_result(i, x, denoised)


def sample_heun(denoise: Denoiser, x: mx.array, sigmas: np.ndarray, noise: Noise | None = None) -> Iterator[Step]:
    """Heun: the average of the slopes at both ends of an Euler step (Euler for the step to 0)."""
    for i, sigma, sigma_next in sigma_pairs(sigmas):
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = euler_step(x, denoised, sigma, sigma_next)
        else:
            x_2 = euler_step(x, denoised, sigma, sigma_next)
            d = (x - denoised) / sigma
            d_2 = (x_2 - denoise(x_2, sigma_next)) / sigma_next
            x = x + (d + d_2) * ((sigma_next - sigma) / 2)
        yield step_result(i, x, denoised)


def _dpm2_step(denoise: Denoiser, x: mx.array, denoised: mx.array, sigma: float, sigma_to: float) -> mx.array:
    """DPM-Solver-2: the slope at the log-midpoint sigma decides the whole step (Euler to 0)."""
    if sigma_to == 0:
        return euler_step(x, denoised, sigma, sigma_to)
    sigma_mid = math.exp((math.log(sigma) + math.log(sigma_to)) / 2)
    x_2 = euler_step(x, denoised, sigma, sigma_mid)
    d_2 = (x_2 - denoise(x_2, sigma_mid)) / sigma_mid
    return x + d_2 * (sigma_to - sigma)


def sample_dpm_2(denoise: Denoiser, x: mx.array, sigmas: np.ndarray, noise: Noise | None = None) -> Iterator[Step]:
    """DPM2 (k-diffusion's DPM-Solver-2 variant of Karras Algorithm 2)."""
    for i, sigma, sigma_next in sigma_pairs(sigmas):
        denoised = denoise(x, sigma)
        x = _dpm2_step(denoise, x, denoised, sigma, sigma_next)
        yield step_result(i, x, denoised)


def sample_dpm_2_ancestral(
    denoise: Denoiser, x: mx.array, sigmas: np.ndarray, noise: Noise | None = None
) -> Iterator[Step]:
    """DPM2 a: a DPM2 step down to sigma_down, then fresh noise (not after the final Euler step)."""
    noise = require_noise(noise)
    for i, sigma, sigma_next in sigma_pairs(sigmas):
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
        x = _dpm2_step(denoise, x, denoised, sigma, sigma_down)
        if sigma_down > 0:
            x = x + noise(x.shape) * sigma_up
        yield step_result(i, x, denoised)


def sample_dpmpp_sde(
    denoise: Denoiser, x: mx.array, sigmas: np.ndarray, noise: Noise | None = None, r: float = 0.5
) -> Iterator[Step]:
    """DPM++ SDE: stochastic DPM-Solver++ with an intermediate point at fraction r of the log-sigma
    step; each of its two sub-steps adds ancestral noise (two draws per step, Euler for the step to 0)."""
    noise = require_noise(noise)
    for i, sigma, sigma_next in sigma_pairs(sigmas):
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = euler_step(x, denoised, sigma, sigma_next)
        else:
            sigma_s = math.exp(math.log(sigma) + r * (math.log(sigma_next) - math.log(sigma)))
            down, up = ancestral_step(sigma, sigma_s)
            x_2 = euler_step(x, denoised, sigma, down) + noise(x.shape) * up
            denoised_2 = denoise(x_2, sigma_s)
            fac = 1 / (2 * r)
            down, up = ancestral_step(sigma, sigma_next)
            x = euler_step(x, (1 - fac) * denoised + fac * denoised_2, sigma, down) + noise(x.shape) * up
        yield step_result(i, x, denoised)


def sample_lcm(denoise: Denoiser, x: mx.array, sigmas: np.ndarray, noise: Noise | None = None) -> Iterator[Step]:
    """LCM multistep consistency sampling: jump to the x0 estimate, then re-noise it to the next sigma
    with fresh noise. Use with `denoisers.lcm_denoiser` and the LCM schedule."""
    noise = require_noise(noise)
    for i, sigma, sigma_next in sigma_pairs(sigmas):
        denoised = denoise(x, sigma)
        x = denoised + noise(x.shape) * sigma_next if sigma_next > 0 else denoised
        yield step_result(i, x, denoised)


def tcd_intermediate_sigmas(sigmas: np.ndarray, train_sigmas: np.ndarray, gamma: float) -> np.ndarray:
    """TCD's sigma_s for each step: the training sigma at timestep floor((1 - gamma) * t_next), with
    t_next the (integer) timestep of the next sigma; float32 arithmetic, as diffusers' TCDScheduler."""
    t_next = np.rint(sigma_to_t(sigmas[1:], train_sigmas)).astype(np.float32)
    return train_sigmas[np.floor(np.float32(1.0 - gamma) * t_next).astype(np.int64)]


def sample_tcd(
    denoise: Denoiser,
    x: mx.array,
    sigmas: np.ndarray,
    noise: Noise | None = None,
    *,
    train_sigmas: np.ndarray,
    gamma: float = DEFAULT_TCD_GAMMA,
) -> Iterator[Step]:
    """TCD (Zheng et al. 2024) strategic stochastic sampling, as diffusers' TCDScheduler: from the x0
    estimate step back along the predicted eps to the smaller sigma_s, then forward to the next sigma
    with fresh noise (none on the last step). gamma = 0 is deterministic (DDIM-like); gamma = 1 steps back
    to sigma_min, next to the x0 estimate, and re-noises, like LCM."""
    if gamma > 0:
        noise = require_noise(noise)
    last = len(sigmas) - 2
    intermediate = tcd_intermediate_sigmas(sigmas, train_sigmas, gamma)
    for i, sigma, sigma_next in sigma_pairs(sigmas):
        denoised = denoise(x, sigma)
        sigma_s = float(intermediate[i])
        x = euler_step(x, denoised, sigma, sigma_s)  # x0 + sigma_s * eps
        if gamma > 0 and i < last:
            x = x + noise(x.shape) * math.sqrt(max(sigma_next**2 - sigma_s**2, 0.0))
        yield step_result(i, x, denoised)
