"""The generation pipeline on the tiny SDXL and SD 2.x (v-prediction) models: images equal to diffusers'
StableDiffusionXLPipeline and StableDiffusionPipeline for the same weights, seed and sampler, on each
backend; the families' sizes, prediction types and conditioning.

Goldens: tests/fixtures/sdxl_tiny/pipeline.npz and sd2_tiny/pipeline.npz (make_sdxl_fixtures.py,
make_sd2_fixtures.py); the tolerances are SD 1.x's (tests/engine/test_pipeline.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mlx_sd.engine.backends import Backend
from mlx_sd.engine.errors import InvalidRequest
from mlx_sd.engine.model_store import ModelStore
from mlx_sd.engine.pipeline import Pipeline
from mlx_sd.engine.request import GenerationRequest
from tests.engine.test_pipeline import IMAGE_ATOL, run

FIXTURES = Path(__file__).parents[1] / "fixtures"
# diffusers rounds DPM-Solver's model timesteps to integers, A1111 and we do not: the SD 1.x bound.
DPMPP_GAP = 4e-3


def models_dir(root: Path, family: str) -> Path:
    shutil.copytree(FIXTURES / f"{family}_tiny" / "diffusers", root / "stable-diffusion")
    return root


@pytest.fixture(scope="module", params=["sdxl", "sd2"])
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def pipeline(family: str, tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> Pipeline:
    return Pipeline(ModelStore(models_dir(tmp_path_factory.mktemp(family), family), backend=backend))


def case_request(family: str, case: str) -> tuple[GenerationRequest, np.ndarray]:
    spec = json.loads((FIXTURES / f"{family}_tiny" / "golden.json").read_text())["pipeline"]["cases"][case]
    request = GenerationRequest(prompt=spec["prompt"], negative_prompt=spec["negative_prompt"], width=spec["width"],
                                height=spec["height"], steps=spec["steps"], cfg_scale=spec["cfg"], seed=spec["seed"],
                                sampler=spec["sampler"]).validated()
    return request, np.load(FIXTURES / f"{family}_tiny" / "pipeline.npz")[f"{case}/image"].astype(np.float64) * 255


@pytest.mark.parametrize("case", ["euler", "euler_a"])
def test_images_match_diffusers(family: str, pipeline: Pipeline, case: str) -> None:
    request, expected = case_request(family, case)
    _, result = run(pipeline, request)
    # PNG pixels are rounded to whole levels: 0.5 of rounding plus the float tolerance.
    assert np.abs(result.images[0].pixels.astype(np.float64) - expected).max() <= 0.5 + IMAGE_ATOL * 255


def test_dpmpp_2m_karras_matches_a1111_or_differs_from_diffusers_by_its_timestep_rounding(
        family: str, pipeline: Pipeline) -> None:
    request, diffusers_image = case_request(family, "dpmpp_2m_karras")
    _, result = run(pipeline, request)
    ours = result.images[0].pixels.astype(np.float64)
    if family == "sd2":  # the fixture recorded A1111's path (k-diffusion, CompVisVDenoiser) as well
        a1111 = np.load(FIXTURES / "sd2_tiny" / "pipeline.npz")["dpmpp_2m_karras/a1111/image"] * 255.0
        assert np.abs(ours - a1111).max() <= 0.5 + IMAGE_ATOL * 255
        # diffusers' gap for this v model, as the fixture measured it (1.76e-2), plus rounding
        assert np.abs(ours - diffusers_image).max() / 255 < 1.8e-2 + 0.5 / 255
    else:
        assert np.abs(ours - diffusers_image).max() / 255 < DPMPP_GAP


def test_the_other_prediction_type_gives_another_image(family: str, tmp_path: Path, backend: Backend) -> None:
    """The fixtures' prediction type matters: forcing the other one changes the image."""
    request, expected = case_request(family, "euler")
    other = "v" if family == "sdxl" else "epsilon"
    store = ModelStore(models_dir(tmp_path, family), backend=backend, prediction_type=other)
    _, result = run(Pipeline(store), request)
    assert np.abs(result.images[0].pixels.astype(np.float64) - expected).max() > 20


def test_size_zero_is_the_models_native_size(family: str, pipeline: Pipeline) -> None:
    # the tiny UNets' sample_size is 16 latents: 128 pixels
    _, result = run(pipeline, GenerationRequest(prompt="x", width=0, height=64, steps=1, seed=1).validated())
    image = result.images[0]
    assert image.pixels.shape == (64, 128, 3)
    assert "Size: 128x64" in image.parameters.text()


def test_clip_skip_past_the_encoders_is_refused(family: str, pipeline: Pipeline) -> None:
    # the tiny encoders have 3 layers; SDXL reads one before the last already
    limit = 2 if family == "sdxl" else 3
    run(pipeline, GenerationRequest(prompt="x", width=64, height=64, steps=1, seed=1, clip_skip=limit).validated())
    with pytest.raises(InvalidRequest) as error:
        list(pipeline(GenerationRequest(prompt="x", width=64, height=64, steps=1, clip_skip=limit + 1).validated()))
    assert error.value.field == "clip_skip"


def test_size_conditioning_moves_sdxl_and_no_other_family(family: str, pipeline: Pipeline) -> None:
    base = dict(prompt="x", width=64, height=64, steps=2, seed=3)
    plain = run(pipeline, GenerationRequest(**base).validated())[1].images[0].pixels.astype(int)
    # the defaults spelled out: the image's size as original and target, crop (0, 0)
    spelled = GenerationRequest(**base, original_width=64, original_height=64, target_width=64, target_height=64)
    assert np.array_equal(run(pipeline, spelled.validated())[1].images[0].pixels, plain)
    cropped = GenerationRequest(**base, original_width=256, original_height=192, crop_top=32, crop_left=16)
    moved = np.abs(run(pipeline, cropped.validated())[1].images[0].pixels.astype(int) - plain).max()
    assert (moved > 0) == (family == "sdxl")
