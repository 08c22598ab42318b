"""`mlx-sd doctor`: checks what `mlx-sd serve` needs, each reported as OK, WARN or FAIL with a hint.

The checks read the same effective settings as serve (flags > environment > config file >
defaults); the exit status is 1 when any check fails.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import typer

from mlx_sd.app.config import (
    DIRECTORY_DEFAULTS,
    SECRET_SETTINGS,
    ConfigError,
    config_file_of,
    read_serve_section,
    serve_context,
    setting_key,
)
from mlx_sd.app.paths import FULL_DISK_ACCESS, in_app_container, models_dir_access_problem
from mlx_sd.app.os_service import (
    LabelOption,
    LaunchAgent,
    ServiceError,
    ServiceManager,
    ServiceStatus,
    current_platform,
    service_manager,
)

EXPIRY_WARNING = dt.timedelta(days=30)
LOW_MEMORY_BYTES = 8 * 1024**3  # SD-1 at float32 with its text encoder and VAE needs about this much
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
LISTED_FILES = 10
HOMEBREW_LABEL = "homebrew.mxcl.mlx-sd"  # the LaunchAgent `brew services start mlx-sd` installs
MDNS_GROUP = ("224.0.0.251", 5353)  # where Bonjour (mDNS) sends
# Any address off this host: connecting a UDP socket to it picks the LAN route and sends nothing.
ROUTE_PROBE = ("192.0.2.1", 9)  # TEST-NET-1
LOCAL_NETWORK_SETTING = "System Settings > Privacy & Security > Local Network"
NETWORK_DOCS = "docs/operations.md, Local network access"


class Level(Enum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    message: str
    hint: str = ""
    details: list[str] = field(default_factory=list)


def _gib(size: int) -> str:
    return f"{size / 1024**3:.1f} GiB"


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_mlx() -> Check:
    try:
        import mlx.core as mx
    except ImportError as exc:
        return Check("MLX", Level.FAIL, f"MLX cannot be loaded: {exc}", "reinstall mlx-sd (it needs the mlx package)")
    info = mx.device_info()
    memory = info.get("memory_size") or _physical_memory()
    memory_text = f"{_gib(memory)} of memory" if memory else "memory unknown"
    name = info.get("device_name", "unknown device")
    if mx.metal.is_available():
        working_set = info.get("max_recommended_working_set_size")
        extra = f", {_gib(working_set)} usable by the GPU" if working_set else ""
        message, level, hint = f"Metal GPU ({name}); {memory_text}{extra}", Level.OK, ""
    else:
        message = f"CPU only ({name}); {memory_text}"
        level, hint = Level.WARN, "without a Metal GPU (Apple Silicon) generation is slow"
    if memory and memory < LOW_MEMORY_BYTES:
        level = Level.WARN
        hint = f"SD-1 needs about {_gib(LOW_MEMORY_BYTES)}; close other programs or expect swapping"
    return Check("MLX", level, message, hint)


def check_models(models_dir: Path) -> Check:
    from convert.formats import MODEL_FILE, SINGLE_FILE_DIR, find_layout
    from mlx_sd.engine.errors import MlxSdError

    hint = (
        f"put an SD-1 checkpoint at {SINGLE_FILE_DIR}/{MODEL_FILE} (or a diffusers folder at {SINGLE_FILE_DIR}/), "
        f"e.g. `mlx-sd upload FILE {SINGLE_FILE_DIR}/{MODEL_FILE}`"
    )
    if problem := models_dir_access_problem(models_dir):
        return Check("models", Level.FAIL, *problem)
    if not models_dir.exists():
        return Check("models", Level.WARN, f"{models_dir} does not exist yet (serve creates it)", hint)
    if not models_dir.is_dir():
        return Check("models", Level.FAIL, f"{models_dir} is not a folder", "give serve a folder as MODELS_DIR")
    try:
        files = sorted(p for p in models_dir.rglob("*") if p.suffix.lower() in MODEL_SUFFIXES and p.is_file())
    except OSError as exc:
        return Check("models", Level.FAIL, f"cannot read {models_dir}: {exc}", "check the folder's permissions")
    details = [f"{p.relative_to(models_dir)} ({_gib(p.stat().st_size)})" for p in files[:LISTED_FILES]]
    if len(files) > LISTED_FILES:
        details.append(f"... and {len(files) - LISTED_FILES} more")
    try:
        layout = find_layout(models_dir)
    except MlxSdError as exc:
        return Check(
            "models", Level.WARN, f"{models_dir}: {len(files)} model files, no usable SD-1 model: {exc}", hint, details
        )
    used = ", ".join(str(p.relative_to(models_dir)) for p in layout.files)
    return Check("models", Level.OK, f"{models_dir}: SD-1 model {used}; {len(files)} model files", details=details)


def check_container_access(models_dir: Path) -> Check | None:
    """On a Mac whose models folder is in another app's container (Draw Things'): the permission the
    service needs, which this terminal's access does not prove."""
    if current_platform() != "darwin" or not in_app_container(models_dir) or models_dir_access_problem(models_dir):
        return None
    return Check(
        "access",
        Level.OK,
        f"{models_dir} (another app's container) is readable from this terminal",
        "the service has no window to answer macOS's \"would like to access data from other apps\" prompt: "
        f"give {Path(sys.executable).resolve()} Full Disk Access ({FULL_DISK_ACCESS}), or serve another folder",
    )


