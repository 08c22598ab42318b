"""`mlx-sd serve` with Draw Things gRPCServerCLI's spellings: the settings they give, and its other
options ignored with a note or refused naming why (run through typer's CliRunner, no server started)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from grpc_service import server as server_module
from grpc_service.auth import SHARED_SECRET_ENV
from mlx_sd.app import cli
from mlx_sd.app.cli import app
from mlx_sd.app.serve_compat import FOREIGN_OPTIONS, ForeignOptionError, drop_foreign_options

runner = CliRunner()


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """Runs serve with a stand-in server; collects the settings it was given and what it advertised."""
    seen: dict[str, Any] = {}

    def start(settings):
        seen["settings"] = settings
        return SimpleNamespace(address=f"{settings.host}:{settings.port}", port=settings.port, tls=None)

    def advertise(host, port, **options):
        seen["advertised"] = {"host": host, "port": port, **options}

    monkeypatch.setattr(server_module, "start_server", start)
    monkeypatch.setattr(server_module, "run_until_signalled", lambda running: None)
    monkeypatch.setattr(cli, "advertise", advertise)
    seen["config"] = tmp_path / "config.toml"
    return seen


def serve(served: dict[str, Any], *args: str):
    return runner.invoke(app, ["--config", str(served["config"]), "serve", *args], env={SHARED_SECRET_ENV: None})


def test_grpc_server_cli_spellings_give_the_same_settings(served: dict[str, Any], tmp_path: Path) -> None:
    result = serve(served, str(tmp_path / "models"), "-p", "7860", "-a", "127.0.0.1", "-n", "Studio",
                   "-s", "secret", "--no-tls", "--no-response-compression", "--model-browser")
    assert result.exit_code == 0, result.output
    settings = served["settings"]
    assert settings.models_dir == tmp_path / "models"
    assert (settings.port, settings.host, settings.tls, settings.shared_secret) == (7860, "127.0.0.1", False, "secret")
    assert settings.response_compression is False and settings.model_browser is True
    assert served["advertised"]["name"] == "Studio"


def test_long_spellings_and_defaults(served: dict[str, Any], tmp_path: Path) -> None:
    result = serve(served, str(tmp_path), "--address", "127.0.0.1", "--port", "7861", "--name", "x", "--no-tls")
    assert result.exit_code == 0, result.output
    assert (served["settings"].host, served["settings"].port, served["settings"].model_browser) == (
        "127.0.0.1", 7861, False)
    assert serve(served, str(tmp_path), "--no-tls").exit_code == 0
    assert served["advertised"]["name"] is None  # the host name
    assert serve(served, str(tmp_path), "--no-tls", "--name", "-g1").exit_code == 0  # a value, not -g 1
    assert served["advertised"]["name"] == "-g1"


def test_options_that_only_tune_speed_are_ignored_with_a_note(served: dict[str, Any], tmp_path: Path) -> None:
    result = serve(served, str(tmp_path), "--no-tls", "-g", "0", "--gpu=0", "-g0", "--no-flash-attention",
                   "-w", "4", "--debug", "--cpu-offload", "--fread-preferred", "--cancellation-warning-timeout", "30")
    assert result.exit_code == 0, result.output
    for name in ("-g 0", "--gpu 0", "--no-flash-attention", "-w 4", "--debug", "--cpu-offload", "--fread-preferred",
                 "--cancellation-warning-timeout 30"):
        assert f"note: {name} (a gRPCServerCLI option) is ignored" in result.stderr
    assert served["settings"].port == 7859


@pytest.mark.parametrize(("args", "reason"), [
    (["-g", "1"], "one GPU"),
    (["--echo-on-queue"], "Echo is answered at once"),
    (["--join", '{"host": "proxy", "port": 7859, "servers": []}'], "proxy"),
    (["-d", "key"], "Datadog"),
    (["--supervised"], "mlx-sd service install"),
    (["--blob-store-bucket", "models"], "blob store"),
    (["--cache-uri", "/tmp/x"], "--cache-dir"),
])
def test_options_this_server_cannot_honour_are_refused(served: dict[str, Any], tmp_path: Path, args: list[str],
                                                       reason: str) -> None:
    result = serve(served, str(tmp_path), "--no-tls", *args)
    assert result.exit_code == 2 and "settings" not in served
    message = re.sub(r"[\s│]+", " ", result.stderr)
    assert f"{' '.join(args[:1])}" in message and "is not supported" in message and reason in message


def test_every_foreign_option_is_spelt_as_grpc_server_cli_spells_it() -> None:
    names = [name for option in FOREIGN_OPTIONS for name in option.names]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"-[a-z]|--[a-z0-9]+(-[a-z0-9]+)*", name) for name in names)


def test_option_values_and_positional_arguments_pass_through() -> None:
    kept, notes = drop_foreign_options(["models", "--name", "-gpu-box", "--debug", "--", "--join"], {"--name"})
    assert kept == ["models", "--name", "-gpu-box", "--", "--join"] and len(notes) == 1
    with pytest.raises(ForeignOptionError, match="needs a value"):
        drop_foreign_options(["--weights-cache"])
    with pytest.raises(ForeignOptionError, match="takes no value"):
        drop_foreign_options(["--debug=yes"])


def test_the_config_file_holds_the_new_settings(served: dict[str, Any], tmp_path: Path) -> None:
    served["config"].write_text('[serve]\nname = "Studio"\nmodel-browser = true\nno-tls = true\n')
    result = serve(served, str(tmp_path))
    assert result.exit_code == 0, result.output
    assert served["settings"].model_browser is True and served["advertised"]["name"] == "Studio"
