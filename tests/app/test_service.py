"""`mlx-sd service`: the launchd plist and the systemd unit, and the commands with launchctl/systemctl faked."""

from __future__ import annotations

import plistlib
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from grpc_service.auth import SHARED_SECRET_ENV
from mlx_sd.app import os_service as service
from mlx_sd.app.cli import app
from mlx_sd.app.os_service import (
    DEFAULT_LABEL,
    CommandResult,
    LaunchAgent,
    ServiceError,
    SystemdUserUnit,
    launchd_plist,
    serve_program,
    systemd_quote,
    systemd_unit,
)

PROGRAM = ["/opt/homebrew/bin/mlx-sd", "serve", "--port", "7860"]
LAUNCHCTL_PRINT = """gui/501/com.drawthings.grpcserver = {
\tactive count = 1
\tpath = /Users/me/Library/LaunchAgents/com.drawthings.grpcserver.plist
\tstate = running
\tprogram = /opt/homebrew/bin/mlx-sd
\tpid = 4242
}
"""


class FakeRunner:
    """Answers system commands from a table of (prefix -> result) and records every call."""

    def __init__(self, answers: dict[tuple[str, ...], CommandResult] | None = None) -> None:
        self.answers = answers or {}
        self.calls: list[tuple[list[str], bool]] = []

    def __call__(self, args: list[str], *, capture: bool = True) -> CommandResult:
        self.calls.append((args, capture))
        for prefix, result in self.answers.items():
            if tuple(args[: len(prefix)]) == prefix:
                return result
        return CommandResult(0, "")

    @property
    def commands(self) -> list[list[str]]:
        return [args for args, _ in self.calls]


NOT_LOADED = {("launchctl", "print"): CommandResult(113, "Could not find service")}
LOADED = {("launchctl", "print"): CommandResult(0, LAUNCHCTL_PRINT)}


def agent(home: Path, answers=None) -> tuple[LaunchAgent, FakeRunner]:
    fake = FakeRunner(answers)
    return LaunchAgent(DEFAULT_LABEL, home, 501, fake), fake


def test_plist_is_an_interactive_agent_restarted_when_it_fails(tmp_path: Path) -> None:
    log = tmp_path / "Library/Logs/mlx-sd/mlx-sd.log"
    plist = plistlib.loads(launchd_plist(DEFAULT_LABEL, PROGRAM, log))
    assert plist == {
        "Label": "com.drawthings.grpcserver",
        "ProgramArguments": PROGRAM,
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 60,
        "ProcessType": "Interactive",
        "StandardOutPath": str(log),
        "StandardErrorPath": str(log),
        "EnvironmentVariables": {"PYTHONUNBUFFERED": "1", "MLX_SD_SERVICE_LOG": str(log)},
    }


def test_systemd_unit() -> None:
    unit = systemd_unit(["/home/me/.venv/bin/mlx-sd", "serve", "/home/me/My Models"])
    assert unit.splitlines() == [
        "[Unit]",
        f"Description={service.DESCRIPTION}",
        "StartLimitIntervalSec=600",
        "StartLimitBurst=5",
        "",
        "[Service]",
        'ExecStart=/home/me/.venv/bin/mlx-sd serve "/home/me/My Models"',
        "Restart=on-failure",
        "RestartSec=10",
        "Environment=PYTHONUNBUFFERED=1",
        "",
        "[Install]",
        "WantedBy=default.target",
    ]


@pytest.mark.parametrize(
    "arg, quoted",
    [
        ("plain", "plain"),
        ("100%", "100%%"),
        ("$HOME", "$$HOME"),
        ('a "b"', '"a \\"b\\""'),
        ("x;y", '"x;y"'),
        ("", '""'),
    ],
)
def test_systemd_quoting(arg: str, quoted: str) -> None:
    assert systemd_quote(arg) == quoted


def test_serve_program_prefers_the_mlx_sd_script(tmp_path: Path) -> None:
    script = tmp_path / "bin" / "mlx-sd"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    assert serve_program(str(script), "/usr/bin/python3") == [str(script)]
    assert serve_program("/usr/lib/pytest", "/usr/bin/python3") == ["/usr/bin/python3", "-m", "mlx_sd.app.cli"]


