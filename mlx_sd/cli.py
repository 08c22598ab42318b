"""The `mlx-sd` command line: the server and the client commands that speak its protocol.

Heavy modules (grpc, the generated code, cryptography, mlx) are imported inside the commands,
so `mlx-sd --help` stays fast. A new command is one more `@app.command()` function here.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from grpc_service.auth import SHARED_SECRET_ENV, SecretError, resolve_shared_secret
from grpc_service.defaults import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_SERVER
from mlx_sd import __version__
from mlx_sd.paths import config_dir_help, default_cache_dir, default_config_dir, default_models_dir, models_dir_help

if TYPE_CHECKING:
    from grpc_service.client import ImageServiceClient

app = typer.Typer(
    name="mlx-sd",
    help="Stable Diffusion in MLX, served over a Draw Things-compatible gRPC API.",
    no_args_is_help=True,
    add_completion=False,
)

DEFAULT_MAX_UPLOAD_SIZE = "8GiB"
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2, "g": 1024**3, "gib": 1024**3}

SecretOption = Annotated[
    str | None,
    typer.Option(
        "--shared-secret",
        envvar=SHARED_SECRET_ENV,
        show_envvar=True,
        help="Shared secret, sent as `authorization: Bearer <secret>`. Prefer the env var or a file: flags show in `ps`.",
    ),
]
SecretFileOption = Annotated[
    Path | None, typer.Option("--shared-secret-file", help="Read the shared secret from this file.", dir_okay=False)
]
ServerOption = Annotated[str, typer.Option("--server", "-s", help="The server's host:port.")]
CaOption = Annotated[
    Path | None,
    typer.Option("--ca", help="Trust the server certificate(s) in this PEM file.", exists=True, dir_okay=False),
]
FingerprintOption = Annotated[
    str | None,
    typer.Option(
        "--fingerprint",
        help="Trust the server's certificate if its SHA-256 fingerprint (as `serve` prints it) matches.",
    ),
]
NoTlsOption = Annotated[
    bool, typer.Option("--no-tls", "--insecure", help="Talk plaintext to a server started with --no-tls.")
]


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(1)


def parse_size(text: str) -> int:
    """Bytes from "8GiB", "512M", "1048576" (K/M/G are binary multiples, like KiB/MiB/GiB)."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    unit = match and _SIZE_UNITS.get(match.group(2).lower())
    if not match or unit is None:
        raise typer.BadParameter(f"expected a size such as 8GiB, 512MiB or a number of bytes, got {text!r}")
    return int(match.group(1)) * unit


