"""`mlx-sd service ...`: keep `mlx-sd serve` running in the background as a per-user service.

macOS: a LaunchAgent, ~/Library/LaunchAgents/<label>.plist (label com.drawthings.grpcserver unless
--label says otherwise), started at login and restarted, at most once a minute, when it fails; stdout
and stderr go to ~/Library/Logs/mlx-sd/mlx-sd.log, which serve rotates at start. launchctl
bootstrap/bootout load and unload it in the gui/<uid> domain, or in user/<uid> where there is no
graphical login (SSH).

Linux: a systemd user unit, <XDG config home>/systemd/user/<name>.service (name mlx-sd), driven with
`systemctl --user`; its output goes to the journal.

The label and the port are Draw Things' own defaults, so a definition under our name may belong to
another program: one whose program is not mlx-sd is never replaced, stopped or removed.

Every system command goes through a `Runner`, so tests replace it and nothing real is called.
"""

from __future__ import annotations

import os
import plistlib
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

import platformdirs
import typer

from mlx_sd.app.config import CONFIG_FILE_META_KEY, SERVE_ARGS, SOURCE_LABELS, serve_context, setting_types

DEFAULT_LABEL = "com.drawthings.grpcserver"
DEFAULT_UNIT_NAME = "mlx-sd"
LOG_FILE_NAME = "mlx-sd.log"
# Set in the LaunchAgent's environment: serve rotates this file (its own stdout/stderr) at start.
SERVICE_LOG_ENV = "MLX_SD_SERVICE_LOG"
LOG_ROTATE_BYTES = 10 * 1024**2  # a log past this size is moved to <name>.1 (one kept) at start
# Output reaches the log as it is written, not when a buffer fills.
SERVICE_ENVIRONMENT = {"PYTHONUNBUFFERED": "1"}
# launchd restarts a failed server at most this often (its default, 10 s, fills a log with a crash loop).
RESTART_THROTTLE_SECONDS = 60
# How long install waits for a booted-out server to drain before loading the new definition.
BOOTOUT_WAIT_SECONDS = 30.0
BOOTOUT_POLL_SECONDS = 0.25
DESCRIPTION = "mlx-sd: Stable Diffusion over a Draw Things-compatible gRPC API"
# Flags whose values would sit readable in the service definition.
REFUSED_FLAGS = {"shared_secret": "--shared-secret-file, or shared-secret in the config file"}


class ServiceError(Exception):
    """A service command cannot be carried out; the message says why and what to do."""


def runs_mlx_sd(program: list[str]) -> bool:
    """Whether a service's command line starts an mlx-sd (its script, or `python -m mlx_sd.app.cli`)."""
    if not program:
        return False
    if Path(program[0]).name == "mlx-sd":
        return True
    return any(program[i : i + 2] == ["-m", "mlx_sd.app.cli"] for i in range(len(program) - 1))


def _not_ours(what: str, program: list[str], action: str) -> ServiceError:
    shown = " ".join(program) or "no program"
    return ServiceError(
        f"{what} belongs to another program ({shown}), not to mlx-sd; {action}. Give mlx-sd its own name and "
        f"port instead: `mlx-sd service install --label com.example.mlx-sd --port 7860` (and --label on "
        "the other service commands)"
    )


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
    so a Homebrew link survives upgrades), or else this interpreter with `-m mlx_sd.app.cli`."""
    script = Path(argv0)
    if script.name == "mlx-sd" and script.is_file():
        return [str(script.absolute())]
    return [executable, "-m", "mlx_sd.app.cli"]


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
            # Restarted when it fails, not after a clean stop; a failing start retries once a minute.
            "KeepAlive": {"SuccessfulExit": False},
            "ThrottleInterval": RESTART_THROTTLE_SECONDS,
            # A server that clients wait on: Interactive runs it without the CPU and I/O throttling that
            # Background (efficiency cores, throttled I/O) and Standard (light limits) apply. It has
            # nothing to do with a Dock icon: a LaunchAgent has none either way.
            "ProcessType": "Interactive",
            "StandardOutPath": str(log_file),
            "StandardErrorPath": str(log_file),
            "EnvironmentVariables": {**SERVICE_ENVIRONMENT, SERVICE_LOG_ENV: str(log_file)},
        }
    )


def rotate_log(path: Path, fds: tuple[int, ...] = (1, 2), max_bytes: int = LOG_ROTATE_BYTES) -> bool:
    """Moves a log past `max_bytes` to <name>.1 and points `fds` (the process's stdout and stderr,
    which launchd opened on it) at a new, empty file. Run at serve's start, so even a crash loop
    keeps at most twice `max_bytes` on disk. Returns whether it rotated."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    os.replace(path, path.with_name(path.name + ".1"))
    fresh = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for fd in fds:
            os.dup2(fresh, fd)
    finally:
        os.close(fresh)
    return True


