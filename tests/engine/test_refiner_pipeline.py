"""SDXL's refiner as the second stage of the pipeline: images equal to diffusers' base pipeline with
`denoising_end` followed by its refiner pipeline with `denoising_start`, on each backend; refiners
that do not fit the base are refused naming the file.

Goldens: tests/fixtures/sdxl_refiner_tiny/pipeline.npz (make_sdxl_refiner_fixtures.py); the tolerance
is SD 1.x's (tests/engine/test_pipeline.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_sd.engine import refiner
from mlx_sd.engine.backends import Backend
from mlx_sd.engine.errors import InvalidRequest
from mlx_sd.engine.extra_networks import ExtraNetworks
from mlx_sd.engine.lora import LoraWeight
from mlx_sd.engine.model_store import ModelStore
from mlx_sd.engine.pipeline import Pipeline
from mlx_sd.engine.request import GenerationRequest
from tests.engine.test_pipeline import IMAGE_ATOL, run

FIXTURES = Path(__file__).parents[1] / "fixtures"
REFINER = FIXTURES / "sdxl_refiner_tiny"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(FIXTURES / "sdxl_tiny" / "diffusers", root / "stable-diffusion")
    shutil.copytree(REFINER / "diffusers", root / "refiner")
    shutil.copytree(FIXTURES / "sd2_tiny" / "diffusers", root / "sd2")
    return root


@pytest.fixture(scope="module")
def pipeline(models_dir: Path, backend: Backend) -> Pipeline:
    return Pipeline(ModelStore(models_dir, backend=backend))


def case_request(case: str, **fields: object) -> tuple[GenerationRequest, np.ndarray]:
    spec = json.loads((REFINER / "golden.json").read_text())["pipeline"]["cases"][case]
    values = dict(prompt=spec["prompt"], negative_prompt=spec["negative_prompt"], width=spec["width"],
                  height=spec["height"], steps=spec["steps"], cfg_scale=spec["cfg"], seed=spec["seed"],
                  sampler=spec["sampler"], refiner_model="refiner", refiner_start=spec["refiner_start"])
    request = GenerationRequest(**(values | fields)).validated()
    return request, np.load(REFINER / "pipeline.npz")[f"{case}/image"].astype(np.float64) * 255


@pytest.mark.parametrize("case", ["euler", "euler_a"])
def test_base_then_refiner_matches_diffusers(pipeline: Pipeline, case: str) -> None:
    request, expected = case_request(case)
    _, result = run(pipeline, request)
    # PNG pixels are rounded to whole levels: 0.5 of rounding plus the float tolerance.
    assert np.abs(result.images[0].pixels.astype(np.float64) - expected).max() <= 0.5 + IMAGE_ATOL * 255
    text = result.images[0].parameters.text()
    assert "Refiner: refiner [" in text and "Refiner switch at: 0.7" in text


def test_without_the_refiner_the_image_is_the_base_models(pipeline: Pipeline) -> None:
    request, _ = case_request("euler", refiner_model="")
    _, result = run(pipeline, request)
    base_only = np.load(REFINER / "pipeline.npz")["euler/base_only"].astype(np.float64) * 255
    assert np.abs(result.images[0].pixels.astype(np.float64) - base_only).max() <= 0.5 + IMAGE_ATOL * 255
    assert "Refiner" not in result.images[0].parameters.text()


def test_a_requests_loras_merge_into_the_base_model_only(pipeline: Pipeline, models_dir: Path) -> None:
    (models_dir / "lora").mkdir(exist_ok=True)
    shutil.copy(FIXTURES / "lora_sdxl" / "kohya.safetensors", models_dir / "lora" / "style.safetensors")
    request, expected = case_request("euler", loras=(LoraWeight("style", 1.0),))
    _, result = run(pipeline, request)
    assert np.abs(result.images[0].pixels.astype(np.float64) - expected).max() > 1  # the base's LoRA shows
    text = result.images[0].parameters.text()
    assert "Lora hashes: \"style: " in text and "Refiner: refiner [" in text
    # the SDXL base's LoRA has no layer in the refiner: its weights are still the file's
    held = tree_flatten(pipeline._refiners.get("refiner").models.unet.parameters())
    fresh = ModelStore(models_dir, backend=pipeline._store.backend).get("refiner")
    fresh = dict(tree_flatten(fresh.models.unet.parameters()))
    assert all(mx.array_equal(value, fresh[name]).item() for name, value in held)
    _, again = run(pipeline, case_request("euler")[0])  # the next request without it: the base restored
    assert np.abs(again.images[0].pixels.astype(np.float64) - expected).max() <= 0.5 + IMAGE_ATOL * 255


@pytest.mark.parametrize(("model", "refiner", "message"), [
    ("", "sd2", "sd2 is an SD 2.x model, not an SDXL refiner"),
    ("", "stable-diffusion", "stable-diffusion is an SDXL model, not an SDXL refiner"),
    ("sd2", "refiner", "refiner refines SDXL models; sd2 is SD 2.x"),
])
def test_a_refiner_that_does_not_fit_the_base_is_refused_naming_it(pipeline: Pipeline, model: str, refiner: str,
                                                                   message: str) -> None:
    request = GenerationRequest(prompt="x", width=64, height=64, steps=1, model=model,
                                refiner_model=refiner).validated()
    with pytest.raises(InvalidRequest, match=message) as error:
        list(pipeline(request))
    assert error.value.field == "refiner_model"


def test_a_refiner_named_as_the_model_is_refused(pipeline: Pipeline) -> None:
    request = GenerationRequest(prompt="x", width=64, height=64, steps=1, model="refiner").validated()
    with pytest.raises(InvalidRequest, match="refiner is an SDXL refiner model, which runs only as the second "
                                             "stage of a base model") as error:
        list(pipeline(request))
    assert error.value.field == "model"


@pytest.mark.parametrize("start", [1.0, 1.5, -0.1, float("nan")])
def test_refiner_start_must_be_a_fraction(start: float) -> None:
    with pytest.raises(InvalidRequest) as error:
        GenerationRequest(prompt="x", refiner_model="refiner", refiner_start=start).validated()
    assert error.value.field == "refiner_start"


def test_refiner_start_defaults_to_draw_things_and_needs_a_refiner() -> None:
    assert GenerationRequest(prompt="x", refiner_model="r.safetensors").validated().refiner_start == 0.7
    assert GenerationRequest(prompt="x", refiner_start=0.5).validated().refiner_start == 0.0
    with pytest.raises(InvalidRequest) as error:
        GenerationRequest(prompt="x", refiner_model="../outside.safetensors").validated()
    assert error.value.field == "refiner_model"


def test_the_refiner_is_given_the_bases_size_conditioning_and_the_aesthetic_scores(models_dir: Path) -> None:
    loaded = ModelStore(models_dir).get("refiner")
    request = GenerationRequest(prompt="x", width=128, height=64, original_width=512, crop_top=16,
                                negative_original_height=32, refiner_model="refiner").validated()
    extras = ExtraNetworks(models_dir).prepare(loaded, request.prompt, request.negative_prompt)
    cond, uncond = refiner.encode_prompts(loaded, request, extras)
    assert cond["time_ids"].tolist() == [[64, 512, 16, 0, 6.0]]
    assert uncond["time_ids"].tolist() == [[32, 512, 16, 0, 2.5]]
    assert cond["context"].shape == (1, 77, 32) and cond["text_embeds"].shape == (1, 24)  # bigG alone
    scored = dataclasses.replace(request, aesthetic_score=7.5, negative_aesthetic_score=1.0).validated()
    cond, uncond = refiner.encode_prompts(loaded, scored, extras)
    assert cond["time_ids"][0, 4].item() == 7.5 and uncond["time_ids"][0, 4].item() == 1.0


@pytest.mark.parametrize(("field", "value"), [("aesthetic_score", 10.5), ("negative_aesthetic_score", -1.0),
                                              ("aesthetic_score", float("nan"))])
def test_an_aesthetic_score_outside_0_to_10_is_refused(field: str, value: float) -> None:
    with pytest.raises(InvalidRequest) as error:
        GenerationRequest(prompt="x", refiner_model="refiner", **{field: value}).validated()
    assert error.value.field == field