def _secret(value: str | None, file: Path | None) -> str | None:
    try:
        return resolve_shared_secret(value, file)
    except SecretError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlx-sd {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    """Stable Diffusion in MLX, served over a Draw Things-compatible gRPC API."""


@app.command()
def serve(
    models_dir: Annotated[
        Path | None,
        typer.Argument(
            help="Folder of the models (created when missing).", show_default=models_dir_help(), file_okay=False
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="Port to listen on (0 picks a free one).", min=0, max=65535)] = DEFAULT_PORT,
    no_tls: Annotated[bool, typer.Option("--no-tls", help="Serve plaintext instead of TLS.")] = False,
    tls_cert: Annotated[
        Path | None,
        typer.Option(help="PEM certificate (chain) to serve; default: a generated self-signed one.", dir_okay=False),
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Unencrypted PEM key of --tls-cert.", dir_okay=False)] = None,
    shared_secret: SecretOption = None,
    shared_secret_file: SecretFileOption = None,
    no_response_compression: Annotated[
        bool, typer.Option("--no-response-compression", help="Send responses uncompressed instead of gzip.")
    ] = False,
    max_upload_size: Annotated[
        str, typer.Option(help="Largest file UploadFile accepts, e.g. 8GiB or 512MiB.")
    ] = DEFAULT_MAX_UPLOAD_SIZE,
    config_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where the generated TLS certificate and key are kept.",
            show_default=config_dir_help(),
            file_okay=False,
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where converted weights are cached so later starts load faster.",
            show_default="the user cache folder's mlx-sd/converted",
            file_okay=False,
        ),
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Convert weights on every load; cache nothing.")] = False,
    max_queue: Annotated[
        int, typer.Option(help="Generations that may wait behind the running one; more are refused.", min=1)
    ] = 8,
) -> None:
    """Run the gRPC server until SIGINT/SIGTERM (TLS on, with a generated certificate unless one is given)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from grpc_service.server import ServerSettings, ServerStartError, run_until_signalled, start_server

    if no_tls and (tls_cert or tls_key):
        raise typer.BadParameter("--no-tls cannot be combined with --tls-cert/--tls-key")
    settings = ServerSettings(
        models_dir=models_dir or default_models_dir(),
        config_dir=config_dir or default_config_dir(),
        host=host,
        port=port,
        tls=not no_tls,
        tls_cert=tls_cert,
        tls_key=tls_key,
        shared_secret=_secret(shared_secret, shared_secret_file),
        response_compression=not no_response_compression,
        max_upload_bytes=parse_size(max_upload_size),
        cache_dir=None if no_cache else cache_dir or default_cache_dir(),
        max_queued=max_queue,
    )
    try:
        running = start_server(settings)
    except ServerStartError as exc:
        _fail(str(exc))
    typer.echo(f"serving models from {settings.models_dir}")
    typer.echo(f"listening on {running.address} ({'TLS' if running.tls else 'plaintext'})")
    if running.tls:
        typer.echo(f"TLS certificate: {running.tls.cert_path}")
        typer.echo(f"SHA-256 fingerprint: {running.tls.fingerprint}")
    else:
        typer.secho("warning: TLS is off; requests and responses travel unencrypted", err=True, fg="yellow")
    if settings.shared_secret and not running.tls:
        typer.secho("warning: the shared secret is sent in plaintext without TLS", err=True, fg="yellow")
    run_until_signalled(running)
    typer.echo("stopped")


@contextlib.contextmanager
def _connected(
    server: str, ca: Path | None, fingerprint: str | None, no_tls: bool, secret: str | None, secret_file: Path | None
) -> Iterator[ImageServiceClient]:
    """A client for the given server and trust options; RPC and trust failures end the command cleanly."""
    import grpc

    from grpc_service.client import ClientSettings, ImageServiceClient, TrustError

    if sum((ca is not None, fingerprint is not None, no_tls)) > 1:
        raise typer.BadParameter("give at most one of --ca, --fingerprint and --no-tls")
    settings = ClientSettings(server, not no_tls, ca, fingerprint, _secret(secret, secret_file))
    try:
        with ImageServiceClient(settings) as client:
            yield client
    except grpc.RpcError as exc:
        _fail(f"{exc.code().name}: {exc.details()}")
    except (TrustError, OSError, ValueError) as exc:
        _fail(f"cannot connect to {server}: {exc}")


@app.command()
def echo(
    server: ServerOption = DEFAULT_SERVER,
    ca: CaOption = None,
    fingerprint: FingerprintOption = None,
    no_tls: NoTlsOption = False,
    shared_secret: SecretOption = None,
    shared_secret_file: SecretFileOption = None,
) -> None:
    """Check that the server answers (it replies HELLO)."""
    with _connected(server, ca, fingerprint, no_tls, shared_secret, shared_secret_file) as client:
        typer.echo(client.echo())


@app.command("files-exist")
def files_exist(
    files: Annotated[list[str], typer.Argument(help="Names relative to the server's model directory.")],
    server: ServerOption = DEFAULT_SERVER,
    ca: CaOption = None,
    fingerprint: FingerprintOption = None,
    no_tls: NoTlsOption = False,
    shared_secret: SecretOption = None,
    shared_secret_file: SecretFileOption = None,
) -> None:
    """Ask which files exist in the server's model directory (one line per file)."""
    with _connected(server, ca, fingerprint, no_tls, shared_secret, shared_secret_file) as client:
        checks = client.files_exist(files)
    for check in checks:
        status = "exists" if check.exists else f"refused ({check.error})" if check.error else "missing"
        typer.echo(f"{check.name}: {status}")


@app.command()
def upload(
    local: Annotated[Path, typer.Argument(help="File to send.", exists=True, dir_okay=False, readable=True)],
    remote: Annotated[
        str | None,
        typer.Argument(help="Name in the model directory (subfolders are created); default: LOCAL's name."),
    ] = None,
    server: ServerOption = DEFAULT_SERVER,
    ca: CaOption = None,
    fingerprint: FingerprintOption = None,
    no_tls: NoTlsOption = False,
    shared_secret: SecretOption = None,
    shared_secret_file: SecretFileOption = None,
) -> None:
    """Upload a file into the server's model directory, with a progress bar."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    name = remote or local.name
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with (
        _connected(server, ca, fingerprint, no_tls, shared_secret, shared_secret_file) as client,
        Progress(*columns, console=Console(stderr=True)) as progress,
    ):
        task = progress.add_task(name, total=local.stat().st_size)
        message = client.upload(local, name, on_progress=lambda sent: progress.advance(task, sent))
    typer.echo(message)


@app.command("convert")
def convert_command(
    source: Annotated[
        Path, typer.Argument(help="SD-1 checkpoint: single .safetensors file, diffusers folder or model directory.")
    ],
    destination: Annotated[
        Path, typer.Argument(help="A .safetensors file to write, or a cache folder the server loads from.")
    ],
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16.")] = "float32",
    vae: Annotated[Path | None, typer.Option(help="Standalone VAE replacing the checkpoint's.", dir_okay=False)] = None,
) -> None:
    """Convert a checkpoint to MLX weights once, so later loads skip the conversion."""
    from convert import convert_checkpoint
    from mlx_sd.errors import MlxSdError

    try:
        written = convert_checkpoint(source, destination, dtype, vae_path=vae)
    except (MlxSdError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {written}")


if __name__ == "__main__":
    app()
