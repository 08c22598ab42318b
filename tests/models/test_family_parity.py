"""SD 2.x and SDXL networks, loaded through `convert` from the diffusers form and the original single
file, against diffusers/transformers reference outputs, on each backend and weights' dtype.

Fixtures: tests/fixtures/sd2_tiny and sdxl_tiny (make_sd2_fixtures.py, make_sdxl_fixtures.py).
The tolerances are SD 1.x's (tests/models/test_models_parity.py), where they are measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

from convert import ModelNetworks, NetworkConfigs, load_networks
from convert.families import SD2, SDXL
from mlx_sd.engine.backends import Backend
from tests.models.test_models_parity import TOLERANCES, dtype, form, nchw, nhwc, relative_error  # noqa: F401 (fixtures)

FIXTURES = Path(__file__).parents[1] / "fixtures"
FAMILIES = {"sd2": SD2, "sdxl": SDXL}


def fixture_dir(family: str) -> Path:
    return FIXTURES / f"{family}_tiny"


def write_single_file(family: str, path: Path) -> Path:
    from safetensors.numpy import save_file

    from tests.fixtures.family_keymap import single_file_from_diffusers

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(single_file_from_diffusers(fixture_dir(family), family), str(path))
    return path


def tiny_configs(family: str) -> NetworkConfigs:
    """The tiny widths, head counts and groups, which the families' conventions would not infer."""
    configs = json.loads((fixture_dir(family) / "golden.json").read_text())["configs"]
    # transformers' config dicts name the architecture only in config.json
    if "text_encoder_2" in configs:
        configs["text_encoder_2"]["architectures"] = ["CLIPTextModelWithProjection"]
    return NetworkConfigs.from_dict(configs)


@pytest.fixture(scope="module", params=["sd2", "sdxl"])
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def golden(family: str) -> dict[str, mx.array]:
    return mx.load(str(fixture_dir(family) / "golden.safetensors"))


@pytest.fixture(scope="module")
def models(family: str, form: str, dtype: mx.Dtype, backend: Backend,
           tmp_path_factory: pytest.TempPathFactory) -> ModelNetworks:
    if form == "single_file":
        path = write_single_file(family, tmp_path_factory.mktemp(family) / "model.safetensors")
        models = load_networks(path, dtype=dtype, configs=tiny_configs(family), reader=backend.reader)
    else:
        models = load_networks(fixture_dir(family) / "diffusers", dtype=dtype, reader=backend.reader)
    assert models.family is FAMILIES[family]
    return backend.prepare_models(models)


@pytest.fixture(scope="module")
def activations(dtype: mx.Dtype, backend: Backend) -> mx.Dtype:
    """What the networks are fed, as the pipeline feeds them."""
    return backend.activation_dtype(dtype)


def test_text_encoders_match_reference(family: str, models: ModelNetworks, dtype: mx.Dtype, golden: dict) -> None:
    tolerance = TOLERANCES[dtype]
    if family == "sd2":  # the layer before OpenCLIP's last, final-normed: what the single file's extra layer is dropped for
        assert len(models.text_encoder.encoder.layers) == 3
        hidden = models.text_encoder(golden["text_input_ids"])
        assert relative_error(hidden, golden["text_last_hidden_state"]) <= tolerance
        return
    hidden, pooled = models.text_encoder.hidden_and_pooled(golden["text_input_ids"], pooled=False)
    assert pooled is None
    assert relative_error(hidden, golden["text_hidden_penultimate"]) <= tolerance
    hidden, pooled = models.text_encoder_2.hidden_and_pooled(golden["text_input_ids_2"])
    assert relative_error(hidden, golden["text_2_hidden_penultimate"]) <= tolerance
    assert relative_error(pooled, golden["text_2_pooled"]) <= tolerance


@pytest.mark.parametrize("timestep", [999, 250])
def test_unet_matches_reference(family: str, models: ModelNetworks, dtype: mx.Dtype, activations: mx.Dtype,
                                golden: dict, timestep: int) -> None:
    sample = nhwc(golden["unet_sample"]).astype(activations)
    if family == "sd2":
        out = models.unet(sample, mx.array(timestep), golden["text_last_hidden_state"].astype(activations))
    else:
        context = mx.concatenate([golden["text_hidden_penultimate"], golden["text_2_hidden_penultimate"]], axis=-1)
        out = models.unet(sample, mx.array(timestep), context.astype(activations),
                          golden["text_2_pooled"].astype(activations), golden["unet_time_ids"])
    assert relative_error(nchw(out), golden[f"unet_out_t{timestep}"]) <= TOLERANCES[dtype]


def test_vae_matches_reference(models: ModelNetworks, dtype: mx.Dtype, activations: mx.Dtype, golden: dict) -> None:
    images = models.vae.decode(nhwc(golden["vae_decode_z"]).astype(activations))
    assert relative_error(nchw(images), golden["vae_decode_out"]) <= TOLERANCES[dtype]
    mean, logvar = models.vae.encode(nhwc(golden["vae_encode_image"]).astype(activations))
    assert relative_error(nchw(mean), golden["vae_encode_mean"]) <= TOLERANCES[dtype]
    assert relative_error(nchw(logvar), golden["vae_encode_logvar"]) <= TOLERANCES[dtype]


def test_vae_scaling_factor_follows_the_family(family: str, models: ModelNetworks) -> None:
    assert models.vae.config.scaling_factor == FAMILIES[family].vae_scaling_factor


def test_the_sdxl_unet_needs_its_added_conditioning(golden: dict) -> None:
    models = load_networks(fixture_dir("sdxl") / "diffusers", dtype=mx.float32)
    context = mx.zeros((1, 77, models.unet.config.cross_attention_dim))
    with pytest.raises(ValueError, match="text_embeds and time_ids"):
        models.unet(nhwc(golden["unet_sample"])[:1], mx.array(999), context)
