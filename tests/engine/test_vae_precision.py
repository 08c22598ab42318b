"""SDXL's VAE in fp16: a VAE whose fp16 activations overflow decodes finite and right in fp32."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from convert import ModelNetworks
from convert.families import SDXL, Family
from mlx_sd.engine.model_store import ModelStore
from mlx_sd.engine.pipeline import _decode
from mlx_sd.engine.vae_precision import vae_dtype
from mlx_sd.models.vae import AutoencoderKL, VAEConfig

FIXTURES = Path(__file__).parents[1] / "fixtures"
CONFIG = VAEConfig(block_out_channels=(32, 32), layers_per_block=1, scaling_factor=0.13025)


def overflowing_vae(config: VAEConfig = CONFIG) -> AutoencoderKL:
    """A tiny VAE in fp16 whose decoder's residual stream reaches ~1e5 (fp16 ends at 65504), while
    its last GroupNorm brings the output back to the usual range: as SDXL's VAE does, larger."""
    mx.random.seed(0)
    vae = AutoencoderKL(config)
    vae.decoder.conv_in.weight = vae.decoder.conv_in.weight * 1e5
    vae.update(tree_map(lambda p: p.astype(mx.float16), vae.parameters()))
    return vae


@pytest.fixture(scope="module")
def latents() -> mx.array:
    return mx.random.normal((1, 8, 8, 4), key=mx.random.key(1))


def test_the_case_overflows_in_fp16(latents: mx.array) -> None:
    images = overflowing_vae().decode(latents.astype(mx.float16))
    assert not mx.isfinite(images).all()


def test_sdxl_vae_runs_in_fp32_and_decodes_as_fp32_weights_do(latents: mx.array) -> None:
    vae = overflowing_vae()
    dtype = vae_dtype(mx.float16, "sdxl", vae.config)
    assert dtype == mx.float32
    images = vae.decode(latents.astype(dtype))
    assert images.dtype == mx.float32 and mx.isfinite(images).all()
    # the same (fp16-valued) weights held in fp32: the upcast computes exactly this
    reference = overflowing_vae()
    reference.update(tree_map(lambda p: p.astype(mx.float32), reference.parameters()))
    want = reference.decode(latents)
    np.testing.assert_allclose(np.array(images), np.array(want), rtol=0, atol=1e-5)
    assert float(mx.abs(want).max()) > 0.1  # a real image, not a flat one


def test_the_fp16_fix_vae_and_other_families_keep_fp16() -> None:
    fixed = VAEConfig(force_upcast=False)  # madebyollin/sdxl-vae-fp16-fix's config.json
    assert vae_dtype(mx.float16, "sdxl", fixed) == mx.float16
    assert vae_dtype(mx.float16, "sdxl_refiner", VAEConfig()) == mx.float32
    assert vae_dtype(mx.float16, "sd1", VAEConfig()) == mx.float16  # diffusers' SD pipelines ignore the flag
    assert vae_dtype(mx.float32, "sdxl", VAEConfig()) == mx.float32  # the CPU: fp32 already
    assert vae_dtype(mx.bfloat16, "sdxl", VAEConfig()) == mx.bfloat16  # bf16 has fp32's range


def test_force_upcast_is_read_from_config_json() -> None:
    assert VAEConfig.from_dict({"force_upcast": False}).force_upcast is False
    assert VAEConfig.from_dict({}).force_upcast is True  # diffusers' default where a config lacks it


def loaded(vae: AutoencoderKL, family: Family) -> SimpleNamespace:
    """What the pipeline's decode reads of a loaded model (its VAE, family and activation dtype) on
    fp16, as on Metal; a LoadedModel itself needs a UNet (for its LoRA merger)."""
    return SimpleNamespace(models=ModelNetworks(None, None, vae, family=family), activation_dtype=mx.float16)


def test_the_pipelines_decode_of_an_sdxl_model_in_fp16_is_finite_and_right(latents: mx.array) -> None:
    vae = overflowing_vae()
    pixels = _decode(loaded(vae, SDXL), latents * vae.config.scaling_factor)
    reference = overflowing_vae()
    reference.update(tree_map(lambda p: p.astype(mx.float32), reference.parameters()))
    want = np.round(np.clip(np.array(reference.decode(latents)) / 2 + 0.5, 0, 1) * 255)
    assert np.abs(pixels.astype(np.float64) - want).max() <= 1


@pytest.mark.parametrize("force_upcast", [False, True])
def test_a_standalone_vaes_config_json_is_read(tmp_path: Path, force_upcast: bool) -> None:
    """The fp16-fix VAE is recognised by the config.json beside vae/model.safetensors."""
    source = FIXTURES / "sdxl_tiny" / "diffusers"
    models_dir = tmp_path / "models"
    shutil.copytree(source, models_dir / "stable-diffusion")
    (models_dir / "vae").mkdir()
    shutil.copy(source / "vae" / "diffusion_pytorch_model.safetensors", models_dir / "vae" / "model.safetensors")
    config = json.loads((source / "vae" / "config.json").read_text()) | {"force_upcast": force_upcast}
    (models_dir / "vae" / "config.json").write_text(json.dumps(config))
    vae = ModelStore(models_dir).get().models.vae
    assert vae.config.force_upcast is force_upcast


def test_the_converted_cache_is_remade_when_a_standalone_vaes_config_json_changes(tmp_path: Path) -> None:
    source = FIXTURES / "sdxl_tiny" / "diffusers"
    models_dir = tmp_path / "models"
    shutil.copytree(source, models_dir / "stable-diffusion")
    (models_dir / "vae").mkdir()
    shutil.copy(source / "vae" / "diffusion_pytorch_model.safetensors", models_dir / "vae" / "model.safetensors")
    config = json.loads((source / "vae" / "config.json").read_text())
    for force_upcast in (True, False):
        (models_dir / "vae" / "config.json").write_text(json.dumps(config | {"force_upcast": force_upcast}))
        vae = ModelStore(models_dir, cache_dir=tmp_path / "cache").get().models.vae
        assert vae.config.force_upcast is force_upcast
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1  # the same entry, remade
