"""Adapters from a UNet to the k-diffusion denoiser the samplers call: `denoise(x, sigma) -> x0`.

The samplers work on variance-exploding latents x = x0 + sigma * eps. An SD UNet was trained on
variance-preserving inputs x / sqrt(1 + sigma**2) at a timestep, so the adapter scales the input, maps
sigma to a (fractional) timestep by log-sigma interpolation, and turns the prediction into x0, as
k-diffusion's `CompVisDenoiser` / `CompVisVDenoiser` do (unquantized timesteps, A1111's default).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from mlx_sd.sampling.schedules import sigma_to_t

# (x_scaled, timesteps (B,), context) -> eps or v; the UNet's signature.
EpsModel = Callable[[mx.array, mx.array, Any], mx.array]
# (x_scaled, timesteps (B,)) -> prediction, with the conditioning already bound.
Predictor = Callable[[mx.array, mx.array], mx.array]
# (x, sigma) -> denoised x0.
Denoiser = Callable[[mx.array, float], mx.array]


def guided(model: EpsModel, cond: Any, uncond: Any | None, cfg_scale: float) -> Predictor:
    """Classifier-free guidance: uncond + scale * (cond - uncond), one model call per image with both
    halves batched. `cond` and `uncond` are one image's (batch 1).

    Each image is computed alone, as a batch of its own would be, because a matrix product over more
    rows may round differently in the last bit: an image is then the same, bit for bit, whatever batch
    (or rank, mlx_sd.engine.distributed) makes it. At cfg_scale <= 1 (or without an unconditional
    context) only the conditional pass runs: at exactly 1 that is the same result for half the work;
    below 1 guidance is simply off.
    """
    if uncond is None or cfg_scale <= 1.0:
        return _each_image(lambda x, t: model(x, t, cond))
    both = tree_map(lambda u, c: mx.concatenate([u, c]), uncond, cond)  # an array, or a dict of them

    def predict(x: mx.array, t: mx.array) -> mx.array:
        out_uncond, out_cond = mx.split(model(mx.concatenate([x, x]), mx.concatenate([t, t]), both), 2)
        return out_uncond + cfg_scale * (out_cond - out_uncond)

    return _each_image(predict)


def _each_image(predict: Predictor) -> Predictor:
    """`predict` over a batch, one image at a time; each is evaluated before the next is built, so that
    one image's activations are live at once."""

    def each(x: mx.array, t: mx.array) -> mx.array:
        outputs = []
        for i in range(x.shape[0]):
            outputs.append(predict(x[i:i + 1], t[i:i + 1]))
            mx.eval(outputs[-1])
        return mx.concatenate(outputs)

    return each


def _timesteps(x: mx.array, sigma: float, sigmas: np.ndarray) -> mx.array:
    return mx.full((x.shape[0],), float(sigma_to_t(sigma, sigmas)), dtype=mx.float32)


def eps_denoiser(predict: Predictor, sigmas: np.ndarray) -> Denoiser:
    """x0 = x - sigma * eps for an eps-prediction model (SD 1.x); `sigmas` are the training sigmas."""

    def denoise(x: mx.array, sigma: float) -> mx.array:
        eps = predict(x * (1.0 / math.sqrt(sigma * sigma + 1.0)), _timesteps(x, sigma, sigmas))
        return x - sigma * eps

    return denoise


def v_denoiser(predict: Predictor, sigmas: np.ndarray) -> Denoiser:
    """x0 = x / (sigma**2 + 1) - sigma * v / sqrt(sigma**2 + 1) for a v-prediction model (SD 2.x-v)."""

    def denoise(x: mx.array, sigma: float) -> mx.array:
        norm = math.sqrt(sigma * sigma + 1.0)
        v = predict(x * (1.0 / norm), _timesteps(x, sigma, sigmas))
        return x * (1.0 / (norm * norm)) - (sigma / norm) * v

    return denoise


def lcm_denoiser(denoise: Denoiser, sigmas: np.ndarray, timestep_scaling: float = 10.0) -> Denoiser:
    """LCM's consistency boundary condition on top of a denoiser, as diffusers' LCMScheduler applies
    it: c_out(t) * x0 + c_skip(t) * x_vp with sigma_data = 0.5 and t scaled by `timestep_scaling`
    (c_skip is ~1e-5 at the smallest LCM timestep, so this matters only at the last digits)."""
    sigma_data_sq = 0.25

    def denoise_lcm(x: mx.array, sigma: float) -> mx.array:
        scaled_t = float(sigma_to_t(sigma, sigmas)) * timestep_scaling
        c_skip = sigma_data_sq / (scaled_t**2 + sigma_data_sq)
        c_out = scaled_t / math.sqrt(scaled_t**2 + sigma_data_sq)
        return c_out * denoise(x, sigma) + (c_skip / math.sqrt(sigma * sigma + 1.0)) * x

    return denoise_lcm
