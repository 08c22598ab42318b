"""Image to image and inpainting on the tiny SD-1 model against diffusers' pipelines, on each backend.

Goldens: tests/fixtures/img2img (made by tests/fixtures/make_img2img_fixtures.py with diffusers'
StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline, the VAE's posterior mean as ours).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlx_sd.engine.backends import Backend
from mlx_sd.engine.events import EventType, GenerationResult
from mlx_sd.engine.init_images import Source
from mlx_sd.engine.model_store import ModelStore
from mlx_sd.engine.pipeline import Pipeline
from mlx_sd.engine.request import GenerationRequest
from tests.conftest import TINY_MODEL

FIXTURES = Path(__file__).parents[1] / "fixtures" / "img2img"
GOLDEN = np.load(FIXTURES / "golden.npz")
CASES = json.loads((FIXTURES / "cases.json").read_text())["cases"]
IMAGE_ATOL = 5e-4  # as tests/engine/test_pipeline.py: float differences of a correct fp32 port


def inpainting_model(root: Path) -> Path:
    """The tiny model with the fixture's 9-channel UNet (its conv_in widened, as the fixture script does)."""
    shutil.copytree(TINY_MODEL, root / "stable-diffusion")
    unet = root / "stable-diffusion" / "unet"
    weights = load_file(unet / "diffusion_pytorch_model.safetensors")
    weights["conv_in.weight"] = GOLDEN["inpainting_conv_in"]
    save_file(weights, unet / "diffusion_pytorch_model.safetensors")
    config = json.loads((unet / "config.json").read_text())
    (unet / "config.json").write_text(json.dumps({**config, "in_channels": 9}))
    return root


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> dict[bool, Pipeline]:
    plain = tmp_path_factory.mktemp("models")
    shutil.copytree(TINY_MODEL, plain / "stable-diffusion")
    nine = inpainting_model(tmp_path_factory.mktemp("models9"))
    return {False: Pipeline(ModelStore(plain, backend=backend)), True: Pipeline(ModelStore(nine, backend=backend))}


def case_request(spec: dict, **fields) -> GenerationRequest:
    source = Source(GOLDEN["init_image"], GOLDEN["mask"] if spec["mask"] else None)
    return GenerationRequest(prompt=spec["prompt"], negative_prompt=spec["negative_prompt"], width=spec["size"],
                             height=spec["size"], steps=spec["steps"], cfg_scale=spec["cfg"], seed=spec["seed"],
                             sampler=spec["sampler"], denoising_strength=spec["strength"], source=source,
                             inpaint_no_overlay=True, **fields).validated()


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_diffusers(pipelines: dict[bool, Pipeline], case: str) -> None:
    spec = CASES[case]
    items = list(pipelines[spec["inpainting_unet"]](case_request(spec)))
    events, result = items[:-1], items[-1]
    assert isinstance(result, GenerationResult)
    assert [e.type for e in events][:2] == [EventType.TEXT_ENCODED, EventType.IMAGE_ENCODED]
    sampled = [e for e in events if e.type == EventType.SAMPLING]
    assert len(sampled) == int(spec["strength"] * spec["steps"])  # the last int(strength * steps) steps
    ours = result.images[0].pixels.astype(np.float64)
    expected = GOLDEN[f"{case}/image"].astype(np.float64) * 255
    # PNG pixels are rounded to whole levels: 0.5 of rounding plus the float tolerance.
    assert np.abs(ours - expected).max() <= 0.5 + IMAGE_ATOL * 255


def test_a_single_file_inpainting_checkpoint_is_detected_from_its_weights(tmp_path: Path) -> None:
    from tests.fixtures.sd1_keymap import single_file_from_diffusers

    weights = single_file_from_diffusers(TINY_MODEL.parent)
    weights["model.diffusion_model.input_blocks.0.0.weight"] = GOLDEN["inpainting_conv_in"]
    (tmp_path / "single" / "stable-diffusion").mkdir(parents=True)
    save_file(weights, str(tmp_path / "single" / "stable-diffusion" / "model.safetensors"))
    single = ModelStore(tmp_path / "single").get("").models.unet
    folder = ModelStore(inpainting_model(tmp_path / "folder")).get("").models.unet
    assert single.config.in_channels == folder.config.in_channels == 9
    x = mx.array(np.random.default_rng(0).standard_normal((1, 8, 8, 9)).astype(np.float32))
    context = mx.array(np.random.default_rng(1).standard_normal((1, 77, 32)).astype(np.float32))
    t = mx.array([500.0])
    assert np.array_equal(np.array(single(x, t, context)), np.array(folder(x, t, context)))
