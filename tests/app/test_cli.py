"""The `mlx-sd` commands, run through typer's CliRunner (and `serve` as a real process)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from grpc_service.auth import SHARED_SECRET_ENV
from grpc_service.tls import GENERATED_CERT_NAME
from mlx_sd import __version__
from mlx_sd.app.cli import app
from mlx_sd.app.options import parse_size

runner = CliRunner()
SECRET = "s3cret"


def run(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env={SHARED_SECRET_ENV: None, **(env or {})})


def trust(server) -> list[str]:
    return ["--server", f"localhost:{server.port}", "--ca", str(server.tls.cert_path)]


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"mlx-sd {__version__}"


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.exit_code == 0
    assert all(name in result.stdout for name in ("serve", "echo", "files-exist", "upload"))


def test_serve_help_shows_the_defaults() -> None:
    text = re.sub(r"[\s│]+", " ", run("serve", "--help").stdout)
    assert "mlx-sd/Models" in text or "com.liuliu.draw-things" in text
    assert "7859" in text and "0.0.0.0" in text and SHARED_SECRET_ENV in text and "8GiB" in text


def test_echo(server) -> None:
    result = run("echo", *trust(server))
    assert result.exit_code == 0 and result.stdout.strip() == "HELLO"


def test_echo_with_a_pinned_fingerprint(server) -> None:
    result = run("echo", "--server", f"127.0.0.1:{server.port}", "--fingerprint", server.tls.fingerprint)
    assert result.exit_code == 0 and result.stdout.strip() == "HELLO"


def test_echo_with_a_wrong_fingerprint_fails_clearly(server) -> None:
    result = run("echo", "--server", f"127.0.0.1:{server.port}", "--fingerprint", "AB" * 32)
    assert result.exit_code == 1 and server.tls.fingerprint in result.stderr


def test_secret_from_the_environment_or_a_file(server_factory, tmp_path: Path) -> None:
    server = server_factory(shared_secret=SECRET)
    assert run("echo", *trust(server), env={SHARED_SECRET_ENV: SECRET}).stdout.strip() == "HELLO"
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    assert run("echo", *trust(server), "--shared-secret-file", secret_file).stdout.strip() == "HELLO"
    refused = run("echo", *trust(server), "--shared-secret", "wrong")
    assert refused.exit_code == 1 and "UNAUTHENTICATED" in refused.stderr


def test_at_most_one_trust_option(server) -> None:
    result = run("echo", *trust(server), "--no-tls")
    assert result.exit_code == 2 and "at most one" in result.stderr


def test_unreachable_server_fails_clearly(server) -> None:
    port = server.port
    server.stop(None)
    result = run("echo", "--server", f"localhost:{port}", "--ca", str(server.tls.cert_path))
    assert result.exit_code == 1 and "UNAVAILABLE" in result.stderr


def test_files_exist(server, models_dir: Path) -> None:
    (models_dir / "here.bin").write_bytes(b"x")
    result = run("files-exist", "here.bin", "gone.bin", "../etc", *trust(server))
    assert result.exit_code == 1  # like `test -e`: not all of them exist
    assert result.stdout.splitlines() == ["here.bin: exists", "gone.bin: missing", "../etc: refused (contains '..')"]
    assert run("files-exist", "here.bin", *trust(server)).exit_code == 0


def test_upload(server, models_dir: Path, tmp_path: Path) -> None:
    local = tmp_path / "lora.safetensors"
    local.write_bytes(os.urandom(100_000))
    result = run("upload", local, "loras/lora.safetensors", *trust(server))
    assert result.exit_code == 0, result.stderr
    assert (models_dir / "loras" / "lora.safetensors").read_bytes() == local.read_bytes()
    assert "100000 bytes" in result.stdout


def test_upload_names_the_file_after_the_local_one_by_default(server, models_dir: Path, tmp_path: Path) -> None:
    local = tmp_path / "vae.bin"
    local.write_bytes(b"v")
    assert run("upload", local, *trust(server)).exit_code == 0
    assert (models_dir / "vae.bin").read_bytes() == b"v"


def test_upload_refusal_is_reported(server, tmp_path: Path) -> None:
    local = tmp_path / "x.bin"
    local.write_bytes(b"x")
    result = run("upload", local, "../x.bin", *trust(server))
    assert result.exit_code == 1 and "INVALID_ARGUMENT" in result.stderr and "filename" in result.stderr


def test_serve_refuses_a_broken_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate")
    key.write_text("not a key")
    key.chmod(0o600)
    result = run("serve", tmp_path / "models", "--port", "0", "--tls-cert", cert, "--tls-key", key)
    assert result.exit_code == 1
    assert "TLS setup failed" in result.stderr and str(cert) in result.stderr


def test_serve_refuses_low_memory_without_the_cache(tmp_path: Path) -> None:
    result = run("serve", tmp_path / "models", "--port", "0", "--low-memory", "--no-cache")
    assert result.exit_code == 2 and "needs the cache" in result.stderr


@pytest.mark.parametrize(
    "text, size", [("8GiB", 8 * 1024**3), ("512M", 512 * 1024**2), ("1000", 1000), ("4 kib", 4096)]
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "1.5G", "12 parsecs", "-1"])
def test_parse_size_rejects_nonsense(text: str) -> None:
    with pytest.raises(typer.BadParameter):
        parse_size(text)


def test_serve_runs_until_sigterm(tmp_path: Path) -> None:
    models, config = tmp_path / "new" / "models", tmp_path / "config"
    command = [sys.executable, "-m", "mlx_sd.app.cli", "serve", str(models), "--host", "127.0.0.1", "--port", "0"]
    process = subprocess.Popen(
        [*command, "--config-dir", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, SHARED_SECRET_ENV: SECRET},
    )
    try:
        lines = [process.stdout.readline() for _ in range(4)]
        address = re.search(r"listening on (\S+) \(TLS\)", lines[1]).group(1)
        fingerprint = lines[3].split(": ", 1)[1].strip()
        assert models.is_dir() and (config / "tls" / GENERATED_CERT_NAME).is_file()
        echo = run("echo", "--server", address, "--fingerprint", fingerprint, env={SHARED_SECRET_ENV: SECRET})
        assert echo.stdout.strip() == "HELLO"
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=15)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert out.strip() == "stopped" and "SIGTERM" in err
    assert "imported before the BLAS was chosen" not in err


def test_importing_the_cli_loads_no_mlx() -> None:
    """The commands choose the BLAS before their heavy imports; MLX binds the BLAS it finds when it is
    imported, so a module-level import of it anywhere under the CLI left every command on the slow one."""
    probe = "import sys, mlx_sd.app.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlx'))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(("flag", "padded"), [([], False), (["--pad-attention-heads"], True)])
def test_serve_passes_head_padding_to_the_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 flag: list[str], padded: bool) -> None:
    import grpc_service.server

    seen = []

    def start(settings: grpc_service.server.ServerSettings) -> None:
        seen.append(settings.pad_attention_heads)
        raise grpc_service.server.ServerStartError("not started")

    monkeypatch.setattr(grpc_service.server, "start_server", start)
    result = run("serve", tmp_path / "models", "--port", "0", "--no-bonjour", *flag)
    assert result.exit_code == 1 and "not started" in result.stderr and seen == [padded]
