"""The MLX networks, loaded through `convert`, against diffusers/transformers reference outputs,
on each backend (MLX ops, as Metal runs them, and the CPU kernels) and weights' dtype.

Fixtures: tests/fixtures/sd1_tiny (see its README). Goldens are NCHW fp32 from torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from convert import ModelNetworks, NetworkConfigs, load_networks
from mlx_sd.engine.backends import Backend

FIXTURES = Path(__file__).parents[1] / "fixtures" / "sd1_tiny"
DIFFUSERS = FIXTURES / "diffusers"
DIFFUSERS_VAE = DIFFUSERS / "vae" / "diffusion_pytorch_model.safetensors"
ORIGINAL_VAE = FIXTURES / "vae_original" / "model.safetensors"

# Error relative to the reference's largest magnitude: max|ours - ref| / max|ref|.
# fp32: measured <= 4.5e-6 on both backends (the VAE decode is the worst); 2e-5 leaves room
# for other backends and BLAS builds while still catching any wrong layer, eps or activation.
FP32_REL_TOL = 2e-5
# fp16 weights: on MLX ops fp16 activations too, as on Metal: measured <= 5.8e-3 (VAE decode; UNet
# 3.3e-3, CLIP 1.2e-3) against fp16's 1e-3 unit roundoff accumulated through ~40 layers. The CPU
# kernels compute in fp32 (the tiny model's weights are exact in fp16): <= 1.4e-4 (CLIP, whose
# embeddings are summed in fp16).
FP16_REL_TOL = 1.5e-2
# bf16 weights: bf16's unit roundoff is 8x fp16's. MLX ops, bf16 activations: measured <= 5.1e-2
# (VAE decode; UNet 2.4e-2, CLIP 1.2e-2). CPU kernels, fp32 activations and bf16 products with
# fp32 accumulation: <= 2.7e-2 (VAE decode; UNet 1.3e-2, CLIP 6e-3).
BF16_REL_TOL = 8e-2
TOLERANCES = {mx.float32: FP32_REL_TOL, mx.float16: FP16_REL_TOL, mx.bfloat16: BF16_REL_TOL}


def relative_error(ours: mx.array, reference: mx.array) -> float:
    ours_np, ref_np = np.array(ours.astype(mx.float32)), np.array(reference)
    return float(np.abs(ours_np - ref_np).max() / np.abs(ref_np).max())


def nhwc(x: mx.array) -> mx.array:
    return x.transpose(0, 2, 3, 1)


def nchw(x: mx.array) -> mx.array:
    return x.transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def golden() -> dict[str, mx.array]:
    return mx.load(str(FIXTURES / "golden.safetensors"))


@pytest.fixture(scope="module")
def tiny_configs() -> NetworkConfigs:
    """The tiny models' widths and head counts, which SD-1 conventions would not infer."""
    return NetworkConfigs.from_dict(json.loads((FIXTURES / "golden.json").read_text())["configs"])


@pytest.fixture(scope="module", params=["single_file", "diffusers"])
def form(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module", params=[mx.float32, mx.float16, mx.bfloat16], ids=["fp32", "fp16", "bf16"])
def dtype(request: pytest.FixtureRequest) -> mx.Dtype:
    return request.param


@pytest.fixture(scope="module")
def models(form: str, dtype: mx.Dtype, backend: Backend, tiny_configs: NetworkConfigs,
           sd1_single_file: Path) -> ModelNetworks:
    """The networks loaded and prepared for the backend, as the model store does."""
    if form == "single_file":
        models = load_networks(sd1_single_file, dtype=dtype, configs=tiny_configs, reader=backend.reader)
    else:  # configs come from the folder's config.json files
        models = load_networks(DIFFUSERS, dtype=dtype, reader=backend.reader)
    return backend.prepare_models(models)


@pytest.fixture(scope="module")
def activations(dtype: mx.Dtype, backend: Backend) -> mx.Dtype:
    """What the networks are fed, as the pipeline feeds them."""
    return backend.activation_dtype(dtype)


def test_weights_take_the_requested_dtype(models: ModelNetworks, dtype: mx.Dtype) -> None:
    for network in (models.text_encoder, models.unet, models.vae):
        assert {p.dtype for _, p in tree_flatten(network.parameters())} == {dtype}


def test_activations_take_the_backends_dtype(models: ModelNetworks, activations: mx.Dtype, golden: dict) -> None:
    assert models.text_encoder(golden["text_input_ids"]).dtype == activations
    assert models.vae.decode(nhwc(golden["vae_decode_z"]).astype(activations)).dtype == activations


def test_text_encoder_matches_reference(models: ModelNetworks, dtype: mx.Dtype, golden: dict) -> None:
    hidden = models.text_encoder(golden["text_input_ids"])
    assert relative_error(hidden, golden["text_last_hidden_state"]) <= TOLERANCES[dtype]


@pytest.mark.parametrize("timestep", [999, 250])
def test_unet_matches_reference(models: ModelNetworks, dtype: mx.Dtype, activations: mx.Dtype, golden: dict,
                                timestep: int) -> None:
    eps = models.unet(
        nhwc(golden["unet_sample"]).astype(activations),
        mx.array(timestep),
        golden["text_last_hidden_state"].astype(activations),
    )
    assert relative_error(nchw(eps), golden[f"unet_eps_t{timestep}"]) <= TOLERANCES[dtype]


def test_vae_decode_matches_reference(models: ModelNetworks, dtype: mx.Dtype, activations: mx.Dtype,
                                      golden: dict) -> None:
    images = models.vae.decode(nhwc(golden["vae_decode_z"]).astype(activations))
    assert relative_error(nchw(images), golden["vae_decode_out"]) <= TOLERANCES[dtype]


def test_vae_encode_matches_reference(models: ModelNetworks, dtype: mx.Dtype, activations: mx.Dtype,
                                      golden: dict) -> None:
    mean, logvar = models.vae.encode(nhwc(golden["vae_encode_image"]).astype(activations))
    assert relative_error(nchw(mean), golden["vae_encode_mean"]) <= TOLERANCES[dtype]
    assert relative_error(nchw(logvar), golden["vae_encode_logvar"]) <= TOLERANCES[dtype]


# --- variants of the checkpoint files, fp32 -----------------------------------------------------


def rewrite(source: Path, destination: Path, rename=lambda key: key) -> Path:
    """Copy a safetensors file with keys renamed; a key renamed to None is dropped."""
    arrays = mx.load(str(source))
    renamed = {rename(k): v for k, v in arrays.items()}
    renamed.pop(None, None)
    destination.parent.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(destination), renamed)
    return destination


