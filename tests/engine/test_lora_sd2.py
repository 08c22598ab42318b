"""SD 2.x: LoRAs merged into the tiny SD 2.x model (OpenCLIP ViT-H-kind text encoder, linear
projections) against diffusers' `load_lora_weights` + `fuse_lora` (fixtures:
tests/fixtures/make_lora_fixtures.py, `lora_sd2/`). Kohya names SD 2.x's text-encoder layers in
transformers' CLIP names (`lora_te_text_model_encoder_layers_N_...`), which must reach our encoder."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

from convert import load_sd1
from mlx_sd.engine import lora_merge
from mlx_sd.engine.backends import Backend
from tests.conftest import backend_or_skip
from tests.engine.test_lora import REL_TOL, outputs, relative_error

FIXTURES = Path(__file__).parents[1] / "fixtures"
LORAS = FIXTURES / "lora_sd2"
WEIGHT = json.loads((LORAS / "golden.json").read_text())["weight"]  # what the goldens were fused at


@pytest.fixture(scope="module")
def golden() -> dict[str, mx.array]:
    return mx.load(str(LORAS / "golden.safetensors"))


@pytest.mark.parametrize("backend", [b.value for b in Backend])
@pytest.mark.parametrize("form", ["kohya", "peft"])
def test_outputs_match_diffusers_with_the_lora_fused(backend: str, golden: dict, form: str) -> None:
    backend = backend_or_skip(backend)
    models = backend.prepare_models(load_sd1(FIXTURES / "sd2_tiny" / "diffusers", dtype=mx.float32,
                                             reader=backend.reader))
    merger = lora_merge.LoraMerger({"unet": models.unet, "text_encoder": models.text_encoder},
                                   lora_merge.unet_levels(models.unet))
    eps, hidden = outputs(models, golden)
    assert relative_error(eps, golden["none.unet"]) <= REL_TOL  # the baseline agrees
    assert relative_error(hidden, golden["none.text_encoder"]) <= REL_TOL

    tensors = mx.load(str(LORAS / f"{form}.safetensors"))
    if form == "kohya":  # the text encoder's keys as kohya writes them, and LoCon's 3x3 convolutions
        assert any(k.startswith("lora_te_text_model_encoder_layers_2_self_attn_q_proj") for k in tensors)
        assert any(k.endswith("conv1.lora_down.weight") and v.shape[-1] == 3 for k, v in tensors.items())
    merger.apply([(LORAS / f"{form}.safetensors", WEIGHT)])
    eps, hidden = outputs(models, golden)
    assert relative_error(eps, golden[f"{form}.unet"]) <= REL_TOL
    assert relative_error(hidden, golden[f"{form}.text_encoder"]) <= REL_TOL
    # the LoRA changes the outputs far beyond the tolerance, so the comparison above means something
    assert relative_error(eps, golden["none.unet"]) > 100 * REL_TOL
    assert relative_error(hidden, golden["none.text_encoder"]) > 100 * REL_TOL
