"""Checkpoint loading: refusals, strictness and the converted-weights cache."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import convert.loader
from convert import ModelNetworks, NetworkConfigs, convert_checkpoint, load_networks
from mlx_sd.engine.errors import CheckpointError, ModelNotFound
from mlx_sd.models.unet import UNetConfig
from mlx_sd.models.vae import VAEConfig

FIXTURES = Path(__file__).parents[1] / "fixtures" / "sd1_tiny"
CONFIGS = NetworkConfigs.from_dict(json.loads((FIXTURES / "golden.json").read_text())["configs"])


def same_weights(a: ModelNetworks, b: ModelNetworks) -> bool:
    for network in ("text_encoder", "unet", "vae"):
        pa = dict(tree_flatten(getattr(a, network).parameters()))
        pb = dict(tree_flatten(getattr(b, network).parameters()))
        if pa.keys() != pb.keys() or any(pa[k].dtype != pb[k].dtype or not mx.array_equal(pa[k], pb[k]) for k in pa):
            return False
    return True


def forbid_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(convert.loader, "assemble", fail)


def edit_checkpoint(path: Path, edit) -> None:
    """Rewrite a checkpoint in place with `edit(arrays)` applied."""
    arrays = mx.load(str(path))
    mx.eval(arrays)  # read everything before the file is truncated by the rewrite
    edit(arrays)
    mx.save_safetensors(str(path), arrays)


@pytest.fixture
def source(tmp_path: Path, sd1_single_file: Path) -> Path:
    """A private copy of the single-file checkpoint, free to modify."""
    path = tmp_path / "src" / "model.safetensors"
    path.parent.mkdir()
    shutil.copy(sd1_single_file, path)
    return path


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_suffixes_are_refused_without_reading(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"never read")
    with pytest.raises(CheckpointError, match="pickle"):
        load_networks(path)


@pytest.mark.parametrize(
    "content", [pickle.dumps({"state_dict": {}}, protocol=2), b"PK\x03\x04" + b"\0" * 64], ids=["pickle", "torch-zip"]
)
def test_pickle_named_safetensors_is_refused_by_magic_bytes(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="pickle"):
        load_networks(path)


def test_model_dir_with_only_a_ckpt_is_refused(tmp_path: Path) -> None:
    (tmp_path / "sd15.ckpt").write_bytes(b"never read")
    with pytest.raises(CheckpointError, match="pickle"):
        load_networks(tmp_path)


def test_diffusers_folder_with_bin_weights_is_refused(tmp_path: Path) -> None:
    for sub in ("unet", "vae", "text_encoder"):
        (tmp_path / sub).mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"never read")
    with pytest.raises(CheckpointError, match="pickle"):
        load_networks(tmp_path)


def test_garbage_file_is_not_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_networks(path)


def test_missing_model_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound):
        load_networks(tmp_path / "absent.safetensors")


# --- strictness ---------------------------------------------------------------------------------


def test_incomplete_checkpoint_lists_missing_and_unexpected_keys(source: Path) -> None:
    def damage(arrays: dict) -> None:
        for key in sorted(k for k in arrays if k.startswith("model.diffusion_model.output_blocks.5."))[:15]:
            del arrays[key]
        arrays["model.diffusion_model.extra_head.weight"] = mx.zeros((2, 2))
        arrays["conditioner.embedders.0.weight"] = mx.zeros((2,))

    edit_checkpoint(source, damage)

    with pytest.raises(CheckpointError) as error:
        load_networks(source, configs=CONFIGS)
    message = str(error.value)
    assert "unet: 15 missing: up_blocks.1.resnets.2." in message
    assert "(5 more)" in message  # abridged after 10 names
    assert "1 unexpected: model.diffusion_model.extra_head.weight" in message
    assert "(no network): 1 unexpected: conditioner.embedders.0.weight" in message
    assert "text_encoder" not in message and "vae:" not in message  # the complete networks are not blamed


def test_wrong_shape_is_reported(source: Path) -> None:
    edit_checkpoint(source, lambda a: a.update({"model.diffusion_model.time_embed.0.weight": mx.zeros((3, 3))}))
    with pytest.raises(CheckpointError, match=r"1 with a wrong shape: model\.diffusion_model\.time_embed\.0\.weight"):
        load_networks(source, configs=CONFIGS)


def test_config_override_that_does_not_fit_the_weights_is_reported(source: Path) -> None:
    with pytest.raises(CheckpointError, match=r"unet: .*with a wrong shape: model\.diffusion_model\."):
        load_networks(source, configs=NetworkConfigs(unet=UNetConfig()))  # SD-1.5 widths against the tiny weights


def test_single_file_configs_are_inferred_from_shapes(source: Path) -> None:
    """Everything shapes tell matches the reference configs; head counts follow SD-1 conventions."""
    models = load_networks(source, dtype=mx.float32)
    assert models.unet.config == replace(CONFIGS.unet, sample_size=UNetConfig().sample_size)  # 8 heads, as SD-1
    assert models.vae.config == replace(CONFIGS.vae, sample_size=VAEConfig().sample_size)
    assert models.text_encoder.config == replace(CONFIGS.text_encoder, num_attention_heads=1)  # 32 wide / 64


# --- converted-weights cache --------------------------------------------------------------------


def test_cache_round_trip_equals_direct_load(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    direct = load_networks(source, dtype=mx.float32, configs=CONFIGS)
    first = load_networks(source, dtype=mx.float32, configs=CONFIGS, cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 1
    forbid_conversion(monkeypatch)
    cached = load_networks(source, dtype=mx.float32, configs=CONFIGS, cache_dir=cache)
    assert same_weights(direct, first) and same_weights(direct, cached)
    assert cached.configs == direct.configs


def test_loads_on_any_thread_give_the_same_weights(source: Path) -> None:
    """The conversion streams are per thread (MLX's streams belong to the thread that made them):
    a load on a fresh worker thread after one on this thread still works, with equal weights."""
    here = load_networks(source, dtype=mx.float16, configs=CONFIGS)
    with ThreadPoolExecutor(1) as worker:
        there = worker.submit(load_networks, source, dtype=mx.float16, configs=CONFIGS).result()
    assert same_weights(here, there)


def test_cache_is_invalidated_when_the_source_is_touched(source: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    load_networks(source, configs=CONFIGS, cache_dir=cache)
    entry = next(cache.glob("*.safetensors"))
    written = entry.stat().st_mtime_ns
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_networks(source, configs=CONFIGS, cache_dir=cache)
    assert entry.stat().st_mtime_ns != written  # rewritten in place, no second entry
    assert len(list(cache.glob("*.safetensors"))) == 1


def test_cache_is_invalidated_by_new_weights_of_the_same_layout_and_mtime(source: Path, tmp_path: Path) -> None:
    """A different fine-tune copied over with its mtime preserved: same header and size, new data."""
    cache = tmp_path / "cache"
    edit_checkpoint(source, lambda arrays: None)  # same writer before and after, so the same header bytes
    load_networks(source, dtype=mx.float32, configs=CONFIGS, cache_dir=cache)
    stat = source.stat()
    bias = mx.load(str(source))["model.diffusion_model.input_blocks.0.0.bias"].astype(mx.float32)
    mx.eval(bias)  # before the file changes under the lazy load

    def negate(arrays: dict) -> None:
        arrays.update({k: -v for k, v in arrays.items() if mx.issubdtype(v.dtype, mx.floating)})

    edit_checkpoint(source, negate)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source.stat().st_size == stat.st_size
    reloaded = load_networks(source, dtype=mx.float32, configs=CONFIGS, cache_dir=cache)
    assert mx.array_equal(reloaded.unet.conv_in.bias, -bias)


def test_failed_cache_write_leaves_no_entry(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"

    def crash(path, arrays, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(mx, "save_safetensors", crash)
    models = load_networks(source, configs=CONFIGS, cache_dir=cache)  # loading still succeeds
    assert models.unet is not None
    assert list(cache.iterdir()) == []


def test_convert_command_to_file_in_fp16(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    destination = convert_checkpoint(source, tmp_path / "sd15-mlx.safetensors", "float16", configs=CONFIGS)
    direct = load_networks(source, dtype=mx.float16, configs=CONFIGS)
    forbid_conversion(monkeypatch)
    assert same_weights(load_networks(destination, dtype=mx.float16), direct)


def test_convert_into_a_cache_dir_is_found_by_the_loader(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    convert_checkpoint(source, cache, "float32", configs=CONFIGS)
    forbid_conversion(monkeypatch)
    load_networks(source, dtype=mx.float32, configs=CONFIGS, cache_dir=cache)


def test_loaded_weights_equal_the_checkpoint_values(source: Path) -> None:
    models = load_networks(source, dtype=mx.float32, configs=CONFIGS)
    stored = mx.load(str(source))["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]  # OIHW
    ours = np.array(models.unet.down_blocks[0].resnets[0].conv1.weight)
    assert np.array_equal(ours, np.array(stored.astype(mx.float32)).transpose(0, 2, 3, 1))