def decode(models: ModelNetworks, golden: dict) -> mx.array:
    return nchw(models.vae.decode(nhwc(golden["vae_decode_z"])))


def test_model_dir_vae_file_in_original_naming_overrides_the_checkpoint_vae(
    tmp_path: Path, golden: dict, tiny_configs: NetworkConfigs, sd1_single_file: Path
) -> None:
    rewrite(sd1_single_file, tmp_path / "stable-diffusion" / "model.safetensors")
    rewrite(ORIGINAL_VAE, tmp_path / "vae" / "model.safetensors")
    models = load_networks(tmp_path, dtype=mx.float32, configs=tiny_configs)
    assert relative_error(decode(models, golden), golden["vae_original_decode_out"]) <= FP32_REL_TOL


def test_vae_file_in_diffusers_naming_replaces_a_checkpoint_without_vae(
    tmp_path: Path, golden: dict, tiny_configs: NetworkConfigs, sd1_single_file: Path
) -> None:
    without_vae = rewrite(
        sd1_single_file, tmp_path / "no_vae.safetensors", lambda k: None if k.startswith("first_stage_model.") else k
    )
    models = load_networks(without_vae, dtype=mx.float32, vae_path=DIFFUSERS_VAE, configs=tiny_configs)
    assert relative_error(decode(models, golden), golden["vae_decode_out"]) <= FP32_REL_TOL


def test_diffusers_folder_with_original_vae_override(golden: dict) -> None:
    models = load_networks(DIFFUSERS, dtype=mx.float32, vae_path=ORIGINAL_VAE)
    assert relative_error(decode(models, golden), golden["vae_original_decode_out"]) <= FP32_REL_TOL


def test_single_file_with_old_clip_key_naming(
    tmp_path: Path, golden: dict, tiny_configs: NetworkConfigs, sd1_single_file: Path
) -> None:
    old = "cond_stage_model.transformer."
    path = rewrite(sd1_single_file, tmp_path / "old_clip.safetensors", lambda k: k.replace(old + "text_model.", old))
    models = load_networks(path, dtype=mx.float32, configs=tiny_configs)
    hidden = models.text_encoder(golden["text_input_ids"])
    assert relative_error(hidden, golden["text_last_hidden_state"]) <= FP32_REL_TOL


def test_diffusers_vae_with_legacy_attention_names(tmp_path: Path, golden: dict) -> None:
    legacy = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}

    def to_legacy(key: str) -> str:
        for new, old in legacy.items():
            key = key.replace(f"mid_block.attentions.0.{new}", f"mid_block.attentions.0.{old}")
        return key

    vae_file = rewrite(DIFFUSERS_VAE, tmp_path / "vae.safetensors", to_legacy)
    models = load_networks(DIFFUSERS, dtype=mx.float32, vae_path=vae_file)
    assert relative_error(decode(models, golden), golden["vae_decode_out"]) <= FP32_REL_TOL


def test_bf16_source_loads(tmp_path: Path, golden: dict) -> None:
    """bf16 sources are cast on load; the weights differ from the fp16 originals by bf16 rounding."""
    folder = tmp_path / "bf16"
    for weights in DIFFUSERS.glob("*/*.safetensors"):
        arrays = mx.load(str(weights))
        target = folder / weights.parent.name / weights.name
        target.parent.mkdir(parents=True)
        mx.save_safetensors(str(target), {k: v.astype(mx.bfloat16) for k, v in arrays.items()})
        shutil.copy(weights.parent / "config.json", target.parent)
    models = load_networks(folder, dtype=mx.float32)
    hidden = models.text_encoder(golden["text_input_ids"])
    # bf16 keeps 8 bits of mantissa (unit roundoff 3.9e-3); the error budget is the fp16 one.
    assert relative_error(hidden, golden["text_last_hidden_state"]) <= FP16_REL_TOL
