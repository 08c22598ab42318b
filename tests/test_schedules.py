"""Schedules against k-diffusion 0.1.1 (what A1111 uses) and diffusers 0.39 with the SD-1.5 scheduler
config (fixtures/samplers/schedules.npz, made by fixtures/make_sampler_fixtures.py). Sigmas agree
with k-diffusion's to 1e-6 relative (it rounds through float32 as we do), with diffusers' to 1e-5
(its float32 cumprod differs slightly); timesteps exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlx_sd.sampling import catalog, schedules

FIXTURES = np.load(Path(__file__).parent / "fixtures" / "samplers" / "schedules.npz")
STEP_COUNTS = (1, 2, 8, 20, 50)
RTOL = 1e-6
DIFFUSERS_RTOL = 1e-5
TRAIN = schedules.train_sigmas()


def test_training_sigmas_match_ldm_and_diffusers() -> None:
    np.testing.assert_allclose(TRAIN, FIXTURES["train/ldm_sigmas"], rtol=RTOL)
    # diffusers accumulates its float32 cumprod differently: within 15 float32 ulps
    np.testing.assert_allclose(
        schedules.scaled_linear_alphas_cumprod(), FIXTURES["train/diffusers_alphas_cumprod"], rtol=0, atol=6e-7
    )


def test_sigma_to_t_matches_k_diffusion() -> None:
    t = schedules.sigma_to_t(FIXTURES["sigma_to_t/sigma"].astype(np.float64), TRAIN)
    # the reference takes log sigma in float32: up to ~1e-4 timesteps apart at large sigma
    np.testing.assert_allclose(t, FIXTURES["sigma_to_t/t"], rtol=0, atol=2e-4)


def test_t_to_sigma_inverts_sigma_to_t() -> None:
    t = np.array([0.0, 0.5, 17.25, 500.0, 998.9, 999.0])
    np.testing.assert_allclose(schedules.sigma_to_t(schedules.t_to_sigma(t, TRAIN), TRAIN), t, atol=1e-9)


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize(
    ("sampler", "reference", "rtol"),
    [
        ("Euler", "k/{}", RTOL),
        ("DPM++ 2M Karras", "karras/{}", RTOL),
        ("DPM2", "dpm2/{}", RTOL),
        # diffusers derives its sigmas from its own float32 alphas_cumprod (see above)
        ("UniPC", "unipc/{}/sigmas", DIFFUSERS_RTOL),
    ],
)
def test_sampler_sigmas_match_reference(sampler: str, reference: str, rtol: float, steps: int) -> None:
    ours = catalog.sampler_spec(sampler).sigmas(steps, TRAIN)
    np.testing.assert_allclose(ours, FIXTURES[reference.format(steps)], rtol=rtol)


@pytest.mark.parametrize("steps", [s for s in STEP_COUNTS if s > 1])
def test_karras_sigmas_match_diffusers(steps: int) -> None:
    # (for one step diffusers takes sigma_max from its 1-step linspace schedule, i.e. sigma_min)
    ours = catalog.sampler_spec("DPM++ SDE Karras").sigmas(steps, TRAIN)
    np.testing.assert_allclose(ours, FIXTURES[f"euler_karras/{steps}/sigmas"], rtol=DIFFUSERS_RTOL)


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_timesteps_match_diffusers(steps: int) -> None:
    assert np.array_equal(schedules.leading_timesteps(steps), FIXTURES[f"ddim/{steps}/timesteps"])
    # PNDM repeats one timestep for its first (two-evaluation) PLMS step
    pndm = FIXTURES[f"pndm/{steps}/timesteps"]
    assert np.array_equal(schedules.leading_timesteps(steps), pndm[np.r_[True, pndm[1:] != pndm[:-1]]])
    assert np.array_equal(schedules.linspace_timesteps(steps), FIXTURES[f"unipc/{steps}/timesteps"])
    assert np.array_equal(schedules.lcm_timesteps(steps), FIXTURES[f"lcm/{steps}/timesteps"])


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_ddim_and_lcm_sigmas_sit_on_their_timesteps(steps: int) -> None:
    ddim = catalog.sampler_spec("DDIM").sigmas(steps, TRAIN)
    ddim_t = schedules.sigma_to_t(ddim, TRAIN)
    np.testing.assert_allclose(ddim_t, [*schedules.leading_timesteps(steps), 0], atol=1e-9)
    lcm = catalog.sampler_spec("LCM").sigmas(steps, TRAIN)
    assert lcm[-1] == 0.0
    np.testing.assert_allclose(schedules.sigma_to_t(lcm[:-1], TRAIN), schedules.lcm_timesteps(steps), atol=1e-9)


def test_lcm_rejects_more_steps_than_its_distillation_schedule() -> None:
    with pytest.raises(ValueError, match="LCM takes"):
        schedules.lcm_timesteps(51)