def test_launchd_install_writes_the_plist_and_bootstraps(tmp_path: Path) -> None:
    manager, fake = agent(tmp_path, NOT_LOADED)
    manager.install(PROGRAM)
    plist_path = tmp_path / "Library/LaunchAgents/com.drawthings.grpcserver.plist"
    assert plistlib.loads(plist_path.read_bytes())["ProgramArguments"] == PROGRAM
    assert (tmp_path / "Library/Logs/mlx-sd").is_dir()
    assert fake.commands == [
        ["launchctl", "print", "gui/501/com.drawthings.grpcserver"],
        ["launchctl", "print", "user/501/com.drawthings.grpcserver"],
        ["launchctl", "bootstrap", "gui/501", str(plist_path)],
    ]


class FakeLaunchd:
    """launchctl print/bootstrap/bootout/kickstart against a table of loaded jobs; a booted-out job stays
    printable for `drain` more prints (the old server finishing its calls)."""

    def __init__(self, loaded: dict[str, str] | None = None, gui: bool = True, drain: int = 2) -> None:
        self.loaded = dict(loaded or {})  # target -> `launchctl print` output
        self.draining: dict[str, int] = {}
        self.gui, self.drain = gui, drain
        self.commands: list[list[str]] = []

    def __call__(self, args: list[str], *, capture: bool = True) -> CommandResult:
        self.commands.append(args)
        verb, target = args[1], args[2]
        if verb == "print":
            if self.draining.get(target):
                self.draining[target] -= 1
                return CommandResult(0, self.loaded.get(target, LAUNCHCTL_PRINT))
            return CommandResult(0, self.loaded[target]) if target in self.loaded else CommandResult(113, "")
        if verb == "bootstrap":
            if target.startswith("gui/") and not self.gui:
                return CommandResult(125, "Bootstrap failed: 125: Domain does not support specified action")
            label = plistlib.loads(Path(args[3]).read_bytes())["Label"]
            self.loaded[f"{target}/{label}"] = LAUNCHCTL_PRINT
            return CommandResult(0, "")
        if verb == "bootout":
            self.loaded.pop(target)
            self.draining[target] = self.drain
        return CommandResult(0, "")


GUI_TARGET = "gui/501/com.drawthings.grpcserver"
USER_TARGET = "user/501/com.drawthings.grpcserver"


def launchd_agent(home: Path, fake: FakeLaunchd, sleeps: list[float] | None = None) -> LaunchAgent:
    return LaunchAgent(DEFAULT_LABEL, home, 501, fake, sleep=(sleeps if sleeps is not None else []).append)


def test_launchd_reinstall_waits_for_the_old_server_to_exit(tmp_path: Path) -> None:
    fake, sleeps = FakeLaunchd({GUI_TARGET: LAUNCHCTL_PRINT}, drain=3), []
    launchd_agent(tmp_path, fake, sleeps).install(PROGRAM)
    verbs = [c[1] for c in fake.commands]
    assert verbs == ["print", "bootout", "print", "print", "print", "print", "bootstrap"]
    assert fake.commands[1] == ["launchctl", "bootout", GUI_TARGET]
    assert sleeps == [service.BOOTOUT_POLL_SECONDS] * 3  # polled until print no longer finds it


def test_launchd_gives_up_on_a_server_that_does_not_exit(tmp_path: Path) -> None:
    fake = FakeLaunchd({GUI_TARGET: LAUNCHCTL_PRINT}, drain=10**6)
    sleeps: list[float] = []
    with pytest.raises(ServiceError, match="still running 30 s after launchctl bootout"):
        launchd_agent(tmp_path, fake, sleeps).install(PROGRAM)
    assert sum(sleeps) == pytest.approx(service.BOOTOUT_WAIT_SECONDS)  # bounded
    assert not (tmp_path / "Library/LaunchAgents/com.drawthings.grpcserver.plist").exists()


def test_launchd_falls_back_to_the_user_domain_without_a_graphical_login(tmp_path: Path) -> None:
    fake = FakeLaunchd(gui=False)
    manager = launchd_agent(tmp_path, fake)
    lines = manager.install(PROGRAM)
    assert fake.commands[-2:] == [
        ["launchctl", "bootstrap", "gui/501", str(manager.path)],
        ["launchctl", "bootstrap", "user/501", str(manager.path)],
    ]
    assert "loaded in user/501" in lines[-1]
    assert manager.status().running  # found in the user domain
    manager.stop()
    assert ["launchctl", "bootout", USER_TARGET] in fake.commands