def lan_address() -> str:
    """This host's address on the route out (OSError without one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(ROUTE_PROBE)
        return probe.getsockname()[0]


def send_multicast() -> None:
    """Sends an mDNS message with no questions (which responders ignore) as Bonjour would."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        probe.sendto(bytes(12), MDNS_GROUP)


def check_local_network(
    address: Callable[[], str] | None = None, multicast: Callable[[], None] | None = None
) -> Check:
    """Whether this process reaches the local network: its LAN address (`lan_address`), and a multicast
    send (`send_multicast`, as Bonjour). macOS 15 grants local network access per program, so the
    service's own access may differ."""
    mac = current_platform() == "darwin"
    try:
        lan = (address or lan_address)()
        (multicast or send_multicast)()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        hint = (
            f"macOS 15 asks each program for local network access: allow it in {LOCAL_NETWORK_SETTING} "
            f"(see {NETWORK_DOCS})"
            if mac
            else "Bonjour and LAN clients need a network route and multicast; check the network and firewall"
        )
        return Check("network", Level.WARN, f"cannot reach the local network (Bonjour, LAN clients): {reason}", hint)
    hint = (
        f"this terminal has local network access; the service, started by launchd, is asked for its own: if "
        f"LAN clients or Bonjour fail only with the service, allow it in {LOCAL_NETWORK_SETTING} ({NETWORK_DOCS})"
        if mac
        else ""
    )
    return Check("network", Level.OK, f"LAN address {lan}; Bonjour's multicast can be sent", hint)


def check_tls(tls: bool, cert: Path | None, key: Path | None, config_dir: Path, now: dt.datetime) -> Check:
    from grpc_service.tls import GENERATED_CERT_NAME, GENERATED_KEY_NAME, TlsError, load_identity

    if not tls:
        return Check("TLS", Level.WARN, "off (--no-tls): requests travel unencrypted", "serve without --no-tls")
    generated = cert is None
    cert = cert or config_dir / "tls" / GENERATED_CERT_NAME
    key = key or config_dir / "tls" / GENERATED_KEY_NAME
    if generated and not cert.exists():
        return Check("TLS", Level.OK, f"a self-signed certificate is generated at the first start, in {cert.parent}")
    try:
        identity = load_identity(cert, key)
    except TlsError as exc:
        hint = f"delete {cert} and {key} to have a new pair generated" if generated else "fix --tls-cert/--tls-key"
        return Check("TLS", Level.FAIL, str(exc), hint)
    left = identity.not_after - now
    summary = f"{cert}, valid until {identity.not_after:%Y-%m-%d}; SHA-256 {identity.fingerprint}"
    if left <= dt.timedelta(0):
        if generated:
            hint = "a new one is generated at the next start; clients pinning the old fingerprint must update"
            return Check("TLS", Level.WARN, f"expired: {summary}", hint)
        return Check("TLS", Level.FAIL, f"expired: {summary}", "renew the certificate; serve refuses an expired one")
    if left < EXPIRY_WARNING:
        return Check("TLS", Level.WARN, f"expires in {left.days} days: {summary}", "renew it before then")
    return Check("TLS", Level.OK, summary)


