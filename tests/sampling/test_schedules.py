"""Schedules against k-diffusion 0.1.1 (what A1111 uses) and diffusers 0.39 with the SD-1.5 scheduler
config (fixtures/samplers/schedules.npz, made by fixtures/make_sampler_fixtures.py). Sigmas agree
with k-diffusion's to 1e-6 relative (it rounds through float32 as we do), with diffusers' to 1e-5
(its float32 cumprod differs slightly); timesteps exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlx_sd.sampling import catalog, schedules

FIXTURES = np.load(Path(__file__).parents[1] / "fixtures" / "samplers" / "schedules.npz")
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


DRAWTHINGS = np.load(Path(__file__).parents[1] / "fixtures" / "samplers" / "drawthings.npz")
TRAILING_STEPS = (1, 2, 3, 8, 20, 48, 50, 150)


@pytest.mark.parametrize("steps", TRAILING_STEPS)
def test_trailing_timesteps_match_diffusers(steps: int) -> None:
    for scheduler in ("ddim", "euler_a", "dpmpp_2m", "unipc"):
        reference = DRAWTHINGS[f"trailing/{scheduler}/{steps}/timesteps"]
        assert np.array_equal(schedules.trailing_timesteps(steps), reference), scheduler


@pytest.mark.parametrize("steps", TRAILING_STEPS)
@pytest.mark.parametrize(
    ("sampler", "reference"),
    [("Euler a Trailing", "euler_a"), ("DPM++ 2M Trailing", "dpmpp_2m"), ("UniPC Trailing", "unipc")],
)
def test_trailing_sigmas_match_diffusers(sampler: str, reference: str, steps: int) -> None:
    ours = catalog.sampler_spec(sampler).sigmas(steps, TRAIN)
    np.testing.assert_allclose(ours, DRAWTHINGS[f"trailing/{reference}/{steps}/sigmas"], rtol=DIFFUSERS_RTOL)


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 20, 48, 50])
def test_tcd_timesteps_match_diffusers(steps: int) -> None:
    sigmas = catalog.sampler_spec("TCD").sigmas(steps, TRAIN)
    expected = [*DRAWTHINGS[f"tcd/{steps}/timesteps"], 0]  # then the final alphas_cumprod[0]
    np.testing.assert_allclose(schedules.sigma_to_t(sigmas, TRAIN), expected, atol=1e-9)


def test_ays_at_ten_steps_is_the_published_schedule() -> None:
    # diffusers' AysSchedules copy of NVIDIA's SD-1.5 sigmas (its last level, 0.029, set to 0)
    for sampler in ("Euler a AYS", "DPM++ 2M AYS", "DPM++ SDE AYS", "UniPC AYS"):
        ours = catalog.sampler_spec(sampler).sigmas(10, TRAIN)
        np.testing.assert_allclose(ours, DRAWTHINGS["ays/sd1/sigmas"], rtol=1e-12, err_msg=sampler)


def test_ays_interpolates_log_linearly_between_the_published_levels() -> None:
    published = np.array(schedules.AYS_SD1_SIGMAS)
    twenty = schedules.ays_sigmas(20)  # 21 levels: every other one is a published level
    np.testing.assert_allclose(twenty[0:20:2], published[:10], rtol=1e-12)
    np.testing.assert_allclose(twenty[1:20:2], np.sqrt(published[:-1] * published[1:]), rtol=1e-12)
    assert twenty[-1] == 0.0
    four = schedules.ays_sigmas(4)  # 5 levels, at positions 0, 2.5, 5, 7.5, 10 of the published 11
    np.testing.assert_allclose(four[[0, 2]], published[[0, 5]], rtol=1e-12)
    np.testing.assert_allclose(four[[1, 3]], np.sqrt(published[[2, 7]] * published[[3, 8]]), rtol=1e-12)
    assert four[-1] == 0.0


def test_substep_schedule_is_draw_things_manual_timesteps() -> None:
    for sampler in ("Euler a Substep", "DPM++ SDE Substep"):
        four = catalog.sampler_spec(sampler).sigmas(4, TRAIN)
        np.testing.assert_allclose(four, TRAIN[[999, 899, 799, 699, 0]], rtol=0)
        nine = catalog.sampler_spec(sampler).sigmas(9, TRAIN)
        np.testing.assert_allclose(nine, TRAIN[[999, 899, 799, 699, 599, 499, 399, 299, 199, 0]], rtol=0)
        # from 10 steps Draw Things falls back to its linear spacing, which is k-diffusion's
        np.testing.assert_allclose(catalog.sampler_spec(sampler).sigmas(20, TRAIN), FIXTURES["k/20"], rtol=RTOL)