def test_launchd_reports_both_domains_when_neither_takes_it(tmp_path: Path) -> None:
    manager, _ = agent(tmp_path, {**NOT_LOADED, ("launchctl", "bootstrap"): CommandResult(5, "Input/output error")})
    with pytest.raises(ServiceError, match="bootstrap gui/501 failed \\(5\\).*; launchctl bootstrap user/501 failed"):
        manager.install(PROGRAM)


DRAW_THINGS_PROGRAM = ["/Applications/Draw Things.app/Contents/MacOS/gRPCServerCLI", "serve"]
FOREIGN_PRINT = LAUNCHCTL_PRINT.replace("program = /opt/homebrew/bin/mlx-sd", f"program = {DRAW_THINGS_PROGRAM[0]}")


def foreign_plist(home: Path) -> tuple[Path, bytes]:
    path = home / "Library/LaunchAgents/com.drawthings.grpcserver.plist"
    path.parent.mkdir(parents=True)
    data = plistlib.dumps({"Label": DEFAULT_LABEL, "ProgramArguments": DRAW_THINGS_PROGRAM, "KeepAlive": True})
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("action", ["install", "uninstall", "start", "stop"])
def test_launchd_never_touches_another_programs_plist(tmp_path: Path, action: str) -> None:
    path, data = foreign_plist(tmp_path)
    fake = FakeLaunchd({GUI_TARGET: FOREIGN_PRINT})
    manager = launchd_agent(tmp_path, fake)
    with pytest.raises(ServiceError, match="belongs to another program .*gRPCServerCLI.*--label .* --port"):
        manager.install(PROGRAM) if action == "install" else getattr(manager, action)()
    assert path.read_bytes() == data  # neither overwritten nor deleted
    assert [c[1] for c in fake.commands if c[1] != "print"] == []  # nothing booted out, loaded or kicked


def test_launchd_leaves_an_unreadable_plist_alone(tmp_path: Path) -> None:
    path = tmp_path / "Library/LaunchAgents/com.drawthings.grpcserver.plist"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a plist")
    with pytest.raises(ServiceError, match="belongs to another program \\(no program\\)"):
        launchd_agent(tmp_path, FakeLaunchd()).uninstall()
    assert path.read_bytes() == b"not a plist"


def test_launchd_never_unloads_another_programs_loaded_job(tmp_path: Path) -> None:
    """Draw Things' own server may be loaded under the label without a plist in ~/Library/LaunchAgents."""
    arguments = LAUNCHCTL_PRINT.replace(
        "\tprogram = /opt/homebrew/bin/mlx-sd\n", "\targuments = {\n\t\t/usr/bin/python3\n\t\tother.py\n\t}\n"
    )
    fake = FakeLaunchd({GUI_TARGET: arguments})
    with pytest.raises(ServiceError, match="the loaded job gui/501/com.drawthings.grpcserver belongs to another"):
        launchd_agent(tmp_path, fake).install(PROGRAM)
    assert fake.loaded == {GUI_TARGET: arguments} and not (tmp_path / "Library/LaunchAgents").exists()


def test_launchd_replaces_its_own_definition_from_another_install(tmp_path: Path) -> None:
    python_program = ["/usr/bin/python3", "-m", "mlx_sd.app.cli", "serve"]
    path = tmp_path / "Library/LaunchAgents/com.drawthings.grpcserver.plist"
    path.parent.mkdir(parents=True)
    path.write_bytes(launchd_plist(DEFAULT_LABEL, python_program, tmp_path / "log"))
    manager = launchd_agent(tmp_path, FakeLaunchd())
    manager.install(PROGRAM)
    assert plistlib.loads(path.read_bytes())["ProgramArguments"] == PROGRAM
    manager.uninstall()
    assert not path.exists()


def test_the_service_log_is_rotated_past_its_size(tmp_path: Path) -> None:
    log = tmp_path / "mlx-sd.log"
    log.write_bytes(b"x" * 100)
    fd = service.os.open(log, service.os.O_WRONLY | service.os.O_APPEND)  # the stdout launchd opened
    try:
        assert not service.rotate_log(log, (fd,), max_bytes=100)
        service.os.write(fd, b"y")
        assert service.rotate_log(log, (fd,), max_bytes=100)
        service.os.write(fd, b"after")
    finally:
        service.os.close(fd)
    assert (tmp_path / "mlx-sd.log.1").read_bytes() == b"x" * 100 + b"y"
    assert log.read_bytes() == b"after"  # the descriptor now writes to the new file
    assert not service.rotate_log(tmp_path / "missing.log", (), max_bytes=0)


