"""`mlx-sd doctor`: each check's verdict and hint, and the command's output and exit status."""

from __future__ import annotations

import datetime as dt
import errno
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from grpc_service.auth import SHARED_SECRET_ENV
from grpc_service.tls import ensure_self_signed
from mlx_sd.app import doctor
from mlx_sd.app import os_service as service
from mlx_sd.app.cli import app
from mlx_sd.app.doctor import (
    Level,
    check_config_file,
    check_container_access,
    check_local_network,
    check_mlx,
    check_models,
    check_port,
    check_service,
    check_tls,
)
from mlx_sd.app.os_service import CommandResult, ServiceStatus

NOW = dt.datetime.now(dt.UTC)
RUNNING = ServiceStatus(True, True, 42, "running (pid 42)")


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_mlx_reports_the_device_and_memory() -> None:
    check = check_mlx()
    assert check.level in (Level.OK, Level.WARN)
    assert ("Metal GPU" in check.message or "CPU only" in check.message) and "GiB of memory" in check.message


def test_models_missing_folder(tmp_path: Path) -> None:
    check = check_models(tmp_path / "nowhere")
    assert check.level is Level.WARN and "does not exist yet" in check.message
    assert "stable-diffusion/model.safetensors" in check.hint


def test_models_without_a_checkpoint_lists_what_is_there(tmp_path: Path) -> None:
    (tmp_path / "loras").mkdir()
    save_file({"w": np.zeros(4, dtype=np.float32)}, str(tmp_path / "loras" / "style.safetensors"))
    check = check_models(tmp_path)
    assert check.level is Level.WARN and "1 model files" in check.message and "no usable SD-1 model" in check.message
    assert check.details == ["loras/style.safetensors (0.0 GiB)"]


def test_models_with_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "stable-diffusion").mkdir()
    save_file({"w": np.zeros(4, dtype=np.float32)}, str(tmp_path / "stable-diffusion" / "model.safetensors"))
    check = check_models(tmp_path)
    assert check.level is Level.OK and "SD-1 model stable-diffusion/model.safetensors" in check.message


def test_tls_off_is_a_warning(tmp_path: Path) -> None:
    assert check_tls(False, None, None, tmp_path, NOW).level is Level.WARN


def test_tls_not_generated_yet_is_fine(tmp_path: Path) -> None:
    check = check_tls(True, None, None, tmp_path, NOW)
    assert check.level is Level.OK and "generated at the first start" in check.message


def test_tls_generated_certificate_and_its_expiry(tmp_path: Path) -> None:
    identity = ensure_self_signed(tmp_path)
    valid = check_tls(True, None, None, tmp_path, NOW)
    assert valid.level is Level.OK and identity.fingerprint in valid.message
    soon = check_tls(True, None, None, tmp_path, identity.not_after - dt.timedelta(days=10))
    assert soon.level is Level.WARN and "expires in" in soon.message
    expired = check_tls(True, None, None, tmp_path, identity.not_after + dt.timedelta(days=1))
    assert expired.level is Level.WARN and "generated at the next start" in expired.hint


def test_tls_given_certificate_expired_or_broken_fails(tmp_path: Path) -> None:
    identity = ensure_self_signed(tmp_path)
    key = tmp_path / "tls" / "server-key.pem"
    later = identity.not_after + dt.timedelta(days=1)
    assert check_tls(True, identity.cert_path, key, tmp_path, later).level is Level.FAIL
    broken = tmp_path / "broken.pem"
    broken.write_text("nope")
    check = check_tls(True, broken, key, tmp_path, NOW)
    assert check.level is Level.FAIL and "not a PEM certificate" in check.message


def test_port_free_or_busy(busy_port: int) -> None:
    assert check_port("127.0.0.1", free_port(), None).level is Level.OK
    busy = check_port("127.0.0.1", busy_port, None)
    assert busy.level is Level.FAIL and "--port" in busy.hint
    assert check_port("127.0.0.1", busy_port, RUNNING).level is Level.OK  # the service holds it


class Manager:
    def __init__(self, label: str, status: ServiceStatus) -> None:
        self.label, self.path, self._status = label, Path(f"/agents/{label}.plist"), status

    def status(self) -> ServiceStatus:
        return self._status


def test_service_states() -> None:
    missing = ServiceStatus(False, False, None, "not loaded")
    stopped = ServiceStatus(True, False, None, "inactive (dead)")
    assert check_service([Manager("a", missing)])[0].level is Level.WARN
    check, _ = check_service([Manager("a", stopped)])
    assert check.level is Level.WARN and "mlx-sd service start" in check.hint
    check, status = check_service([Manager("ours", missing), Manager("homebrew.mxcl.mlx-sd", RUNNING)])
    assert check.level is Level.OK and "homebrew.mxcl.mlx-sd" in check.message and status is RUNNING


