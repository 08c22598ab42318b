"""Model families at load time: detection from single-file keys and diffusers folders, refusals of
unknown and mixed layouts, strictness, the converted cache and the VAE override for SD 2.x and
SDXL; the prediction type (setting, sidecar configs, A1111's probe)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file

from convert import load_networks
from convert.families import SD1, SD2, SDXL, detect_single_file
from convert.formats import find_layout
from mlx_sd.engine import prediction
from mlx_sd.engine.errors import CheckpointError
from tests.models.test_family_parity import fixture_dir, tiny_configs, write_single_file
from tests.models.test_models_parity import FP32_REL_TOL, nchw, nhwc, relative_error

SD1_TEXT = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SDXL_TEXT = "conditioner.embedders.1.model.token_embedding.weight"


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_single_file("sdxl", tmp_path_factory.mktemp("sdxl") / "sdxl.safetensors")


@pytest.fixture(scope="module")
def sd2_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_single_file("sd2", tmp_path_factory.mktemp("sd2") / "sd2.safetensors")


def edited(source: Path, destination: Path, edit) -> Path:
    arrays = load_file(str(source))
    edit(arrays)
    save_file(arrays, str(destination))
    return destination


def test_each_familys_sentinel_keys(sd2_file: Path, sdxl_file: Path, sd1_single_file: Path) -> None:
    for path, family in ((sd1_single_file, SD1), (sd2_file, SD2), (sdxl_file, SDXL)):
        assert detect_single_file(load_file(str(path)), path) is family


def test_an_unknown_layout_is_refused_with_the_keys_looked_for(tmp_path: Path, sdxl_file: Path) -> None:
    path = edited(sdxl_file, tmp_path / "unet_only.safetensors",
                  lambda a: [a.pop(k) for k in list(a) if k.startswith("conditioner.")])
    with pytest.raises(CheckpointError) as error:
        load_networks(path)
    for prefix in ("cond_stage_model.transformer.", "cond_stage_model.model.", "conditioner.embedders.1.model."):
        assert prefix in str(error.value)


def test_a_checkpoint_mixing_families_is_refused_naming_the_keys(tmp_path: Path, sdxl_file: Path) -> None:
    def add_sd1_encoder(arrays: dict) -> None:
        arrays[SD1_TEXT] = np.zeros((4, 8), np.float16)

    with pytest.raises(CheckpointError, match="mixes model families") as error:
        load_networks(edited(sdxl_file, tmp_path / "mixed.safetensors", add_sd1_encoder))
    assert SD1_TEXT in str(error.value) and "conditioner.embedders.0.transformer." in str(error.value)


def test_sdxl_text_encoders_without_the_added_embedding_are_refused(tmp_path: Path, sdxl_file: Path) -> None:
    path = edited(sdxl_file, tmp_path / "no_label_emb.safetensors",
                  lambda a: [a.pop(k) for k in list(a) if ".label_emb." in k])
    with pytest.raises(CheckpointError, match="lacks model.diffusion_model.label_emb.0.0.weight"):
        load_networks(path)


def test_a_diffusers_folder_mixing_families_is_refused(tmp_path: Path) -> None:
    folder = shutil.copytree(fixture_dir("sdxl") / "diffusers", tmp_path / "model")
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(CheckpointError, match="addition_embed_type 'text_time'"):
        load_networks(folder)


def test_pickles_are_refused_in_every_family(tmp_path: Path) -> None:
    folder = shutil.copytree(fixture_dir("sdxl") / "diffusers", tmp_path / "model")
    (folder / "text_encoder_2" / "model.safetensors").unlink()
    (folder / "text_encoder_2" / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(CheckpointError, match="pickle"):
        load_networks(folder)


def test_strict_loading_names_the_network(tmp_path: Path, sdxl_file: Path) -> None:
    key = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    path = edited(sdxl_file, tmp_path / "damaged.safetensors", lambda a: a.pop(key))
    with pytest.raises(CheckpointError) as error:
        load_networks(path, configs=tiny_configs("sdxl"))
    message = str(error.value)
    assert "SDXL architecture" in message and "text_encoder_2: 3 missing: encoder.layers.1.self_attn.q_proj" in message


def test_a_fused_projection_of_the_wrong_height_is_reported(tmp_path: Path, sd2_file: Path) -> None:
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias"
    path = edited(sd2_file, tmp_path / "short.safetensors", lambda a: a.update({key: a[key][:-3]}))
    with pytest.raises(CheckpointError, match="with a wrong shape"):
        load_networks(path, configs=tiny_configs("sd2"))


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_the_converted_cache_keeps_the_family(family: str, tmp_path: Path) -> None:
    source = write_single_file(family, tmp_path / "model.safetensors")
    first = load_networks(source, dtype=mx.float32, configs=tiny_configs(family), cache_dir=tmp_path / "cache")
    (entry,) = (tmp_path / "cache").iterdir()
    again = load_networks(entry, dtype=mx.float32)
    assert again.family is first.family and again.configs == first.configs
    for name, network in first.networks().items():
        ours = dict(tree_flatten(again.networks()[name].parameters()))
        assert all(mx.array_equal(ours[k], v) for k, v in tree_flatten(network.parameters()))


def test_a_standalone_vae_replaces_the_sdxl_vae(tmp_path: Path, sdxl_file: Path) -> None:
    path = edited(sdxl_file, tmp_path / "no_vae.safetensors",
                  lambda a: [a.pop(k) for k in list(a) if k.startswith("first_stage_model.")])
    vae = fixture_dir("sdxl") / "diffusers" / "vae" / "diffusion_pytorch_model.safetensors"
    models = load_networks(path, dtype=mx.float32, vae_path=vae, configs=tiny_configs("sdxl"))
    golden = mx.load(str(fixture_dir("sdxl") / "golden.safetensors"))
    images = nchw(models.vae.decode(nhwc(golden["vae_decode_z"])))
    assert relative_error(images, golden["vae_decode_out"]) <= FP32_REL_TOL
    assert models.vae.config.scaling_factor == SDXL.vae_scaling_factor


# --- prediction type ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd2_unet(sd2_file: Path):
    return load_networks(sd2_file, dtype=mx.float32, configs=tiny_configs("sd2")).unet


@pytest.mark.parametrize(("text", "expected"), [
    ('model:\n  params:\n    parameterization: "v"\n', "v"),
    ("model:\n  params:\n    parameterization: v  # 768-v\n", "v"),
    ("model:\n  params:\n    linear_start: 0.00085\n", "epsilon"),  # LDM's default
    ("model:\n  params:\n    parameterization: 'eps'\n", "epsilon"),
])
def test_a_yaml_beside_the_file_decides(text: str, expected: str, tmp_path: Path, sd2_file: Path, sd2_unet) -> None:
    path = shutil.copy(sd2_file, tmp_path / "model.safetensors")
    (tmp_path / "model.yaml").write_text(text)
    assert prediction.decide("auto", find_layout(Path(path)), sd2_unet, "sd2") == expected


def test_an_unknown_parameterization_is_refused(tmp_path: Path, sd2_file: Path, sd2_unet) -> None:
    path = shutil.copy(sd2_file, tmp_path / "model.safetensors")
    (tmp_path / "model.yaml").write_text("parameterization: x0\n")
    with pytest.raises(CheckpointError, match="model.yaml: parameterization 'x0'"):
        prediction.decide("auto", find_layout(Path(path)), sd2_unet, "sd2")


def test_a_diffusers_scheduler_config_decides(tmp_path: Path, sd2_unet) -> None:
    folder = shutil.copytree(fixture_dir("sd2") / "diffusers", tmp_path / "model")
    assert prediction.decide("auto", find_layout(folder), sd2_unet, "sd2") == "v"
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "epsilon"}))
    assert prediction.decide("auto", find_layout(folder), sd2_unet, "sd2") == "epsilon"


def test_the_setting_overrides_the_sidecar(tmp_path: Path, sd2_unet) -> None:
    folder = fixture_dir("sd2") / "diffusers"  # its scheduler config says v
    assert prediction.decide("epsilon", find_layout(folder), sd2_unet, "sd2") == "epsilon"


@pytest.mark.parametrize(("bias", "expected"), [(-3.0, "v"), (3.0, "epsilon")])
def test_a1111s_probe_decides_for_sd2_without_a_sidecar(bias: float, expected: str, sd2_file: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The probe's mean of (output - 0.5) moves with the UNet's output bias: both sides of -1."""
    unet = load_networks(sd2_file, dtype=mx.float32, configs=tiny_configs("sd2")).unet
    unet.conv_out.bias = mx.full(unet.conv_out.bias.shape, bias)
    with caplog.at_level(logging.INFO, logger="mlx_sd.engine.prediction"):
        assert prediction.decide("auto", find_layout(sd2_file), unet, "sd2") == expected
    kind, mean = prediction.probe(unet)
    assert kind == expected and (mean < -1) == (expected == "v")
    assert f"{expected} prediction, detected as A1111 does" in caplog.text