def test_launchd_failure_is_reported_with_launchctl_output(tmp_path: Path) -> None:
    manager, _ = agent(tmp_path, {**NOT_LOADED, ("launchctl", "bootstrap"): CommandResult(5, "Input/output error")})
    with pytest.raises(ServiceError, match="launchctl bootstrap .* failed \\(5\\): Input/output error"):
        manager.install(PROGRAM)


def test_launchd_start_stop_uninstall(tmp_path: Path) -> None:
    fake = FakeLaunchd(drain=0)
    manager = launchd_agent(tmp_path, fake)
    with pytest.raises(ServiceError, match="not installed"):
        manager.start()
    manager.install(PROGRAM)
    manager.start()
    assert fake.commands[-1] == ["launchctl", "kickstart", GUI_TARGET]
    manager.stop()
    assert fake.commands[-2] == ["launchctl", "bootout", GUI_TARGET]
    assert manager.stop() == [f"{DEFAULT_LABEL} is not running"]
    manager.start()
    assert fake.commands[-1] == ["launchctl", "bootstrap", "gui/501", str(manager.path)]
    manager.uninstall()
    assert not manager.path.exists() and fake.loaded == {}


def test_launchd_status(tmp_path: Path) -> None:
    manager, _ = agent(tmp_path, LOADED)
    status = manager.status()
    assert (status.installed, status.running, status.pid, status.detail) == (False, True, 4242, "running (pid 4242)")
    stopped, _ = agent(tmp_path, NOT_LOADED)
    assert stopped.status().running is False and stopped.status().detail == "not loaded"


def test_launchd_logs(tmp_path: Path) -> None:
    manager, fake = agent(tmp_path)
    with pytest.raises(ServiceError, match="no log yet"):
        manager.logs(5, follow=False)
    manager.log_file.parent.mkdir(parents=True)
    manager.log_file.write_text("".join(f"line {i}\n" for i in range(100)))
    assert manager.logs(3, follow=False) == ["line 97", "line 98", "line 99"]
    manager.logs(3, follow=True)
    assert fake.calls[-1] == (["tail", "-n", "3", "-F", str(manager.log_file)], False)


def unit(tmp_path: Path, answers=None) -> tuple[SystemdUserUnit, FakeRunner]:
    fake = FakeRunner(answers)
    return SystemdUserUnit("mlx-sd", tmp_path / "config", fake), fake


def test_systemd_install_start_stop_uninstall(tmp_path: Path) -> None:
    manager, fake = unit(tmp_path)
    manager.install(PROGRAM)
    assert (tmp_path / "config/systemd/user/mlx-sd.service").read_text() == systemd_unit(PROGRAM)
    manager.start()
    manager.stop()
    manager.uninstall()
    assert not manager.path.exists()
    assert fake.commands == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "mlx-sd.service"],
        ["systemctl", "--user", "restart", "mlx-sd.service"],
        ["systemctl", "--user", "start", "mlx-sd.service"],
        ["systemctl", "--user", "stop", "mlx-sd.service"],
        ["systemctl", "--user", "disable", "--now", "mlx-sd.service"],
        ["systemctl", "--user", "daemon-reload"],
    ]


def test_systemd_status_and_logs(tmp_path: Path) -> None:
    show = CommandResult(0, "ActiveState=active\nSubState=running\nMainPID=77\n")
    manager, fake = unit(tmp_path, {("systemctl", "--user", "show"): show})
    status = manager.status()
    assert (status.running, status.pid, status.detail) == (True, 77, "running (pid 77)")
    manager.logs(20, follow=True)
    assert fake.calls[-1] == (
        ["journalctl", "--user", "--unit", "mlx-sd.service", "--lines", "20", "--no-pager", "--follow"],
        False,
    )


