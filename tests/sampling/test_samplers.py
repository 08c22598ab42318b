"""Every sampler against the reference run recorded by fixtures/make_sampler_fixtures.py (A1111's
names) and fixtures/make_drawthings_sampler_fixtures.py (the names Draw Things adds):
k-diffusion 0.1.1 for the k-diffusion samplers (A1111's noise: per-item torch generators, also for
the SDE samplers' noise_sampler; Draw Things' AYS, Substep and DPM++ SDE Trailing schedules run through
them too) and diffusers 0.39 schedulers with the SD-1.5 config for DDIM, PLMS, UniPC, LCM, TCD and the
trailing-spacing variants. Both sides use the same analytic eps model. Every step's latents must agree to within
1e-5 of that step's largest |x| (float32 arithmetic on both sides; the worst case measured is 1.1e-6,
and |x| runs from ~30 at the first Karras step to ~1)."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_sd.engine.random import BatchGenerator
from mlx_sd.sampling import catalog, registry, samplers_multistep
from mlx_sd.sampling.samplers import noise_source
from mlx_sd.sampling.denoisers import eps_denoiser, guided, lcm_denoiser, v_denoiser
from mlx_sd.sampling.schedules import sigma_to_t, train_sigmas

_DIR = Path(__file__).parents[1] / "fixtures" / "samplers"
FIXTURES = {**np.load(_DIR / "samplers.npz"), **np.load(_DIR / "drawthings.npz")}
SHAPE = (4, 8, 8)
SEED = 31337
RELATIVE_TO_MAX = 1e-5
# case -> (sampler name, steps, batch size, sampler override)
CASES = {
    "Euler": ("Euler", 8, 1, None),
    "Euler a": ("Euler a", 8, 1, None),
    "Euler a/batch": ("Euler a", 8, 2, None),
    "Heun": ("Heun", 8, 1, None),
    "LMS": ("LMS", 8, 1, None),
    "DPM2": ("DPM2", 8, 1, None),
    "DPM2 a": ("DPM2 a", 8, 1, None),
    "DPM++ 2M": ("DPM++ 2M", 8, 1, None),
    "DPM++ 2M Karras": ("DPM++ 2M Karras", 8, 1, None),
    "DPM++ SDE": ("DPM++ SDE", 8, 1, None),
    "DPM++ SDE Karras": ("DPM++ SDE Karras", 8, 1, None),
    "DPM++ 2M SDE Karras": ("DPM++ 2M SDE Karras", 8, 1, None),
    "DDIM": ("DDIM", 8, 1, None),
    "PLMS": ("PLMS", 8, 1, None),
    "PLMS/1": ("PLMS", 1, 1, None),
    "UniPC": ("UniPC", 8, 1, None),
    "UniPC/order3": ("UniPC", 8, 1, partial(samplers_multistep.sample_unipc, solver_order=3)),
    "LCM": ("LCM", 4, 1, None),
    "Euler a Trailing": ("Euler a Trailing", 8, 1, None),
    "DPM++ 2M Trailing": ("DPM++ 2M Trailing", 8, 1, None),
    "DDIM Trailing": ("DDIM Trailing", 8, 1, None),
    "UniPC Trailing": ("UniPC Trailing", 8, 1, None),
    "TCD": ("TCD", 4, 1, None),
    "TCD/gamma0.7": ("TCD", 8, 1, catalog.sampler_spec("TCD", 0.7).sample),
    "TCD/gamma0": ("TCD", 4, 1, catalog.sampler_spec("TCD", 0.0).sample),
    "TCD Trailing": ("TCD Trailing", 8, 1, None),
    "DPM++ SDE Trailing": ("DPM++ SDE Trailing", 8, 1, None),
    "Euler a AYS": ("Euler a AYS", 10, 1, None),
    "DPM++ 2M AYS": ("DPM++ 2M AYS", 10, 1, None),
    "DPM++ SDE AYS": ("DPM++ SDE AYS", 10, 1, None),
    "UniPC AYS": ("UniPC AYS", 10, 1, None),
    "Euler a Substep": ("Euler a Substep", 4, 1, None),
    "DPM++ SDE Substep": ("DPM++ SDE Substep", 4, 1, None),
}



def analytic_eps(x: mx.array, t: mx.array, context: mx.array | None) -> mx.array:
    """The fixture script's stand-in UNet (context unused)."""
    t = t.reshape(-1, 1, 1, 1)
    return x * (0.8 + 0.2 * mx.sin(t / 300.0)) + 0.1 * mx.tanh(2.0 * x)