def check_port(host: str, port: int, service: ServiceStatus | None) -> Check:
    if port == 0:
        return Check("port", Level.OK, "0: serve picks a free port at each start")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like a server; ignores TIME_WAIT
            probe.bind((host.strip("[]"), port))
    except OSError as exc:
        if service is not None and service.running:
            return Check(
                "port", Level.OK, f"{host}:{port} in use, by the running service presumably ({service.detail})"
            )
        hint = "stop the program using it, or choose another port (--port, or port in the config file)"
        return Check("port", Level.FAIL, f"cannot listen on {host}:{port}: {exc.strerror or exc}", hint)
    return Check("port", Level.OK, f"{host}:{port} is free")


def check_service(managers: list[ServiceManager]) -> tuple[Check, ServiceStatus | None]:
    """The first installed (or else the first) of `managers`, and its status."""
    try:
        statuses = [(manager, manager.status()) for manager in managers]
    except (ServiceError, OSError) as exc:
        return Check("service", Level.WARN, f"status unknown: {exc}"), None
    manager, status = next(((m, s) for m, s in statuses if s.installed), statuses[0])
    if not status.installed:
        hint = "`mlx-sd service install`" + (", or `brew services start mlx-sd`" if sys.platform == "darwin" else "")
        return Check("service", Level.WARN, f"not installed ({manager.path})", hint), status
    if not status.running:
        return Check(
            "service", Level.WARN, f"{manager.label} installed, {status.detail}", "`mlx-sd service start`"
        ), status
    return Check("service", Level.OK, f"{manager.label}: {status.detail}"), status


def check_config_file(path: Path, values: dict[str, object] | None, error: str | None) -> Check:
    if error is not None:
        return Check("config", Level.FAIL, error, "fix the file; `mlx-sd config show` lists the settings")
    if not path.exists():
        return Check("config", Level.OK, f"no config file at {path}; flags and defaults apply")
    secrets = [setting_key(name) for name in SECRET_SETTINGS if values and name in values]
    if secrets and path.stat().st_mode & 0o077:
        return Check(
            "config", Level.WARN, f"{path} holds {', '.join(secrets)} and others can read it", f"chmod 600 {path}"
        )
    return Check("config", Level.OK, f"{path}: {len(values or {})} settings")


def _managers(label: str | None) -> list[ServiceManager]:
    manager = service_manager(label)
    if isinstance(manager, LaunchAgent) and label is None:
        return [manager, service_manager(HOMEBREW_LABEL)]
    return [manager]


def run_checks(
    ctx: typer.Context,
    args: list[str],
    label: str | None,
    managers: Callable[[str | None], list[ServiceManager]] = _managers,
) -> list[Check]:
    """All checks, for serve's settings with `args` as its flags."""
    path = config_file_of(ctx)
    values: dict[str, object] | None = None
    error = None
    root = ctx.find_root()
    try:
        values = read_serve_section(path, root.command.get_command(root, "serve"))
    except ConfigError as exc:
        error = str(exc)
    params = serve_context(ctx, args, default_map=values or {}).params
    directory = {
        name: Path(params[name]) if params[name] else default() for name, default in DIRECTORY_DEFAULTS.items()
    }
    tls_cert = Path(params["tls_cert"]) if params["tls_cert"] else None
    tls_key = Path(params["tls_key"]) if params["tls_key"] else None
    try:
        service, status = check_service(managers(label))
    except ServiceError as exc:
        service, status = Check("service", Level.WARN, str(exc)), None
    checks = [
        check_config_file(path, values, error),
        check_mlx(),
        check_models(directory["models_dir"]),
        check_container_access(directory["models_dir"]),
        check_tls(not params["no_tls"], tls_cert, tls_key, directory["config_dir"], dt.datetime.now(dt.UTC)),
        check_port(params["host"], params["port"], status),
        check_local_network(),
        service,
    ]
    return [check for check in checks if check is not None]


def doctor_command(ctx: typer.Context, label: LabelOption = None) -> None:
    """Check MLX, the model folder, the TLS certificate, the port, the network, the config file and the service.

    Serve's flags may follow (`mlx-sd doctor --port 7860`) to check those settings instead.
    """
    checks = run_checks(ctx, ctx.args, label)
    colors = {Level.OK: typer.colors.GREEN, Level.WARN: typer.colors.YELLOW, Level.FAIL: typer.colors.RED}
    for check in checks:
        typer.echo(
            typer.style(f"{check.level.value:<4}", fg=colors[check.level]) + f"  {check.name:<7}  {check.message}"
        )
        for line in check.details:
            typer.echo(f"{'':15}{line}")
        if check.hint:
            typer.echo(f"{'':15}hint: {check.hint}")
    if any(check.level is Level.FAIL for check in checks):
        raise typer.Exit(1)
