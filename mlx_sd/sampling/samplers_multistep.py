"""Multistep samplers: they reuse earlier steps' model outputs (same conventions as `samplers`).

LMS, DPM++ 2M and DPM++ 2M SDE follow k-diffusion 0.1.1; PLMS follows diffusers' PNDMScheduler with
`skip_prk_steps=True` and UniPC diffusers' UniPCMultistepScheduler defaults (bh2, predict x0,
`lower_order_final`), both rewritten in sigma form: with lambda = -log(sigma) the VP coefficients'
alpha factors cancel, so the updates act on x = x0 + sigma * eps directly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import mlx.core as mx
import numpy as np

from mlx_sd.sampling.denoisers import Denoiser
from mlx_sd.sampling.samplers import Noise, Step, euler_step, require_noise, sigma_pairs, step_result


def _weighted_sum(weights: Sequence[float], arrays: Sequence[mx.array]) -> mx.array:
    return sum(w * a for w, a in zip(weights, arrays, strict=True))


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """Adams-Bashforth weights for step i in the sigma variable: the integral over [sigma_i, sigma_i+1]
    of each Lagrange basis polynomial through sigma_i, sigma_i-1, ... (newest first). k-diffusion
    integrates them numerically; these are the exact polynomial integrals."""
    nodes = [float(sigmas[i - k]) for k in range(order)]
    weights = []
    for j, node in enumerate(nodes):
        basis = np.polynomial.Polynomial([1.0])
        for k, other in enumerate(nodes):
            if k != j:
                basis = basis * np.polynomial.Polynomial([-other, 1.0]) / (node - other)
        antiderivative = basis.integ()
        weights.append(float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i])))
    return weights


def sample_lms(
    denoise: Denoiser, x: mx.array, sigmas: np.ndarray, noise: Noise | None = None, order: int = 4
) -> Iterator[Step]:
    """Linear multistep (LMS) on the ODE slope d = (x - x0) / sigma, up to `order` past slopes."""
    slopes: list[mx.array] = []  # newest first
    for i, sigma, _ in sigma_pairs(sigmas):
        denoised = denoise(x, sigma)
        slopes = [(x - denoised) / sigma, *slopes][:order]
        x = x + _weighted_sum(lms_coefficients(sigmas, i, len(slopes)), slopes)
        yield step_result(i, x, denoised)


def sample_dpmpp_2m(
    denoise: Denoiser, x: mx.array, sigmas: np.ndarray, noise: Noise | None = None
) -> Iterator[Step]:
    """DPM-Solver++(2M): second order from the previous x0 estimate; first order on the first step and
    on the step to 0."""
    old_denoised = None
    for i, sigma, sigma_next in sigma_pairs(sigmas):
        denoised = denoise(x, sigma)
        if old_denoised is None or sigma_next == 0:
            x = euler_step(x, denoised, sigma, sigma_next)
        else:
            r = math.log(float(sigmas[i - 1]) / sigma) / math.log(sigma / sigma_next)  # h_last / h
            x = euler_step(x, (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised, sigma, sigma_next)
        old_denoised = denoised
        yield step_result(i, x, denoised)


def sample_dpmpp_2m_sde(
    denoise: Denoiser, x: mx.array, sigmas: np.ndarray, noise: Noise | None = None
) -> Iterator[Step]:
    """DPM-Solver++(2M) SDE, k-diffusion's defaults (eta 1, midpoint correction); the step to 0 returns
    the x0 estimate."""
    noise = require_noise(noise)
    old_denoised, h_last = None, 0.0
    for i, sigma, sigma_next in sigma_pairs(sigmas):
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            keep = -math.expm1(-2 * h)  # 1 - e^(-2h): weight of x0 in the stochastic update
            x = (sigma_next / sigma * math.exp(-h)) * x + keep * denoised
            if old_denoised is not None:
                x = x + (0.5 * keep * h / h_last) * (denoised - old_denoised)
            x = x + noise(x.shape) * (sigma_next * math.sqrt(keep))
            h_last = h
        old_denoised = denoised
        yield step_result(i, x, denoised)


_ADAMS_BASHFORTH = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def sample_plms(denoise: Denoiser, x: mx.array, sigmas: np.ndarray, noise: Noise | None = None) -> Iterator[Step]:
    """PLMS (pseudo linear multistep) on eps with fixed-step Adams-Bashforth weights, each step a DDIM
    step. The first step is Heun-like: eps is averaged with eps at the Euler-predicted next point (an
    extra model call, as diffusers' repeated timestep). That extra eps is not kept in the history."""
    history: list[mx.array] = []  # eps of each step, newest first
    steps = len(sigmas) - 1
    for i, sigma, sigma_next in sigma_pairs(sigmas):
        denoised = denoise(x, sigma)
        history = [(x - denoised) / sigma, *history][:4]
        if i == 0 and steps > 1:
            x_pred = x + history[0] * (sigma_next - sigma)
            eps = (history[0] + (x_pred - denoise(x_pred, sigma_next)) / sigma_next) / 2
        else:
            eps = _weighted_sum(_ADAMS_BASHFORTH[len(history) - 1], history)
        x = x + eps * (sigma_next - sigma)
        yield step_result(i, x, denoised)


def _unipc_update(
    x: mx.array,
    sigma_s: float,
    sigma_t: float,
    outputs: Sequence[mx.array],
    output_sigmas: Sequence[float],
    order: int,
    output_t: mx.array | None = None,
) -> mx.array:
    """One UniPC-bh2 update of x from sigma_s to sigma_t (x0-prediction form).

    `outputs` are x0 estimates newest first, outputs[0] at sigma_s, `output_sigmas` their sigmas.
    Without `output_t` this is the predictor UniP; with the x0 estimate at sigma_t (at x predicted
    earlier) it is the corrector UniC, which re-solves the same step with one more point.
    """
    m0 = outputs[0]
    lam_s = -math.log(sigma_s)
    h = -math.log(sigma_t) - lam_s
    rks = [(-math.log(s) - lam_s) / h for s in output_sigmas[1:order]]
    diffs = [(m - m0) / rk for m, rk in zip(outputs[1:order], rks, strict=True)]
    h_phi_1 = math.expm1(-h)
    b_h = h_phi_1  # bh2
    # b_k = k! * phi_{k+1}(-h) / B(h), by phi's recurrence.
    b, h_phi_k, factorial = [], h_phi_1 / -h - 1, 1
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / -h - 1 / factorial
    r_matrix = np.vander(np.array([*rks, 1.0]), order, increasing=True).T  # rows rks**0, rks**1, ...
    x_t = (sigma_t / sigma_s) * x - h_phi_1 * m0
    if output_t is None:
        if not diffs:
            return x_t
        rhos = [0.5] if order == 2 else list(np.linalg.solve(r_matrix[:-1, :-1], b[:-1]))
        return x_t - b_h * _weighted_sum(rhos, diffs)
    rhos = [0.5] if order == 1 else list(np.linalg.solve(r_matrix, b))
    return x_t - b_h * _weighted_sum(rhos, [*diffs, output_t - m0])


def sample_unipc(
    denoise: Denoiser, x: mx.array, sigmas: np.ndarray, noise: Noise | None = None, solver_order: int = 2
) -> Iterator[Step]:
    """UniPC (Zhao et al. 2023), bh2 variant: each new model output first corrects the current x (UniC,
    no extra model call), then predicts the next (UniP). The order ramps up from 1 and comes back down
    over the last steps; the step to sigma 0 returns the x0 estimate."""
    outputs: list[mx.array] = []  # newest first
    output_sigmas: list[float] = []
    steps = len(sigmas) - 1
    order, last_x = 1, x
    for i, sigma, sigma_next in sigma_pairs(sigmas):
        denoised = denoise(x, sigma)
        if outputs:
            x = _unipc_update(last_x, output_sigmas[0], sigma, outputs, output_sigmas, order, denoised)
        outputs = [denoised, *outputs][:solver_order]
        output_sigmas = [sigma, *output_sigmas][:solver_order]
        order = min(solver_order, steps - i, i + 1)
        last_x = x
        x = denoised if sigma_next == 0 else _unipc_update(x, sigma, sigma_next, outputs, output_sigmas, order)
        yield step_result(i, x, denoised)