def run(case: str) -> list[mx.array]:
    """Our sampler for `case`: the latent after every step, in the VP form diffusers reports for the
    diffusers-style samplers (the last one as the pipeline will decode it, via `output_latents`)."""
    name, steps, batch, override = CASES[case]
    spec = catalog.sampler_spec(name)
    train = train_sigmas()
    sigmas = spec.sigmas(steps, train)
    noise = noise_source(BatchGenerator.consecutive(SEED, batch), channels_last=False)  # torch's NCHW
    denoise = spec.denoiser(eps_denoiser(guided(analytic_eps, mx.zeros((1, 1)), None, 1.0), train), train)
    x = spec.initial_latents(noise((batch, *SHAPE)), sigmas)
    xs = [step.x for step in (override or spec.sample)(denoise, x, sigmas, noise)]
    if spec.vp_start:
        xs[:-1] = [x / math.sqrt(1.0 + float(s) ** 2) for x, s in zip(xs[:-1], sigmas[1:-1], strict=True)]
    xs[-1] = spec.output_latents(xs[-1], sigmas)
    return xs


@pytest.mark.parametrize("case", list(CASES))
def test_sampler_matches_reference(case: str) -> None:
    xs = run(case)
    expected = FIXTURES[f"{case}/steps"]
    assert len(xs) == len(expected)
    for i, (ours, ref) in enumerate(zip(xs, expected, strict=True)):
        atol = RELATIVE_TO_MAX * np.abs(ref).max()
        np.testing.assert_allclose(np.array(ours), ref, rtol=0, atol=atol, err_msg=f"{case}, step {i}")


def test_every_sampler_name_has_a_reference_case() -> None:
    assert {name for name, *_ in CASES.values()} == set(registry.SAMPLER_NAMES)


def test_stopping_iteration_stops_sampling() -> None:
    calls = []

    def denoise(x: mx.array, sigma: float) -> mx.array:
        calls.append(sigma)
        return x * 0.5

    steps = catalog.sampler_spec("Heun").sample(denoise, mx.ones((1, 2)), np.array([3.0, 2.0, 1.0, 0.0]), None)
    first = next(steps)
    steps.close()
    assert first.index == 0 and len(calls) == 2  # one Heun step: two model calls, nothing after


def test_stochastic_sampler_requires_noise() -> None:
    with pytest.raises(ValueError, match="noise source"):
        next(catalog.sampler_spec("Euler a").sample(lambda x, s: x, mx.ones((1,)), np.array([1.0, 0.0]), None))


def test_lms_coefficients_integrate_the_lagrange_basis() -> None:
    # Weights must reproduce the exact integral of any polynomial of degree < order on the nodes.
    sigmas = np.array([14.6, 9.0, 5.2, 2.8, 1.1, 0.0])
    weights = samplers_multistep.lms_coefficients(sigmas, 3, 4)
    cubic = np.polynomial.Polynomial([0.3, -1.0, 0.5, 0.25])
    integral = cubic.integ()(sigmas[4]) - cubic.integ()(sigmas[3])
    assert np.dot(weights, [cubic(sigmas[3 - k]) for k in range(4)]) == pytest.approx(integral, rel=1e-12)


