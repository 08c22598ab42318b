"""The SDXL refiner's UNet (bigG-only context, aesthetic-score micro-conditioning) against diffusers,
loaded through `convert` from the diffusers form, on each backend and weights' dtype.

Fixtures: tests/fixtures/sdxl_refiner_tiny (make_sdxl_refiner_fixtures.py); its conditioning is the
tiny SDXL base's bigG output (sdxl_tiny/golden.safetensors), the encoder the refiner shares with it.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from convert import ModelNetworks, load_networks
from convert.families import SDXL_REFINER
from mlx_sd.engine.backends import Backend
from tests.models.test_models_parity import TOLERANCES, nchw, nhwc, relative_error

FIXTURES = Path(__file__).parents[1] / "fixtures"
REFINER = FIXTURES / "sdxl_refiner_tiny"


@pytest.fixture(scope="module", params=[mx.float32, mx.float16, mx.bfloat16], ids=["fp32", "fp16", "bf16"])
def dtype(request: pytest.FixtureRequest) -> mx.Dtype:
    return request.param


@pytest.fixture(scope="module")
def refiner(dtype: mx.Dtype, backend: Backend) -> ModelNetworks:
    models = load_networks(REFINER / "diffusers", dtype=dtype, reader=backend.reader)
    assert models.family is SDXL_REFINER and models.text_encoder is None
    return backend.prepare_models(models)


@pytest.mark.parametrize("timestep", [999, 250])
def test_refiner_unet_matches_reference(refiner: ModelNetworks, dtype: mx.Dtype, backend: Backend,
                                        timestep: int) -> None:
    golden = mx.load(str(REFINER / "golden.safetensors"))
    text = mx.load(str(FIXTURES / "sdxl_tiny" / "golden.safetensors"))
    act = backend.activation_dtype(dtype)
    out = refiner.unet(nhwc(golden["unet_sample"]).astype(act), mx.array(timestep),
                       text["text_2_hidden_penultimate"].astype(act), text["text_2_pooled"].astype(act),
                       golden["unet_time_ids"])
    assert relative_error(nchw(out), golden[f"unet_out_t{timestep}"]) <= TOLERANCES[dtype]


def test_refiner_text_encoder_is_bigg_with_its_projection(refiner: ModelNetworks) -> None:
    text = mx.load(str(FIXTURES / "sdxl_tiny" / "golden.safetensors"))
    hidden, pooled = refiner.text_encoder_2.hidden_and_pooled(text["text_input_ids_2"])
    assert relative_error(pooled, text["text_2_pooled"]) <= TOLERANCES[mx.bfloat16]
    assert relative_error(hidden, text["text_2_hidden_penultimate"]) <= TOLERANCES[mx.bfloat16]


def test_the_refiner_as_a_single_file_holds_the_weights_of_its_diffusers_form(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    from tests.fixtures.family_keymap import single_file_from_diffusers

    folder = load_networks(REFINER / "diffusers")
    path = tmp_path / "sd_xl_refiner.safetensors"  # SGM's layout: bigG alone, as conditioner.embedders.0
    save_file(single_file_from_diffusers(REFINER, "sdxl_refiner"), str(path))
    single = load_networks(path, configs=folder.configs)
    assert single.family is SDXL_REFINER and single.text_encoder is None
    for network in ("unet", "vae", "text_encoder_2"):
        ours, theirs = (dict(tree_flatten(getattr(models, network).parameters())) for models in (single, folder))
        assert ours.keys() == theirs.keys()
        assert all(mx.array_equal(ours[name], theirs[name]) for name in ours), network
