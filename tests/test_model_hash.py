"""The short model hash in each image's parameters: the checkpoint's SHA-256, remembered per file."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from convert.cache import fingerprint
from mlx_sd import model_hash
from mlx_sd.model_hash import HASHES_FILE, short_model_hash
from mlx_sd.model_store import ModelStore
from tests.conftest import TINY_MODEL


def checkpoint(path: Path, fill: float) -> Path:
    save_file({"w": np.full((64, 64), fill, dtype=np.float32)}, str(path))
    return path


def reference(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def refuse_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(path: Path) -> str:
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(model_hash, "sha256_of", fail)


def test_without_a_cache_folder_the_file_is_hashed(tmp_path: Path) -> None:
    path = checkpoint(tmp_path / "model.safetensors", 1.0)
    assert short_model_hash(path, None) == reference(path)
    assert list(tmp_path.iterdir()) == [path]


def test_an_unchanged_file_is_not_hashed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, cache = checkpoint(tmp_path / "model.safetensors", 1.0), tmp_path / "cache"
    assert short_model_hash(path, cache) == reference(path)
    refuse_hashing(monkeypatch)
    assert short_model_hash(path, cache) == reference(path)


def test_a_changed_file_is_hashed_again(tmp_path: Path) -> None:
    path, cache = checkpoint(tmp_path / "model.safetensors", 1.0), tmp_path / "cache"
    first = short_model_hash(path, cache)
    checkpoint(path, 2.0)  # same size and header, other content
    assert short_model_hash(path, cache) == reference(path) != first


DAMAGED_RECORDS = {
    "not json": lambda identity: "{not json",
    "not a mapping": lambda identity: "[1, 2]",
    "digest not text": lambda identity: json.dumps({identity["path"]: identity | {"sha256": 5}}),
    "digest cut short": lambda identity: json.dumps({identity["path"]: identity | {"sha256": "abc"}}),
}


@pytest.mark.parametrize("damage", DAMAGED_RECORDS)
def test_a_damaged_record_is_replaced(tmp_path: Path, damage: str) -> None:
    path, cache = checkpoint(tmp_path / "model.safetensors", 1.0), tmp_path / "cache"
    cache.mkdir()
    (cache / HASHES_FILE).write_text(DAMAGED_RECORDS[damage](fingerprint(path)))
    assert short_model_hash(path, cache) == reference(path)
    record = json.loads((cache / HASHES_FILE).read_text())[str(path.resolve())]
    assert record["sha256"][:10] == reference(path)


def test_an_unwritable_cache_folder_only_costs_the_hashing(tmp_path: Path, caplog) -> None:
    path = checkpoint(tmp_path / "model.safetensors", 1.0)
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache folder should be")
    assert short_model_hash(path, not_a_folder) == reference(path)
    assert "could not remember the model hash" in caplog.text


def test_the_loaded_model_carries_its_checkpoint_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(TINY_MODEL, tmp_path / "models" / "stable-diffusion")
    unet = tmp_path / "models" / "stable-diffusion" / "unet" / "diffusion_pytorch_model.safetensors"
    assert ModelStore(tmp_path / "models", cache_dir=tmp_path / "cache").get().hash == reference(unet)
    assert (tmp_path / "cache" / HASHES_FILE).is_file()
    refuse_hashing(monkeypatch)  # a later start reads it from the cache folder
    assert ModelStore(tmp_path / "models", cache_dir=tmp_path / "cache").get().hash == reference(unet)