def test_sdxl_without_a_sidecar_is_epsilon(sdxl_file: Path) -> None:
    models = load_networks(sdxl_file, dtype=mx.float32, configs=tiny_configs("sdxl"))
    assert prediction.decide("auto", find_layout(sdxl_file), models.unet, "sdxl") == "epsilon"


# --- full-size architectures, from shapes -------------------------------------------------------

FULL_SIZE = json.loads((Path(__file__).parents[1] / "fixtures" / "family_shapes.json").read_text())


@pytest.mark.parametrize(("family", "network"), [
    ("sd2", "unet"), ("sd2", "vae"), ("sd2", "text_encoder"),
    ("sdxl", "unet"), ("sdxl", "vae"), ("sdxl", "text_encoder"), ("sdxl", "text_encoder_2"),
])
def test_full_size_architectures_are_read_off_their_shapes(family: str, network: str) -> None:
    """diffusers' and transformers' full-size networks (tests/fixtures/make_family_shapes.py): the
    config read off their shapes builds an MLX network with exactly their parameters."""
    from convert.assemble import MODEL_TYPES
    from convert.infer_config import INFER
    from convert.transforms import mlx_shape

    # our names: transformers' without its `text_model.` level
    reference = {name.removeprefix("text_model."): tuple(shape) for name, shape in FULL_SIZE[family][network].items()}
    config = INFER[network](reference, {"sd2": SD2, "sdxl": SDXL}[family])
    ours = dict(tree_flatten(MODEL_TYPES[network](config).parameters()))  # unevaluated: no memory
    assert set(ours) == set(reference)
    for name, shape in reference.items():
        assert mlx_shape(shape, ours[name].ndim) == tuple(ours[name].shape), name
    expected = FULL_SIZE["configs"][family].get(network, {})
    if network == "unet":
        assert config.heads == tuple(expected["attention_head_dim"])
        assert config.transformer_depths == config.per_block(expected.get("transformer_layers_per_block", 1))
        # a single file does not say SD 2.x's size: 512 until the prediction type says 768-v
        assert config.sample_size * 8 == {"sd2": 512, "sdxl": 1024}[family]
        assert config.addition_time_embed_dim == expected.get("addition_time_embed_dim")
    elif network.startswith("text_encoder"):
        assert (config.num_attention_heads, config.hidden_act) == (expected["num_attention_heads"], expected["hidden_act"])