def test_config_file_with_a_readable_secret(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[serve]\nshared-secret = "x"\n')
    path.chmod(0o644)
    check = check_config_file(path, {"shared_secret": "x"}, None)
    assert check.level is Level.WARN and check.hint == f"chmod 600 {path}"
    path.chmod(0o600)
    assert check_config_file(path, {"shared_secret": "x"}, None).level is Level.OK
    assert check_config_file(path, None, "broken").level is Level.FAIL


@pytest.fixture
def config(tmp_path: Path, monkeypatch) -> Path:
    """A config file with folders in tmp_path; systemd answers that the unit is inactive."""
    show = CommandResult(0, "ActiveState=inactive\nSubState=dead\nMainPID=0\n")
    monkeypatch.setattr(service, "current_platform", lambda: "linux")
    monkeypatch.setattr(service, "run_command", lambda args, capture=True: show)
    monkeypatch.setattr(doctor, "send_multicast", lambda: None)  # nothing leaves the machine
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(SHARED_SECRET_ENV, raising=False)
    path = tmp_path / "config.toml"
    path.write_text('[serve]\nhost = "127.0.0.1"\nmodels-dir = "models"\nconfig-dir = "conf"\n')
    return path


def test_doctor_command_fails_on_a_busy_port(config: Path, busy_port: int) -> None:
    result = CliRunner().invoke(app, ["--config", str(config), "doctor", "--port", str(busy_port)])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert any(line.startswith("FAIL  port") and str(busy_port) in line for line in lines)
    assert any(line.startswith("WARN  service") for line in lines)
    assert any(line.startswith("WARN  models") for line in lines)


def test_doctor_command_passes_without_failures(config: Path) -> None:
    result = CliRunner().invoke(app, ["--config", str(config), "doctor", "--port", str(free_port())])
    assert result.exit_code == 0, result.stdout
    assert "FAIL" not in result.stdout and "hint:" in result.stdout


def test_doctor_command_warns_when_the_network_is_unreachable(config: Path, monkeypatch) -> None:
    def unreachable() -> None:
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(doctor, "send_multicast", unreachable)
    result = CliRunner().invoke(app, ["--config", str(config), "doctor", "--port", str(free_port())])
    assert result.exit_code == 0, result.stdout
    assert any(
        line.startswith("WARN  network") and "Network is unreachable" in line for line in result.stdout.splitlines()
    )


def test_models_in_a_protected_container_fail_with_the_permission(tmp_path: Path, monkeypatch) -> None:
    models = tmp_path / "Library/Containers/com.liuliu.draw-things/Data/Documents/Models"
    models.mkdir(parents=True)
    real_scandir = doctor.os.scandir

    def scandir(path):  # macOS privacy protection answers EPERM, even to root
        if Path(path) == models:
            raise PermissionError(1, "Operation not permitted", str(path))
        return real_scandir(path)

    monkeypatch.setattr(doctor.os, "scandir", scandir)
    check = check_models(models)
    assert check.level is Level.FAIL and "access data from other apps" in check.message
    assert "Full Disk Access" in check.hint


def test_a_readable_container_still_explains_the_service_permission(tmp_path: Path, monkeypatch) -> None:
    models = tmp_path / "Library/Containers/com.liuliu.draw-things/Data/Documents/Models"
    models.mkdir(parents=True)
    monkeypatch.setattr(doctor, "current_platform", lambda: "darwin")
    check = check_container_access(models)
    assert check is not None and check.level is Level.OK and "Full Disk Access" in check.hint
    assert check_container_access(tmp_path) is None  # not another app's container
    monkeypatch.setattr(doctor, "current_platform", lambda: "linux")
    assert check_container_access(models) is None


def test_local_network_denied_on_a_mac_names_the_setting(monkeypatch) -> None:
    def denied() -> None:
        raise OSError(errno.EHOSTUNREACH, "No route to host")

    monkeypatch.setattr(doctor, "current_platform", lambda: "darwin")
    check = check_local_network(lambda: "192.168.1.20", denied)
    assert check.level is Level.WARN and "No route to host" in check.message
    assert "Privacy & Security > Local Network" in check.hint
    check = check_local_network(lambda: "192.168.1.20", lambda: None)
    assert check.level is Level.OK and "192.168.1.20" in check.message
    assert "the service, started by launchd, is asked for its own" in check.hint


def test_local_network_probe_sends_an_empty_mdns_message(monkeypatch) -> None:
    sent: list[tuple[bytes, tuple[str, int]]] = []

    class Recorder:
        def __init__(self, *args) -> None:
            pass

        def __enter__(self) -> Recorder:
            return self

        def __exit__(self, *args) -> None:
            pass

        def setsockopt(self, *args) -> None:
            pass

        def sendto(self, data: bytes, address: tuple[str, int]) -> None:
            sent.append((data, address))

    monkeypatch.setattr(doctor.socket, "socket", Recorder)
    doctor.send_multicast()
    assert sent == [(bytes(12), ("224.0.0.251", 5353))]  # header only: no questions, nothing to answer
