"""Values loaded from files: reloaded when the files change, and a bad checkpoint refused from memory."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

import convert.formats
from mlx_sd.engine.errors import CheckpointError
from mlx_sd.engine.model_store import ModelStore
from mlx_sd.engine.reloading import ReloadingValue


def test_a_remembered_error_is_raised_again_until_the_files_change(tmp_path: Path) -> None:
    source, loads = tmp_path / "f", []
    source.write_text("bad")

    def load() -> str:
        loads.append(source.read_text())
        if source.read_text() == "bad":
            raise CheckpointError("bad file")
        return source.read_text()

    value = ReloadingValue(lambda: [source], load, remembered=(CheckpointError,))
    for _ in range(3):
        with pytest.raises(CheckpointError, match="bad file"):
            value.get()
    assert loads == ["bad"]
    source.write_text("good!")
    assert value.get() == "good!" and value.get() == "good!" and loads == ["bad", "good!"]


def test_other_errors_are_tried_again(tmp_path: Path) -> None:
    source, calls = tmp_path / "f", []
    source.write_text("x")

    def load() -> str:
        calls.append(1)
        raise OSError("flaky disk")

    value = ReloadingValue(lambda: [source], load, remembered=(CheckpointError,))
    for _ in range(2):
        with pytest.raises(OSError):
            value.get()
    assert len(calls) == 2


def test_the_store_parses_a_malformed_checkpoint_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = tmp_path / "stable-diffusion" / "model.safetensors"
    checkpoint.parent.mkdir()
    header = json.dumps({"w": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}}).encode()
    checkpoint.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    parsed = []
    tensor_info = convert.formats._tensor_info
    monkeypatch.setattr(convert.formats, "_tensor_info", lambda *a: parsed.append(1) or tensor_info(*a))
    store = ModelStore(tmp_path)
    for _ in range(3):
        with pytest.raises(CheckpointError, match="unknown dtype 'Q7'"):
            store.get()
    assert len(parsed) == 1