@pytest.mark.parametrize("action", ["install", "uninstall", "start", "stop"])
def test_systemd_never_touches_another_programs_unit(tmp_path: Path, action: str) -> None:
    manager, fake = unit(tmp_path)
    manager.path.parent.mkdir(parents=True)
    manager.path.write_text("[Service]\nExecStart=/usr/bin/other-server --port 7859\n")
    with pytest.raises(ServiceError, match="belongs to another program \\(/usr/bin/other-server --port 7859\\)"):
        manager.install(PROGRAM) if action == "install" else getattr(manager, action)()
    assert manager.path.read_text() == "[Service]\nExecStart=/usr/bin/other-server --port 7859\n"
    assert fake.commands == []


def test_systemd_failure_is_reported(tmp_path: Path) -> None:
    manager, _ = unit(tmp_path, {("systemctl",): CommandResult(1, "Failed to connect to bus")})
    with pytest.raises(ServiceError, match="Failed to connect to bus"):
        manager.install(PROGRAM)


# The commands, through the CLI, on a faked platform and home.


@pytest.fixture
def fake_system(monkeypatch, tmp_path: Path) -> FakeRunner:
    fake = FakeRunner(NOT_LOADED)
    monkeypatch.setattr(service, "run_command", fake)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(SHARED_SECRET_ENV, raising=False)
    return fake


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_install_on_macos_runs_serve_with_the_flags_given(fake_system, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(service, "current_platform", lambda: "darwin")
    monkeypatch.chdir(tmp_path)
    result = invoke("service", "install", "--port", "7860", "--no-tls", "models", "--label", "org.example.sd")
    assert result.exit_code == 0, result.output
    plist_path = tmp_path / "home/Library/LaunchAgents/org.example.sd.plist"
    plist = plistlib.loads(plist_path.read_bytes())
    assert plist["Label"] == "org.example.sd"
    assert plist["ProgramArguments"] == [
        sys.executable,
        "-m",
        "mlx_sd.app.cli",
        "serve",
        str(tmp_path / "models"),
        "--port",
        "7860",
        "--no-tls",
    ]
    assert plist["StandardOutPath"] == str(tmp_path / "home/Library/Logs/mlx-sd/mlx-sd.log")
    assert fake_system.commands[-1] == ["launchctl", "bootstrap", f"gui/{service.os.getuid()}", str(plist_path)]
    assert f"installed {plist_path}" in result.stdout


def test_install_on_linux_passes_the_config_file_along(fake_system, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(service, "current_platform", lambda: "linux")
    config = tmp_path / "my.toml"
    result = invoke("--config", config, "service", "install", "--max-queue", "2")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "xdg/systemd/user/mlx-sd.service").read_text()
    assert f"-m mlx_sd.app.cli --config {config} serve --max-queue 2\n" in text
    assert ["systemctl", "--user", "restart", "mlx-sd.service"] in fake_system.commands


def test_install_refuses_a_secret_on_the_command_line(fake_system) -> None:
    result = invoke("service", "install", "--shared-secret", "s3cret")
    assert result.exit_code == 1 and "--shared-secret-file" in result.stderr
    assert "s3cret" not in result.output and fake_system.commands == []


def test_install_rejects_flags_serve_does_not_know(fake_system) -> None:
    result = invoke("service", "install", "--prot", "1")
    assert result.exit_code == 2 and "--prot" in result.stderr


def test_install_warns_that_the_environment_secret_stays_behind(fake_system, monkeypatch) -> None:
    monkeypatch.setattr(service, "current_platform", lambda: "linux")
    result = CliRunner().invoke(app, ["service", "install"], env={SHARED_SECRET_ENV: "s3cret"})
    assert result.exit_code == 0 and "will not see MLX_SD_SHARED_SECRET" in result.stderr


def test_status_exit_code(fake_system, monkeypatch) -> None:
    monkeypatch.setattr(service, "current_platform", lambda: "darwin")
    result = invoke("service", "status")
    assert result.exit_code == 3 and "not installed" in result.stdout and "not loaded" in result.stdout
    fake_system.answers = LOADED
    result = invoke("service", "status")
    assert result.exit_code == 0 and "running (pid 4242)" in result.stdout


def test_unsupported_platform(fake_system, monkeypatch) -> None:
    monkeypatch.setattr(service, "current_platform", lambda: "win32")
    result = invoke("service", "start")
    assert result.exit_code == 1 and "macOS (launchd) and Linux (systemd)" in result.stderr
