"""Default folders: Draw Things' model folder is used where it exists and never created; an unreadable
models folder (macOS privacy protection of other apps' containers) stops serve at start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlx_sd.app import paths
from mlx_sd.app.cli import app

CONTAINER_MODELS = "Library/Containers/com.liuliu.draw-things/Data/Documents/Models"


@pytest.fixture
def home(monkeypatch, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return home


def test_without_draw_things_the_mac_default_is_our_own_folder(home: Path) -> None:
    assert paths.default_models_dir("darwin") == paths.own_models_dir()
    note = paths.default_models_dir_note("darwin")
    assert note is not None and "no Draw Things model folder" in note and str(paths.own_models_dir()) in note
    assert not (home / "Library").exists()  # nothing made in another app's container
    assert paths.default_models_dir_note("linux") is None


def test_draw_things_folder_is_shared_where_it_exists(home: Path) -> None:
    (home / CONTAINER_MODELS).mkdir(parents=True)
    assert paths.default_models_dir("darwin") == home / CONTAINER_MODELS
    assert paths.default_models_dir_note("darwin") is None
    assert paths.default_models_dir("linux") == paths.own_models_dir()


def deny(monkeypatch, denied: Path) -> None:
    """Makes reading `denied` fail as macOS privacy protection does (EPERM), even for root."""
    real_scandir, real_stat = os.scandir, Path.stat

    def scandir(path):
        if Path(path) == denied:
            raise PermissionError(1, "Operation not permitted", str(path))
        return real_scandir(path)

    def stat(self, **kwargs):
        if self == denied:
            raise PermissionError(1, "Operation not permitted", str(self))
        return real_stat(self, **kwargs)

    monkeypatch.setattr(paths.os, "scandir", scandir)
    monkeypatch.setattr(Path, "stat", stat)


def test_a_protected_container_is_kept_as_the_default_and_explained(home: Path, monkeypatch) -> None:
    models = home / CONTAINER_MODELS
    deny(monkeypatch, models)
    assert paths.default_models_dir("darwin") == models  # there, but hidden: not silently replaced
    problem, fix = paths.models_dir_access_problem(models)
    assert problem.startswith(f"cannot read {models}") and "would like to access data from other apps" in problem
    assert "Full Disk Access" in fix and "MODELS_DIR" in fix


def test_other_unreadable_folders_name_the_error(tmp_path: Path, monkeypatch) -> None:
    deny(monkeypatch, tmp_path)
    assert paths.models_dir_access_problem(tmp_path) == (
        f"cannot read {tmp_path}: Operation not permitted",
        "check the folder's permissions or choose another MODELS_DIR",
    )
    assert paths.models_dir_access_problem(tmp_path / "missing") is None  # serve creates it


def test_serve_fails_at_start_when_the_models_folder_cannot_be_read(home: Path, monkeypatch) -> None:
    models = home / CONTAINER_MODELS
    models.mkdir(parents=True)
    deny(monkeypatch, models)
    result = CliRunner().invoke(app, ["serve", str(models), "--port", "0", "--no-tls", "--no-bonjour"])
    assert result.exit_code == 1
    assert "Full Disk Access" in result.stderr and "listening" not in result.stdout
