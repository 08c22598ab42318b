"""Models named by a request: switching (one model held at a time), names, and the formats refused."""

from __future__ import annotations

import gc
import hashlib
import os
import shutil
import sqlite3
import weakref
from pathlib import Path

import grpc
import numpy as np
import pytest

from grpc_service.status import status_for
from mlx_sd.engine import model_store
from mlx_sd.engine.errors import CheckpointError, InvalidRequest, ModelNotFound, UnsupportedModelFormat
from mlx_sd.engine.model_store import ModelStore
from mlx_sd.engine.pipeline import Pipeline
from mlx_sd.engine.request import GenerationRequest

FIXTURES = Path(__file__).parents[1] / "fixtures"
TINY_DIFFUSERS = FIXTURES / "sd1_tiny" / "diffusers"


@pytest.fixture
def models(tmp_path: Path, sd1_single_file: Path) -> Path:
    """A model directory with the tiny model three ways: the default diffusers folder, a single file
    at the top, and a single file in a sub-folder."""
    root = tmp_path / "models"
    shutil.copytree(TINY_DIFFUSERS, root / "stable-diffusion")
    shutil.copy(sd1_single_file, root / "my_model.safetensors")
    (root / "sub").mkdir()
    shutil.copy(sd1_single_file, root / "sub" / "other.safetensors")
    return root


