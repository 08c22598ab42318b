"""`mlx-sd service ...`: keep `mlx-sd serve` running in the background as a per-user service.

macOS: a LaunchAgent, ~/Library/LaunchAgents/<label>.plist (label com.drawthings.grpcserver unless
--label says otherwise), started at login and restarted when it exits, as a background process (no
Dock icon, no menu bar); stdout and stderr go to ~/Library/Logs/mlx-sd/mlx-sd.log. launchctl
bootstrap/bootout load and unload it in the gui/<uid> domain.

Linux: a systemd user unit, <XDG config home>/systemd/user/<name>.service (name mlx-sd), driven with
`systemctl --user`; its output goes to the journal.

Every system command goes through a `Runner`, so tests replace it and nothing real is called.
"""

from __future__ import annotations

import os
import plistlib
import re
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

import platformdirs
import typer

from mlx_sd.config import CONFIG_FILE_META_KEY, SERVE_ARGS, SOURCE_LABELS, serve_context, setting_types

DEFAULT_LABEL = "com.drawthings.grpcserver"
DEFAULT_UNIT_NAME = "mlx-sd"
LOG_FILE_NAME = "mlx-sd.log"
# Output reaches the log as it is written, not when a buffer fills.
SERVICE_ENVIRONMENT = {"PYTHONUNBUFFERED": "1"}
DESCRIPTION = "mlx-sd: Stable Diffusion over a Draw Things-compatible gRPC API"
# Flags whose values would sit readable in the service definition.
REFUSED_FLAGS = {"shared_secret": "--shared-secret-file, or shared-secret in the config file"}


class ServiceError(Exception):
    """A service command cannot be carried out; the message says why and what to do."""


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    output: str  # stdout and stderr together; empty when not captured


class Runner(Protocol):
    def __call__(self, args: list[str], *, capture: bool = True) -> CommandResult: ...


def run_command(args: list[str], *, capture: bool = True) -> CommandResult:
    """Runs a system command; with capture=False its output goes straight to the terminal."""
    try:
        completed = subprocess.run(args, capture_output=capture, text=True, check=False)
    except FileNotFoundError:
        return CommandResult(127, f"{args[0]}: command not found")
    return CommandResult(completed.returncode, (completed.stdout or "") + (completed.stderr or ""))


@dataclass(frozen=True)
class ServiceStatus:
    installed: bool  # the definition file exists
    running: bool
    pid: int | None
    detail: str  # e.g. "running (pid 123)", "not loaded"


def serve_program(argv0: str, executable: str) -> list[str]:
    """How to start this mlx-sd again: the `mlx-sd` script it was started as (its path as called,
    so a Homebrew link survives upgrades), or else this interpreter with `-m mlx_sd.cli`."""
    script = Path(argv0)
    if script.name == "mlx-sd" and script.is_file():
        return [str(script.absolute())]
    return [executable, "-m", "mlx_sd.cli"]


def serve_arguments(serve_ctx: Any) -> list[str]:
    """The flags given on the command line of a parsed `serve` context, as serve takes them:
    paths made absolute (a service does not start in the current folder), nothing else added."""
    args: list[str] = []
    types = setting_types(serve_ctx.command)
    for param in serve_ctx.command.params:
        source = serve_ctx.get_parameter_source(param.name)
        if source is None or source.name != "COMMANDLINE":
            continue
        if param.name in REFUSED_FLAGS:
            flag = "--" + param.name.replace("_", "-")
            raise ServiceError(f"{flag} would be stored in the service definition; use {REFUSED_FLAGS[param.name]}")
        value = serve_ctx.params[param.name]
        text = (
            str(Path(value).expanduser().absolute())
            if types[param.name] is Path
            else str(getattr(value, "value", value))
        )
        if param.param_type_name == "argument":
            args.append(text)
        elif getattr(param, "is_flag", False):
            args.append(param.opts[0])
        else:
            args += [param.opts[0], text]
    return args


def launchd_plist(label: str, program: list[str], log_file: Path) -> bytes:
    return plistlib.dumps(
        {
            "Label": label,
            "ProgramArguments": program,
            "RunAtLoad": True,
            "KeepAlive": True,
            "ProcessType": "Background",
            "StandardOutPath": str(log_file),
            "StandardErrorPath": str(log_file),
            "EnvironmentVariables": SERVICE_ENVIRONMENT,
        }
    )


def systemd_quote(arg: str) -> str:
    """One ExecStart word: % and $ escaped (specifiers, variables), quoted when it has to be."""
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if escaped and not re.search(r"[\s\"'\\;]", escaped):
        return escaped
    inner = escaped.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{inner}"'


