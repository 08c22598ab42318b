"""Files' SHA-256 (FilesExist's hashes) and the short model hash in each image's parameters, remembered per file."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from convert.cache import file_fingerprint
from mlx_sd.engine import model_hash
from mlx_sd.engine.model_hash import HASHES_FILE, file_sha256, short_model_hash
from mlx_sd.engine.model_store import ModelStore
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
    (cache / HASHES_FILE).write_text(DAMAGED_RECORDS[damage](file_fingerprint(path)))
    assert short_model_hash(path, cache) == reference(path)
    record = json.loads((cache / HASHES_FILE).read_text())[str(path.resolve())]
    assert record["sha256"][:10] == reference(path)


def test_an_unwritable_cache_folder_only_costs_the_hashing(tmp_path: Path, caplog) -> None:
    path = checkpoint(tmp_path / "model.safetensors", 1.0)
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache folder should be")
    assert short_model_hash(path, not_a_folder) == reference(path)
    assert "could not remember the SHA-256" in caplog.text


def test_the_loaded_model_carries_its_checkpoint_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(TINY_MODEL, tmp_path / "models" / "stable-diffusion")
    unet = tmp_path / "models" / "stable-diffusion" / "unet" / "diffusion_pytorch_model.safetensors"
    assert ModelStore(tmp_path / "models", cache_dir=tmp_path / "cache").get().hash == reference(unet)
    assert (tmp_path / "cache" / HASHES_FILE).is_file()
    refuse_hashing(monkeypatch)  # a later start reads it from the cache folder
    assert ModelStore(tmp_path / "models", cache_dir=tmp_path / "cache").get().hash == reference(unet)


def any_file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def test_any_file_has_its_full_digest(tmp_path: Path) -> None:
    content = b"SQLite format 3\x00" + bytes(range(256)) * 1000  # not safetensors: hashed all the same
    path = any_file(tmp_path / "model.ckpt", content)
    assert file_sha256(path, None) == hashlib.sha256(content).digest()
    assert file_sha256(path, tmp_path / "cache") == hashlib.sha256(content).digest()
    assert len(file_sha256(path, tmp_path / "cache")) == 32


def test_an_unchanged_file_s_digest_is_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, cache = any_file(tmp_path / "lora.safetensors", b"first" * 1000), tmp_path / "cache"
    expected = file_sha256(path, cache)
    refuse_hashing(monkeypatch)
    assert file_sha256(path, cache) == expected == hashlib.sha256(path.read_bytes()).digest()


def test_a_changed_file_s_digest_is_computed_again(tmp_path: Path) -> None:
    path, cache = any_file(tmp_path / "lora.safetensors", b"first" * 1000), tmp_path / "cache"
    first = file_sha256(path, cache)
    any_file(path, b"other" * 1000)  # same size, other content
    assert file_sha256(path, cache) == hashlib.sha256(b"other" * 1000).digest() != first


def test_records_of_removed_files_are_dropped(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    gone, kept = any_file(tmp_path / "gone.bin", b"a"), any_file(tmp_path / "kept.bin", b"b")
    file_sha256(gone, cache)
    gone.unlink()
    file_sha256(kept, cache)
    assert list(json.loads((cache / HASHES_FILE).read_text())) == [str(kept.resolve())]
