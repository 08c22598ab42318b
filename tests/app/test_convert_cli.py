"""`mlx-sd convert`: a thin command over `convert.convert_checkpoint`."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from convert import load_networks
from mlx_sd.app.cli import app

DIFFUSERS = Path(__file__).parents[1] / "fixtures" / "sd1_tiny" / "diffusers"


def test_convert_writes_fp16_weights_that_load_like_the_source(tmp_path: Path) -> None:
    destination = tmp_path / "model.safetensors"
    result = CliRunner().invoke(app, ["convert", str(DIFFUSERS), str(destination), "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    converted = dict(tree_flatten(load_networks(destination, dtype=mx.float16).unet.parameters()))
    direct = dict(tree_flatten(load_networks(DIFFUSERS, dtype=mx.float16).unet.parameters()))
    assert converted.keys() == direct.keys()
    assert all(mx.array_equal(converted[k], direct[k]) for k in direct)


def test_convert_refuses_a_pickle_checkpoint_without_a_traceback(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"never read")
    result = CliRunner().invoke(app, ["convert", str(checkpoint), str(tmp_path / "out.safetensors")])
    assert result.exit_code == 1
    assert "pickle" in result.output and "Traceback" not in result.output


def test_convert_creates_a_destination_folder_named_without_a_suffix(tmp_path: Path) -> None:
    destination = tmp_path / "converted"
    result = CliRunner().invoke(app, ["convert", str(DIFFUSERS), str(destination)])
    assert result.exit_code == 0, result.output
    assert f"created the cache folder {destination}" in result.stdout
    written = [p for p in destination.rglob("*") if p.is_file()]
    assert written and f"wrote {written[0]}" in result.stdout


def test_convert_leaves_no_folder_behind_when_it_fails(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "missing"), str(tmp_path / "converted")])
    assert result.exit_code == 1 and not (tmp_path / "converted").exists()
    result = CliRunner().invoke(app, ["convert", str(DIFFUSERS), str(tmp_path / "model.ckpt")])
    assert result.exit_code == 1 and "or a .safetensors file" in result.stderr