class CountingLoads:
    """Wraps `load_networks` as the store calls it: counts loads, and records for each whether the model
    held before it was already freed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sources: list[Path] = []
        self.previous_alive: list[bool] = []
        self.previous: weakref.ref | None = None
        real = model_store.load_networks

        def load(source, **kwargs):
            gc.collect()
            self.previous_alive.append(self.previous is not None and self.previous() is not None)
            self.sources.append(Path(source))
            models = real(source, **kwargs)
            self.previous = weakref.ref(models)
            return models

        monkeypatch.setattr(model_store, "load_networks", load)


def request(**fields) -> GenerationRequest:
    base = dict(prompt="a red house", width=64, height=64, steps=2, seed=7, sampler="Euler")
    return GenerationRequest(**{**base, **fields}).validated()


def test_a_named_single_file_is_loaded_and_named_by_its_stem(models: Path) -> None:
    loaded = ModelStore(models).get("my_model.safetensors")
    assert loaded.name == "my_model"
    assert loaded.hash == hashlib.sha256((models / "my_model.safetensors").read_bytes()).hexdigest()[:10]
    assert ModelStore(models).get("sub/other.safetensors").name == "other"


def test_a_named_diffusers_folder_is_the_default_model(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads = CountingLoads(monkeypatch)
    store = ModelStore(models)
    assert store.get("").name == "stable-diffusion"
    assert store.get("stable-diffusion").name == "stable-diffusion"
    assert len(loads.sources) == 1  # the same model, however it is named: not loaded again


def test_switching_frees_the_previous_model_before_loading_the_next(models: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    loads = CountingLoads(monkeypatch)
    store = ModelStore(models)
    for name in ("my_model.safetensors", "my_model.safetensors", "", "sub/other.safetensors", ""):
        store.get(name)
    assert [p.name for p in loads.sources] == ["my_model.safetensors", "stable-diffusion", "other.safetensors",
                                               "stable-diffusion"]
    assert loads.previous_alive == [False] * 4


def test_a_named_model_is_reloaded_when_its_file_changes(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads = CountingLoads(monkeypatch)
    store = ModelStore(models)
    store.get("my_model.safetensors")
    path = models / "my_model.safetensors"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    store.get("my_model.safetensors")
    assert len(loads.sources) == 2


def test_the_vae_override_applies_to_named_models(models: Path) -> None:
    store = ModelStore(models)
    own = np.array(store.get("my_model.safetensors").models.vae.decoder.conv_out.weight)
    (models / "vae").mkdir()
    shutil.copy(FIXTURES / "sd1_tiny" / "vae_original" / "model.safetensors", models / "vae" / "model.safetensors")
    replaced = np.array(store.get("my_model.safetensors").models.vae.decoder.conv_out.weight)
    assert not np.array_equal(own, replaced)


def test_a_missing_model_is_not_found_by_its_name(models: Path) -> None:
    with pytest.raises(ModelNotFound, match="absent.safetensors") as caught:
        ModelStore(models).get("absent.safetensors")
    assert status_for(caught.value) == (grpc.StatusCode.NOT_FOUND, str(caught.value))
    assert str(models) not in str(caught.value)  # the server's paths are not revealed


def test_a_draw_things_database_is_refused_saying_what_to_use(models: Path) -> None:
    database = sqlite3.connect(models / "sd_v1.5_f16.ckpt")
    database.execute("CREATE TABLE tensors (name TEXT, type INTEGER, format INTEGER, datatype INTEGER, "
                     "dim BLOB, data BLOB)")
    database.commit()
    database.close()
    store = ModelStore(models)
    held = store.get("")
    with pytest.raises(UnsupportedModelFormat, match=r"sd_v1\.5_f16\.ckpt.*not read.*\.safetensors") as caught:
        store.get("sd_v1.5_f16.ckpt")
    code, details = status_for(caught.value)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "Draw Things" in details
    assert store.get("") is held  # the refusal did not cost the loaded model


def test_a_pickle_checkpoint_stays_refused(models: Path) -> None:
    (models / "model.ckpt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match="pickle") as caught:
        ModelStore(models).get("model.ckpt")
    assert not isinstance(caught.value, UnsupportedModelFormat)


@pytest.mark.parametrize("name", ["../models/my_model.safetensors", "/etc/passwd", "./my_model.safetensors"])
def test_names_outside_the_rules_are_invalid_requests(models: Path, name: str) -> None:
    with pytest.raises(InvalidRequest, match="model"):
        GenerationRequest(model=name).validated()
    with pytest.raises(InvalidRequest, match="model"):
        ModelStore(models).get(name)


def test_a_symlink_leading_outside_the_directory_is_refused(models: Path, tmp_path: Path,
                                                            sd1_single_file: Path) -> None:
    (models / "outside.safetensors").symlink_to(sd1_single_file)
    with pytest.raises(InvalidRequest, match="outside the model directory"):
        ModelStore(models).get("outside.safetensors")


def test_the_pipeline_generates_with_the_model_the_request_names(models: Path, tmp_path: Path,
                                                                 sd1_single_file: Path) -> None:
    alone = tmp_path / "alone"
    (alone / "stable-diffusion").mkdir(parents=True)
    shutil.copy(sd1_single_file, alone / "stable-diffusion" / "model.safetensors")
    pipeline = Pipeline(ModelStore(models))
    by_name = list(pipeline(request(model="my_model.safetensors")))[-1].images[0]
    as_default = list(Pipeline(ModelStore(alone))(request()))[-1].images[0]
    by_default = list(pipeline(request()))[-1].images[0]  # the diffusers folder: another model
    assert np.array_equal(by_name.pixels, as_default.pixels)
    assert not np.array_equal(by_name.pixels, by_default.pixels)
    assert (by_name.parameters.model_name, by_default.parameters.model_name) == ("my_model", "stable-diffusion")
    with pytest.raises(ModelNotFound, match="absent.safetensors"):
        next(pipeline(request(model="absent.safetensors")))


def test_one_cache_entry_serves_a_model_however_it_is_named(models: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from convert import loader

    default = tmp_path / "default"
    (default / "stable-diffusion").mkdir(parents=True)
    shutil.copy(models / "my_model.safetensors", default / "stable-diffusion" / "model.safetensors")
    cache = tmp_path / "cache"
    cache.mkdir()
    loader.convert_checkpoint(default, cache)  # as `mlx-sd convert MODELS CACHE` does

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of read from the cache")

    monkeypatch.setattr(loader, "assemble", no_conversion)
    for name in ("", "stable-diffusion/model.safetensors"):
        assert ModelStore(default, cache_dir=cache).get(name).name == "model"
    assert len(list(cache.glob("sd1-*.safetensors"))) == 1