def systemd_unit(program: list[str]) -> str:
    environment = " ".join(f"{key}={value}" for key, value in SERVICE_ENVIRONMENT.items())
    return "\n".join(
        [
            "[Unit]",
            f"Description={DESCRIPTION}",
            "",
            "[Service]",
            f"ExecStart={' '.join(systemd_quote(arg) for arg in program)}",
            "Restart=always",
            "RestartSec=5",
            f"Environment={environment}",
            "",
            "[Install]",
            "WantedBy=default.target",
            "",
        ]
    )


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)
            handle.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _tail(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of a file that may be large."""
    with path.open("rb") as handle:
        last = deque(handle, maxlen=lines)
    return [line.decode(errors="replace").rstrip("\n") for line in last]


class LaunchAgent:
    def __init__(self, label: str, home: Path, uid: int, runner: Runner) -> None:
        self.label = label
        self.path = home / "Library" / "LaunchAgents" / f"{label}.plist"
        self.log_file = home / "Library" / "Logs" / "mlx-sd" / LOG_FILE_NAME
        self._domain = f"gui/{uid}"
        self._target = f"{self._domain}/{label}"
        self._runner = runner

    def _launchctl(self, *args: str) -> CommandResult:
        result = self._runner(["launchctl", *args])
        if result.returncode != 0:
            raise ServiceError(f"launchctl {' '.join(args)} failed ({result.returncode}): {result.output.strip()}")
        return result

    def _loaded(self) -> bool:
        return self._runner(["launchctl", "print", self._target]).returncode == 0

    def install(self, program: list[str]) -> list[str]:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        if self._loaded():  # launchd keeps the old definition until the job is unloaded
            self._launchctl("bootout", self._target)
        _write_atomically(self.path, launchd_plist(self.label, program, self.log_file))
        self._launchctl("bootstrap", self._domain, str(self.path))
        return [f"installed {self.path}", f"started; it starts again at each login. Logs: {self.log_file}"]

    def uninstall(self) -> list[str]:
        if self._loaded():
            self._launchctl("bootout", self._target)
        if not self.path.exists():
            return [f"not installed ({self.path} does not exist)"]
        self.path.unlink()
        return [f"stopped and removed {self.path} (logs kept in {self.log_file.parent})"]

    def start(self) -> list[str]:
        if not self.path.exists():
            raise ServiceError(f"not installed ({self.path} does not exist); run `mlx-sd service install`")
        if self._loaded():
            self._launchctl("kickstart", self._target)
        else:
            self._launchctl("bootstrap", self._domain, str(self.path))
        return [f"started {self.label}"]

    def stop(self) -> list[str]:
        if not self._loaded():
            return [f"{self.label} is not running"]
        self._launchctl("bootout", self._target)
        return [f"stopped {self.label} (until the next login or `mlx-sd service start`)"]

    def status(self) -> ServiceStatus:
        installed = self.path.exists()
        result = self._runner(["launchctl", "print", self._target])
        if result.returncode != 0:
            return ServiceStatus(installed, False, None, "not loaded")
        state = re.search(r"^\s*state = (.+)$", result.output, re.MULTILINE)
        pid = re.search(r"^\s*pid = (\d+)$", result.output, re.MULTILINE)
        running = state is not None and state.group(1).strip() == "running"
        detail = (
            f"running (pid {pid.group(1)})"
            if running and pid
            else f"loaded, {state.group(1) if state else 'state unknown'}"
        )
        return ServiceStatus(installed, running, int(pid.group(1)) if pid else None, detail)

    def logs(self, lines: int, follow: bool) -> list[str]:
        if not self.log_file.exists():
            raise ServiceError(f"no log yet at {self.log_file}")
        if follow:
            self._runner(["tail", "-n", str(lines), "-F", str(self.log_file)], capture=False)
            return []
        return _tail(self.log_file, lines)


class SystemdUserUnit:
    def __init__(self, name: str, config_home: Path, runner: Runner) -> None:
        self.label = name
        self.unit = f"{name}.service"
        self.path = config_home / "systemd" / "user" / self.unit
        self._runner = runner

    def _systemctl(self, *args: str) -> CommandResult:
        result = self._runner(["systemctl", "--user", *args])
        if result.returncode != 0:
            raise ServiceError(
                f"systemctl --user {' '.join(args)} failed ({result.returncode}): {result.output.strip()}"
            )
        return result

    def install(self, program: list[str]) -> list[str]:
        _write_atomically(self.path, systemd_unit(program).encode())
        self._systemctl("daemon-reload")
        self._systemctl("enable", self.unit)
        self._systemctl("restart", self.unit)  # restart, so a changed definition takes effect
        return [
            f"installed {self.path}",
            f"started; it starts again at each login. Logs: `mlx-sd service logs` ({self.unit} in the journal)",
            "to start it at boot without logging in: loginctl enable-linger $USER",
        ]

    def uninstall(self) -> list[str]:
        if not self.path.exists():
            return [f"not installed ({self.path} does not exist)"]
        self._systemctl("disable", "--now", self.unit)
        self.path.unlink()
        self._systemctl("daemon-reload")
        return [f"stopped and removed {self.path}"]

    def start(self) -> list[str]:
        if not self.path.exists():
            raise ServiceError(f"not installed ({self.path} does not exist); run `mlx-sd service install`")
        self._systemctl("start", self.unit)
        return [f"started {self.unit}"]

    def stop(self) -> list[str]:
        self._systemctl("stop", self.unit)
        return [f"stopped {self.unit} (until the next login or `mlx-sd service start`)"]

    def status(self) -> ServiceStatus:
        installed = self.path.exists()
        result = self._runner(["systemctl", "--user", "show", self.unit, "--property=ActiveState,SubState,MainPID"])
        if result.returncode != 0:
            return ServiceStatus(installed, False, None, f"systemd unavailable: {result.output.strip()}")
        fields = dict(line.split("=", 1) for line in result.output.splitlines() if "=" in line)
        active = fields.get("ActiveState", "unknown")
        pid = int(fields.get("MainPID", "0") or 0) or None
        running = active == "active"
        detail = f"running (pid {pid})" if running and pid else f"{active} ({fields.get('SubState', '?')})"
        return ServiceStatus(installed, running, pid, detail)

    def logs(self, lines: int, follow: bool) -> list[str]:
        args = ["journalctl", "--user", "--unit", self.unit, "--lines", str(lines), "--no-pager"]
        self._runner([*args, "--follow"] if follow else args, capture=False)
        return []


ServiceManager = LaunchAgent | SystemdUserUnit


def current_platform() -> str:
    """sys.platform, behind a function that tests replace (replacing sys.platform breaks the stdlib)."""
    return sys.platform


def service_manager(label: str | None = None, runner: Runner | None = None) -> ServiceManager:
    """The manager of this platform's per-user services (what `mlx-sd service` drives)."""
    runner = runner or run_command
    platform = current_platform()
    if platform == "darwin":
        return LaunchAgent(label or DEFAULT_LABEL, Path.home(), os.getuid(), runner)
    if platform.startswith("linux"):
        return SystemdUserUnit(label or DEFAULT_UNIT_NAME, Path(platformdirs.user_config_dir()), runner)
    raise ServiceError(f"background services are supported on macOS (launchd) and Linux (systemd), not {platform}")


service_app = typer.Typer(
    help="Run `mlx-sd serve` in the background: a LaunchAgent on macOS, a systemd user unit on Linux.",
    no_args_is_help=True,
)
LabelOption = Annotated[
    str | None,
    typer.Option(
        "--label",
        help=f"The service's name: launchd label on macOS (default {DEFAULT_LABEL}), "
        f"systemd unit name on Linux (default {DEFAULT_UNIT_NAME}).",
    ),
]


def _carry_out(action: Any) -> None:
    """Runs a manager action, printing its lines, or its error and exit status 1."""
    try:
        lines = action()
    except (ServiceError, OSError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from exc
    for line in lines:
        typer.echo(line)


@service_app.command("install", context_settings=SERVE_ARGS)
def install_command(ctx: typer.Context, label: LabelOption = None) -> None:
    """Install the service and start it; serve's flags may follow: `mlx-sd service install --port 7860`.

    The service runs `mlx-sd serve` with those flags, and reads the config file at each start.
    """
    serve_ctx = serve_context(ctx, ctx.args)
    secret_source = serve_ctx.get_parameter_source("shared_secret")
    if secret_source is not None and SOURCE_LABELS.get(secret_source.name) == "environment":
        typer.secho(
            "warning: the service will not see MLX_SD_SHARED_SECRET from this shell; "
            "use --shared-secret-file or the config file",
            err=True,
            fg="yellow",
        )
    config_file = ctx.meta.get(CONFIG_FILE_META_KEY)
    root_args = ["--config", str(Path(config_file).absolute())] if config_file is not None else []

    def install() -> list[str]:
        program = [*serve_program(sys.argv[0], sys.executable), *root_args, "serve", *serve_arguments(serve_ctx)]
        return service_manager(label).install(program)

    _carry_out(install)


@service_app.command("uninstall")
def uninstall_command(label: LabelOption = None) -> None:
    """Stop the service and remove its definition (logs are kept)."""
    _carry_out(lambda: service_manager(label).uninstall())


@service_app.command("start")
def start_command(label: LabelOption = None) -> None:
    """Start the installed service."""
    _carry_out(lambda: service_manager(label).start())


@service_app.command("stop")
def stop_command(label: LabelOption = None) -> None:
    """Stop the service until the next login or `mlx-sd service start`."""
    _carry_out(lambda: service_manager(label).stop())


@service_app.command("status")
def status_command(label: LabelOption = None) -> None:
    """Say whether the service is installed and running; exit status 3 when it is not running."""
    try:
        manager = service_manager(label)
        status = manager.status()
    except ServiceError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from exc
    typer.echo(
        f"{manager.label}: {'installed' if status.installed else 'not installed'} ({manager.path}), {status.detail}"
    )
    if not status.running:
        raise typer.Exit(3)


@service_app.command("logs")
def logs_command(
    label: LabelOption = None,
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many of the last lines to show.", min=1)] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines until Ctrl-C.")] = False,
) -> None:
    """Show the service's log."""
    _carry_out(lambda: service_manager(label).logs(lines, follow))
