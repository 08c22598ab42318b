"""`mlx-sd bench` on the tiny SD-1 model: the Markdown block and its fields, SD 1.5's attention table,
the random-weight fallback, and the command's options."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from convert.assemble import NetworkConfigs
from mlx_sd.app.cli import app
from mlx_sd.engine import bench
from mlx_sd.engine.backends import Backend
from mlx_sd.engine.model_store import ModelStore
from mlx_sd.models.clip import CLIPAttention
from mlx_sd.models.layers import Attention
from tests.conftest import install_tiny_model

SETUP = {"machine", "device", "MLX", "mlx-sd", "backend", "model", "dtype", "timing"}
MEASUREMENTS = ["size", "measurement", "attention heads", "mx.compile", "seconds", "peak memory", "note"]
ATTENTION = ["network", "calls", "batch × heads", "queries × keys", "head size", "fused", "padded: fused"]


def tables(markdown: str) -> list[list[dict[str, str]]]:
    """Each Markdown table of `markdown` as its rows keyed by the header's cells."""
    found, lines = [], markdown.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|(---\|)+", lines[i + 1]):
            header = [cell.strip() for cell in line.strip("|").split("|")]
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = [cell.strip() for cell in row.strip("|").split("|")]
                assert len(cells) == len(header), row
                rows.append(dict(zip(header, cells)))
            found.append(rows)
    return found


@pytest.fixture(scope="module")
def block(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> str:
    models = install_tiny_model(tmp_path_factory.mktemp("models"))
    return bench.bench(models, sizes=(64,), steps=2, repeats=1, backend=backend)


def test_the_block_holds_every_field(block: str, backend: Backend) -> None:
    assert block.startswith(bench.TITLE + "\n")
    setup, measured, attention = tables(block)
    values = {row["setting"]: row["value"] for row in setup}
    assert set(values) == SETUP
    assert values["backend"] == backend.value and values["dtype"].startswith("float32")
    assert "stable-diffusion" in values["model"] and "random" not in values["model"]
    assert list(measured[0]) == MEASUREMENTS and list(attention[0]) == ATTENTION
    forms = [(r["measurement"].split(",")[0].split(":")[0], r["attention heads"], r["mx.compile"]) for r in measured]
    each_way = {heads: [("UNet step", heads, "no"), ("UNet step", heads, "yes"), ("image", heads, "no")]
                for heads in ("as they are", "padded")}
    if backend is Backend.MLX:
        assert forms == each_way["as they are"] + each_way["padded"]
    else:  # compiled and padded: one n/a row each
        assert forms == each_way["as they are"] + [("UNet step", "padded", "no")]
    for row in measured:
        assert row["size"] == "64²"
        if row["note"].startswith("n/a"):
            assert backend is Backend.CPU and row["seconds"] == row["peak memory"] == "-"
        else:
            assert float(row["seconds"]) > 0 and re.fullmatch(r"\d+\.\d\d GiB", row["peak memory"]), row
    if backend is Backend.MLX:
        assert all(row["note"] == "" for row in measured)


def test_the_attention_table_counts_every_attention_call(block: str, tmp_path: Path) -> None:
    attention = tables(block)[2]
    models = ModelStore(install_tiny_model(tmp_path), backend=Backend.MLX).get().models
    modules = {"text encoder": (models.text_encoder, CLIPAttention), "UNet": (models.unet, Attention),
               "VAE decoder": (models.vae.decoder, Attention)}
    for network, (model, kind) in modules.items():
        calls = sum(int(row["calls"]) for row in attention if row["network"] == network)
        # The UNet's transformers attend twice each (self and cross), once per call here.
        assert calls == sum(isinstance(m, kind) for m in model.modules()), network


def test_sd15_attention_at_512() -> None:
    calls = bench.attention_calls(bench.SD15, 512)
    rows = [bench._attention_row(network, call, count) for network, counted in calls.items()
            for call, count in counted.items()]
    table = tables("| " + " | ".join(ATTENTION) + " |\n|" + "---|" * len(ATTENTION) + "\n" + "\n".join(rows))[0]
    by_shape = {(r["network"], r["queries × keys"], r["head size"]): r for r in table}
    assert by_shape["UNet", "4096 × 4096", "40"]["fused"].startswith("no: head size 40")
    assert by_shape["UNet", "4096 × 4096", "40"]["padded: fused"] == "yes, 40 → 64"
    assert by_shape["UNet", "4096 × 77", "40"]["calls"] == "5"  # 2 down, 3 up transformers
    assert by_shape["UNet", "1024 × 1024", "80"]["fused"] == "yes"
    assert by_shape["UNet", "256 × 256", "160"]["fused"].startswith("no: head size 160")
    assert by_shape["UNet", "64 × 64", "160"]["padded: fused"] == "(not padded)"  # the middle block
    assert by_shape["VAE decoder", "4096 × 4096", "512"]["fused"].startswith("no")
    assert by_shape["text encoder", "77 × 77, causal", "64"]["fused"] == "yes"
    assert sum(int(r["calls"]) for r in table if r["network"] == "UNet") == 32


def test_without_a_model_a_random_sd15_is_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The tiny model's configs stand for SD 1.5's, which the CPU here would take minutes over.
    tiny = ModelStore(install_tiny_model(tmp_path / "tiny"), backend=Backend.MLX).get().models.configs
    monkeypatch.setattr(bench, "SD15", NetworkConfigs(tiny.text_encoder, tiny.unet, tiny.vae))
    block = bench.bench(tmp_path / "empty", sizes=(64,), steps=1, repeats=1, backend=Backend.MLX, dtype="float16")
    setup = {row["setting"]: row["value"] for row in tables(block)[0]}
    assert setup["model"].startswith("random-weight SD 1.5 built in memory") and setup["dtype"] == "float16"


runner = CliRunner()


def test_the_command_prints_the_block(tmp_path: Path) -> None:
    result = runner.invoke(app, ["bench", "--models-dir", install_tiny_model(tmp_path), "--sizes", "64",
                                 "--steps", "1", "--quick"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(bench.TITLE) and "median of 1" in result.stdout
    assert "64²: UNet step" in result.stderr  # progress goes to stderr, the block alone to stdout


@pytest.mark.parametrize(("args", "message"), [(["--sizes", "512,big"], "512,1024"),
                                                (["--sizes", "100"], "width"),
                                                (["--steps", "0"], "--steps")])
def test_bad_options_are_refused_before_loading(tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["bench", "--models-dir", tmp_path / "none", *args])
    assert result.exit_code == 2 and message in result.output
