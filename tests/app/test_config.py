"""The config file: parsing and checks, precedence (flag > environment > file > default), `config show|path`, serve."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from grpc_service.auth import SHARED_SECRET_ENV
from mlx_sd.app.cli import app
from mlx_sd.app.config import MASK, ConfigError, read_serve_section

runner = CliRunner()
SECRET = "file-secret-value"


def run(*args: object, env: dict[str, str | None] | None = None):
    return runner.invoke(app, [str(a) for a in args], env={SHARED_SECRET_ENV: None, **(env or {})})


def serve_command():
    return typer.main.get_command(app).commands["serve"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def show(config: Path, *args: object, env: dict[str, str | None] | None = None) -> dict[str, tuple[str, str]]:
    """`config show` as {setting: (value, source)}."""
    result = run("--config", config, "config", "show", *args, env=env)
    assert result.exit_code == 0, result.output
    rows = [re.split(r"\s{2,}", line.strip()) for line in result.stdout.splitlines()[1:]]
    return {key: (value, source) for key, value, source in rows}


def test_a_missing_file_means_no_settings(tmp_path: Path) -> None:
    assert read_serve_section(tmp_path / "none.toml", serve_command()) == {}


def test_values_by_parameter_with_paths_resolved(tmp_path: Path) -> None:
    config = write(
        tmp_path / "config.toml",
        '[serve]\nport = 7000\nno-tls = true\nmodels-dir = "models"\ncache-dir = "~/cache"\nlog-level = "debug"\n',
    )
    values = read_serve_section(config, serve_command())
    assert values == {
        "port": 7000,
        "no_tls": True,
        "models_dir": str(tmp_path / "models"),
        "cache_dir": str(Path.home() / "cache"),
        "log_level": "debug",
    }


@pytest.mark.parametrize(
    "text, message",
    [
        ("[serve]\nprot = 1\n", "unknown setting 'prot' in [serve]; known settings: cache-dir"),
        ("port = 1\n", "unknown table or key 'port'; the serve settings go under [serve]"),
        ("[serve]\nport = '7000'\n", "[serve] port must be an integer, not '7000'"),
        ("[serve]\nno-tls = 1\n", "[serve] no-tls must be true or false, not 1"),
        ("[serve]\nhost = 127\n", "[serve] host must be a string, not 127"),
        ("[serve]\nlog-level = 'loud'\n", "log-level must be one of 'debug', 'info', 'warning', not 'loud'"),
        ("[serve\n", "is not valid TOML"),
    ],
)
def test_mistakes_are_named(tmp_path: Path, text: str, message: str) -> None:
    config = write(tmp_path / "config.toml", text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_serve_section(config, serve_command())


def test_config_path_follows_the_user_config_folder_or_the_option(tmp_path: Path) -> None:
    result = run("config", "path", env={"XDG_CONFIG_HOME": str(tmp_path)})
    if sys.platform.startswith("linux"):
        assert result.stdout.strip() == str(tmp_path / "mlx-sd" / "config.toml")
    else:
        assert result.stdout.strip().endswith("config.toml")
    assert run("--config", tmp_path / "x.toml", "config", "path").stdout.strip() == str(tmp_path / "x.toml")


def test_show_says_where_each_setting_came_from(tmp_path: Path) -> None:
    config = write(tmp_path / "config.toml", '[serve]\nport = 7000\nhost = "127.0.0.1"\nmax-queue = 3\n')
    settings = show(config, "--port", "7100", env={SHARED_SECRET_ENV: "from-env"})
    assert settings["port"] == ("7100", "flag")
    assert settings["host"] == ("127.0.0.1", "config file")
    assert settings["max-queue"] == ("3", "config file")
    assert settings["shared-secret"] == (MASK, "environment")
    assert settings["no-tls"] == ("false", "default")
    assert settings["log-level"] == ("info", "default")
    assert settings["config-dir"][1] == "default" and settings["config-dir"][0] != "-"


def test_show_masks_a_secret_from_the_file(tmp_path: Path) -> None:
    config = write(tmp_path / "config.toml", f'[serve]\nshared-secret = "{SECRET}"\n')
    result = run("--config", config, "config", "show")
    assert SECRET not in result.output
    assert show(config)["shared-secret"] == (MASK, "config file")


def test_a_broken_file_stops_serve_with_its_name(tmp_path: Path) -> None:
    config = write(tmp_path / "config.toml", "[serve]\nport = 'x'\n")
    result = run("--config", config, "serve")
    assert result.exit_code == 1 and str(config) in result.stderr and "port must be an integer" in result.stderr


def test_an_out_of_range_value_names_the_file(tmp_path: Path) -> None:
    config = write(tmp_path / "config.toml", "[serve]\nport = 70000\n")
    result = run("--config", config, "serve")
    assert result.exit_code == 2
    assert "port in" in result.stderr and config.name in re.sub(r"[\s│]+", "", result.stderr)


def test_serve_runs_with_the_file_settings(tmp_path: Path) -> None:
    models = tmp_path / "models"
    config = write(
        tmp_path / "config.toml",
        f'[serve]\nhost = "127.0.0.1"\nport = 0\nno-tls = true\nno-bonjour = true\n'
        f'models-dir = "{models}"\nconfig-dir = "conf"\n',
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_sd.app.cli", "--config", str(config), "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != SHARED_SECRET_ENV},
    )
    try:
        first, second = process.stdout.readline(), process.stdout.readline()
        assert first.strip() == f"serving models from {models}"
        address = re.search(r"listening on (127\.0\.0\.1:\d+) \(plaintext\)", second).group(1)
        assert run("echo", "--server", address, "--no-tls").stdout.strip() == "HELLO"
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=15)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "advertised" not in err  # no-bonjour = true came from the file too


def test_head_padding_is_a_setting(tmp_path: Path) -> None:
    config = write(tmp_path / "config.toml", "[serve]\npad-attention-heads = true\n")
    assert show(config)["pad-attention-heads"] == ("true", "config file")