def rotate_service_log() -> None:
    """Rotates the service's log when serve runs as the LaunchAgent (which names it in the environment)."""
    log_file = os.environ.get(SERVICE_LOG_ENV)
    if log_file:
        sys.stdout.flush()
        sys.stderr.flush()
        rotate_log(Path(log_file))


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
            # Restarted when it fails, 10 s apart; after 5 failed starts in 10 minutes systemd gives up.
            "StartLimitIntervalSec=600",
            "StartLimitBurst=5",
            "",
            "[Service]",
            f"ExecStart={' '.join(systemd_quote(arg) for arg in program)}",
            "Restart=on-failure",
            "RestartSec=10",
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


def _printed_program(output: str) -> list[str]:
    """The command line of a job in `launchctl print` output: its arguments block, else its program."""
    block = re.search(r"^\s*arguments = \{\n(.*?)^\s*\}", output, re.MULTILINE | re.DOTALL)
    if block:
        return [line.strip() for line in block.group(1).splitlines() if line.strip()]
    program = re.search(r"^\s*program = (.+)$", output, re.MULTILINE)
    return [program.group(1).strip()] if program else []


def _plist_program(path: Path) -> list[str]:
    """The command line a plist runs; empty when it cannot be read as one."""
    try:
        plist = plistlib.loads(path.read_bytes())
    except (plistlib.InvalidFileException, ValueError, OSError):
        return []
    if not isinstance(plist, dict):
        return []
    program = plist.get("ProgramArguments") or [plist.get("Program")]
    return program if isinstance(program, list) and all(isinstance(arg, str) for arg in program) else []