def test_guidance_batches_the_two_halves_of_each_image_and_runs_images_one_by_one() -> None:
    calls = []

    def model(x: mx.array, t: mx.array, context: mx.array) -> mx.array:
        calls.append(x.shape[0])
        # A stand-in whose result depends on the batch it is in, as a matrix product's rounding may.
        return x * context.reshape(-1, 1) + 1e-3 * x.shape[0]

    x, t = mx.array([[1.0, 2.0]]), mx.array([10.0])
    cond, uncond = mx.array([[3.0]]), mx.array([[1.0]])
    out = guided(model, cond, uncond, 7.5)(x, t)
    assert calls == [2]
    np.testing.assert_allclose(np.array(out), [[1.0 + 7.5 * 2.0 + 2e-3, 2.0 + 7.5 * 4.0 + 2e-3]], rtol=1e-6)
    np.testing.assert_allclose(np.array(guided(model, cond, uncond, 1.0)(x, t)), [[3.001, 6.001]], rtol=1e-6)
    assert calls == [2, 1]
    calls.clear()
    batch = mx.array([[1.0, 2.0], [-4.0, 0.5], [1.0, 2.0]])
    together = np.array(guided(model, cond, uncond, 7.5)(batch, mx.full((3,), 10.0)))
    assert calls == [2, 2, 2]  # one call per image, its two halves in one
    assert np.array_equal(together[0], np.array(out)[0]) and np.array_equal(together[2], np.array(out)[0])


def test_eps_and_v_denoisers_match_their_definitions() -> None:
    # k-diffusion CompVisDenoiser / CompVisVDenoiser: c_in = 1/sqrt(sigma^2+1), t = sigma_to_t(sigma).
    train = train_sigmas()
    seen = []

    def predict(x_in: mx.array, t: mx.array) -> mx.array:
        seen.append((np.array(x_in), np.array(t)))
        return mx.full(x_in.shape, 0.5)

    x, sigma = mx.array([[2.0, -1.0]]), 3.0
    eps = np.array(eps_denoiser(predict, train)(x, sigma))
    v = np.array(v_denoiser(predict, train)(x, sigma))
    np.testing.assert_allclose(seen[0][0], np.array(x) / math.sqrt(10.0), rtol=1e-6)
    np.testing.assert_allclose(seen[0][1], [sigma_to_t(sigma, train)], rtol=1e-6)
    np.testing.assert_allclose(eps, np.array(x) - 1.5, rtol=1e-6)
    np.testing.assert_allclose(v, np.array(x) / 10.0 - 3.0 / math.sqrt(10.0) * 0.5, rtol=1e-6)


def test_lcm_boundary_condition_at_large_and_small_timesteps() -> None:
    train = train_sigmas()
    x = mx.array([[1.0]])
    big = np.array(lcm_denoiser(lambda x, s: x * 0 + 0.25, train)(x, float(train[999])))
    assert big == pytest.approx(0.25, rel=1e-6)  # c_skip ~ 0 far from the data
    # at t = 0: c_out = 0, c_skip = 1 -> the VP latent itself
    small = np.array(lcm_denoiser(lambda x, s: x * 0 + 0.25, train)(x, float(train[0])))
    assert small == pytest.approx(1.0 / math.sqrt(1.0 + float(train[0]) ** 2), rel=1e-6)


def test_sampler_name_lookup() -> None:
    assert catalog.sampler_spec("dpm++ 2m karras") is catalog.SAMPLERS["DPM++ 2M Karras"]
    assert catalog.sampler_spec("  EULER A ") is catalog.SAMPLERS["Euler a"]
    assert catalog.sampler_spec("") is catalog.SAMPLERS[registry.DEFAULT_SAMPLER]
    assert catalog.sampler_spec("DPM++ 3M") is None
    assert registry.canonical_sampler_name("unipc") == "UniPC"
    assert set(catalog.SAMPLERS) == set(registry.SAMPLER_NAMES)


def test_channels_last_noise_puts_each_value_where_torch_does() -> None:
    nchw = BatchGenerator.consecutive(5, 2).randn((2, 4, 3, 6))
    nhwc = noise_source(BatchGenerator.consecutive(5, 2))((2, 3, 6, 4))
    np.testing.assert_array_equal(np.array(nhwc), nchw.transpose(0, 2, 3, 1))