class LaunchAgent:
    def __init__(
        self, label: str, home: Path, uid: int, runner: Runner, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.label = label
        self.path = home / "Library" / "LaunchAgents" / f"{label}.plist"
        self.log_file = home / "Library" / "Logs" / "mlx-sd" / LOG_FILE_NAME
        # gui/<uid> exists only with a graphical login; user/<uid> also over SSH.
        self._domains = (f"gui/{uid}", f"user/{uid}")
        self._runner = runner
        self._sleep = sleep

    def _launchctl(self, *args: str) -> CommandResult:
        result = self._runner(["launchctl", *args])
        if result.returncode != 0:
            raise ServiceError(f"launchctl {' '.join(args)} failed ({result.returncode}): {result.output.strip()}")
        return result

    def _loaded(self) -> tuple[str, CommandResult] | None:
        """The domain the job is loaded in, with its `launchctl print` output; None when not loaded."""
        for domain in self._domains:
            result = self._runner(["launchctl", "print", f"{domain}/{self.label}"])
            if result.returncode == 0:
                return domain, result
        return None

    def _ours(self, refusal: str) -> str | None:
        """The domain our job is loaded in (None: not loaded); ServiceError when the definition file or
        the loaded job under this label runs another program."""
        if self.path.exists():
            program = _plist_program(self.path)
            if not runs_mlx_sd(program):
                raise _not_ours(str(self.path), program, refusal)
        loaded = self._loaded()
        if loaded is None:
            return None
        domain, printed = loaded
        program = _printed_program(printed.output)
        if not runs_mlx_sd(program):
            raise _not_ours(f"the loaded job {domain}/{self.label}", program, refusal)
        return domain

    def _bootout(self, domain: str) -> None:
        """Unloads the job and waits until the old server has exited, so a new one can take its port."""
        target = f"{domain}/{self.label}"
        self._launchctl("bootout", target)
        for _ in range(int(BOOTOUT_WAIT_SECONDS / BOOTOUT_POLL_SECONDS)):
            if self._runner(["launchctl", "print", target]).returncode != 0:
                return
            self._sleep(BOOTOUT_POLL_SECONDS)
        raise ServiceError(f"{target} is still running {BOOTOUT_WAIT_SECONDS:.0f} s after launchctl bootout; "
                           "try again once it has stopped")

    def _bootstrap(self) -> str:
        """Loads the plist in the first domain that takes it; returns that domain."""
        failures = []
        for domain in self._domains:
            result = self._runner(["launchctl", "bootstrap", domain, str(self.path)])
            if result.returncode == 0:
                return domain
            failures.append(f"launchctl bootstrap {domain} failed ({result.returncode}): {result.output.strip()}")
        raise ServiceError("; ".join(failures))

    def install(self, program: list[str]) -> list[str]:
        domain = self._ours("left as it is")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        if domain is not None:  # launchd keeps the old definition until the job is unloaded
            self._bootout(domain)
        _write_atomically(self.path, launchd_plist(self.label, program, self.log_file))
        domain = self._bootstrap()
        lines = [f"installed {self.path}", f"started; it starts again at each login. Logs: {self.log_file}"]
        if domain.startswith("user/"):
            lines.append(f"loaded in {domain}: there is no graphical login; it runs until logout or restart")
        return lines

    def uninstall(self) -> list[str]:
        domain = self._ours("left in place")
        if domain is not None:
            self._bootout(domain)
        if not self.path.exists():
            return [f"not installed ({self.path} does not exist)"]
        self.path.unlink()
        return [f"stopped and removed {self.path} (logs kept in {self.log_file.parent})"]

    def start(self) -> list[str]:
        if not self.path.exists():
            raise ServiceError(f"not installed ({self.path} does not exist); run `mlx-sd service install`")
        domain = self._ours("not started")
        if domain is not None:
            self._launchctl("kickstart", f"{domain}/{self.label}")
        else:
            self._bootstrap()
        return [f"started {self.label}"]

    def stop(self) -> list[str]:
        domain = self._ours("left running")
        if domain is None:
            return [f"{self.label} is not running"]
        self._bootout(domain)
        return [f"stopped {self.label} (until the next login or `mlx-sd service start`)"]

    def status(self) -> ServiceStatus:
        installed = self.path.exists()
        loaded = self._loaded()
        if loaded is None:
            return ServiceStatus(installed, False, None, "not loaded")
        result = loaded[1]
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

    def _check_ours(self, refusal: str) -> None:
        """ServiceError when the unit file under this name runs another program."""
        if not self.path.exists():
            return
        exec_start = re.search(r"^ExecStart=(.*)$", self.path.read_text(errors="replace"), re.MULTILINE)
        try:
            program = shlex.split(exec_start.group(1)) if exec_start else []
        except ValueError:
            program = []
        if not runs_mlx_sd(program):
            raise _not_ours(str(self.path), program, refusal)

    def install(self, program: list[str]) -> list[str]:
        self._check_ours("left as it is")
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
        self._check_ours("left in place")
        self._systemctl("disable", "--now", self.unit)
        self.path.unlink()
        self._systemctl("daemon-reload")
        return [f"stopped and removed {self.path}"]

    def start(self) -> list[str]:
        if not self.path.exists():
            raise ServiceError(f"not installed ({self.path} does not exist); run `mlx-sd service install`")
        self._check_ours("not started")
        self._systemctl("start", self.unit)
        return [f"started {self.unit}"]

    def stop(self) -> list[str]:
        self._check_ours("left running")
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
