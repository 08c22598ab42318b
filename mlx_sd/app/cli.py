"""The `mlx-sd` command line: the server and the client commands that speak its protocol.

Heavy modules (grpc, the generated code, cryptography, mlx) are imported inside the commands,
so `mlx-sd --help` stays fast. A new command is one more `@app.command()` function here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from grpc_service.defaults import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_SERVER
from mlx_sd import __version__
from mlx_sd.app.config import CONFIG_FILE_META_KEY, SERVE_ARGS, ServeCommand, config_app
from mlx_sd.app.discovery import advertise, discover_command
from mlx_sd.app.distributed import (
    DEFAULT_RANK_TIMEOUT_S,
    exit_group_lost,
    group_env,
    join_group,
    launch_group,
    rank_zero_engine,
    run_follower,
)
from mlx_sd.app.doctor import doctor_command
from mlx_sd.app.file_commands import bench_command, convert_pth_command, upscale_command
from mlx_sd.app.options import (
    DEFAULT_MAX_UPLOAD_SIZE,
    CacheDirOption,
    CaOption,
    DtypeOption,
    FingerprintOption,
    LowMemoryOption,
    NoCacheOption,
    NoTlsOption,
    PadAttentionHeadsOption,
    PredictionType,
    PredictionTypeOption,
    QuantizeOption,
    SecretFileOption,
    SecretOption,
    ServerOption,
    ServeSecretOption,
    cache_folder,
    check_low_memory,
    configure_blas,
    fail,
    parse_size,
    resolve_secret,
)
from mlx_sd.app.os_service import rotate_service_log, service_app
from mlx_sd.app.paths import (
    config_dir_help,
    default_config_dir,
    default_models_dir,
    default_models_dir_note,
    models_dir_access_problem,
    models_dir_help,
)
from mlx_sd.engine.request import (
    DEFAULT_CFG_SCALE,
    DEFAULT_STEPS,
    MAX_BATCH_COUNT,
    MAX_BATCH_SIZE,
    MAX_CFG_SCALE,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    SIDE_MULTIPLE,
)
from mlx_sd.sampling.registry import DEFAULT_SAMPLER

if TYPE_CHECKING:
    from grpc_service.client import ImageServiceClient

app = typer.Typer(
    name="mlx-sd",
    help="Stable Diffusion in MLX, served over a Draw Things-compatible gRPC API.",
    no_args_is_help=True,
    add_completion=False,
)

def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlx-sd {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            help="Settings file of serve.", show_default=f"config.toml in {config_dir_help()}", dir_okay=False
        ),
    ] = None,
) -> None:
    """Stable Diffusion in MLX, served over a Draw Things-compatible gRPC API."""
    ctx.meta[CONFIG_FILE_META_KEY] = config


class LogLevel(StrEnum):
    debug = "debug"  # also logs prompts
    info = "info"  # one line per request
    warning = "warning"


class ResizeChoice(StrEnum):
    """The API's ResizeMode, in its order (A1111's names: just resize, crop and resize, resize and fill)."""

    just = "just"
    crop = "crop"
    fill = "fill"


DEFAULT_IMG2IMG_STRENGTH = 0.75  # A1111's default denoising strength for image to image


@app.command(cls=ServeCommand)
def serve(
    models_dir: Annotated[
        Path | None,
        typer.Argument(
            help="Folder of the models (created when missing).", show_default=models_dir_help(), file_okay=False
        ),
    ] = None,
    host: Annotated[str, typer.Option("--host", "--address", "-a", help="Address to listen on.")] = DEFAULT_HOST,
    port: Annotated[
        int, typer.Option("--port", "-p", help="Port to listen on (0 picks a free one).", min=0, max=65535)
    ] = DEFAULT_PORT,
    name: Annotated[
        str | None,
        typer.Option("--name", "-n", help="The name the server is advertised under on the local network (Bonjour).",
                     show_default="the host name"),
    ] = None,
    no_tls: Annotated[bool, typer.Option("--no-tls", help="Serve plaintext instead of TLS.")] = False,
    tls_cert: Annotated[
        Path | None,
        typer.Option(help="PEM certificate (chain) to serve; default: a generated self-signed one.", dir_okay=False),
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Unencrypted PEM key of --tls-cert.", dir_okay=False)] = None,
    shared_secret: ServeSecretOption = None,
    shared_secret_file: SecretFileOption = None,
    no_response_compression: Annotated[
        bool, typer.Option("--no-response-compression", help="Send responses uncompressed instead of gzip.")
    ] = False,
    model_browser: Annotated[
        bool,
        typer.Option("--model-browser", help="Let Draw Things clients list the models in the models folder."),
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
    cache_dir: CacheDirOption = None,
    no_cache: NoCacheOption = False,
    dtype: DtypeOption = None,
    quantize: QuantizeOption = None,
    low_memory: LowMemoryOption = False,
    pad_attention_heads: PadAttentionHeadsOption = False,
    prediction_type: PredictionTypeOption = PredictionType.auto,
    max_queue: Annotated[
        int, typer.Option(help="Generations that may wait behind the running one; more are refused.", min=1)
    ] = 8,
    memory_budget: Annotated[
        str | None,
        typer.Option(
            help="Memory for the model plus one generation, e.g. 12GiB; requests estimated to need more are refused.",
            show_default="Metal: its recommended working set, beyond which requests run with a warning up to "
            "physical memory; else 3/4 of physical memory",
        ),
    ] = None,
    shutdown_grace: Annotated[
        float, typer.Option(help="Seconds running calls may finish after SIGTERM/SIGINT before being cancelled.", min=0)
    ] = 5.0,
    no_bonjour: Annotated[
        bool, typer.Option("--no-bonjour", help="Do not advertise the server on the local network (Bonjour).")
    ] = False,
    log_level: Annotated[LogLevel, typer.Option(help="debug also logs prompts; info: one line per request.")] = (
        LogLevel.info
    ),
    # Several machines as one server (docs/distributed.md).
    hostfile: Annotated[
        Path | None,
        typer.Option(help="mlx.launch's JSON host file: serve with one process per host (docs/distributed.md).",
                     dir_okay=False),
    ] = None,
    rank_timeout: Annotated[
        float, typer.Option(help="With --hostfile: seconds rank 0 waits for the other ranks before restarting the group.",
                            min=1)
    ] = DEFAULT_RANK_TIMEOUT_S,
) -> None:
    """Run the gRPC server until SIGINT/SIGTERM (TLS on, with a generated certificate unless one is given).

    gRPCServerCLI's command lines work too: its other options are ignored or refused (docs/drawthings.md).
    """
    if not group_env():  # a group's ranks write to their launcher's log
        rotate_service_log()
    logging.basicConfig(level=log_level.value.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if hostfile is not None and not group_env():  # the launcher; the ranks need no host file of their own
        if not hostfile.is_file():
            fail(f"--hostfile: no such file: {hostfile}")
        raise typer.Exit(launch_group(hostfile, [os.path.abspath(sys.argv[0]), *sys.argv[1:]]))
    configure_blas()
    from grpc_service.server import (
        ServerSettings,
        ServerStartError,
        raise_open_file_limit,
        run_until_signalled,
        start_server,
    )

    if no_tls and (tls_cert or tls_key):
        raise typer.BadParameter("--no-tls cannot be combined with --tls-cert/--tls-key")
    check_low_memory(low_memory, no_cache, quantize)
    settings = ServerSettings(
        models_dir=models_dir or default_models_dir(),
        config_dir=config_dir or default_config_dir(),
        host=host,
        port=port,
        tls=not no_tls,
        tls_cert=tls_cert,
        tls_key=tls_key,
        shared_secret=resolve_secret(shared_secret, shared_secret_file),
        response_compression=not no_response_compression,
        model_browser=model_browser,
        max_upload_bytes=parse_size(max_upload_size),
        cache_dir=cache_folder(cache_dir, no_cache),
        max_queued=max_queue,
        dtype=dtype,
        quantize_bits=quantize,
        low_memory=low_memory,
        pad_attention_heads=pad_attention_heads,
        prediction_type=prediction_type.value,
        memory_budget=parse_size(memory_budget) if memory_budget else None,
        shutdown_grace=shutdown_grace,
    )
    if models_dir is None and (note := default_models_dir_note()):
        typer.echo(note)
    if problem := models_dir_access_problem(settings.models_dir):
        fail("; ".join(problem))
    raise_open_file_limit()
    group_engine = None
    if hostfile is not None:  # a rank of a group: rank 0 serves, the others follow
        if (group := join_group()).rank() != 0:
            raise typer.Exit(run_follower(group, settings))
        group_engine = rank_zero_engine(group, settings, rank_timeout)
    try:
        running = start_server(settings) if group_engine is None else start_server(settings, group_engine)
    except ServerStartError as exc:
        fail(str(exc))
    typer.echo(f"serving models from {settings.models_dir}")
    typer.echo(f"listening on {running.address} ({'TLS' if running.tls else 'plaintext'})")
    if running.tls:
        typer.echo(f"TLS certificate: {running.tls.cert_path}")
        typer.echo(f"SHA-256 fingerprint: {running.tls.fingerprint}")
    else:
        typer.secho("warning: TLS is off; requests and responses travel unencrypted", err=True, fg="yellow")
    if settings.shared_secret and not running.tls:
        typer.secho("warning: the shared secret is sent in plaintext without TLS", err=True, fg="yellow")
    fingerprint = running.tls.fingerprint if running.tls else None
    auth = bool(settings.shared_secret)
    advertisement = (
        None if no_bonjour else advertise(host, running.port, tls_fingerprint=fingerprint, auth=auth, name=name)
    )
    if group_engine is None:
        run_until_signalled(running)
    else:  # until a signal, or until the group is lost
        run_until_signalled(running, group_engine.lost)
    if advertisement is not None:
        advertisement.close()
    if group_engine is not None and group_engine.lost.is_set():
        exit_group_lost()
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
    settings = ClientSettings(server, not no_tls, ca, fingerprint, resolve_secret(secret, secret_file))
    try:
        with ImageServiceClient(settings) as client:
            yield client
    except grpc.RpcError as exc:
        fail(f"{exc.code().name}: {exc.details()}")
    except (TrustError, OSError, ValueError) as exc:
        fail(f"cannot connect to {server}: {exc}")


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
    """Ask which files exist in the server's model directory (one line per file); exits 1 unless all do."""
    with _connected(server, ca, fingerprint, no_tls, shared_secret, shared_secret_file) as client:
        checks = client.files_exist(files)
    for check in checks:
        status = "exists" if check.exists else f"refused ({check.error})" if check.error else "missing"
        typer.echo(f"{check.name}: {status}")
    if not all(check.exists for check in checks):
        raise typer.Exit(1)


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
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

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
    configure_blas()
    from convert import convert_checkpoint
    from mlx_sd.engine.backends import from_environment
    from mlx_sd.engine.errors import MlxSdError

    creates_folder = not destination.exists() and not destination.suffix
    try:
        written = convert_checkpoint(source, destination, dtype, vae_path=vae, reader=from_environment().reader)
    except (MlxSdError, ValueError) as exc:
        fail(str(exc))
    if creates_folder:
        typer.echo(f"created the cache folder {destination} (a name without a suffix is a folder)")
    typer.echo(f"wrote {written}")


_SIDE_HELP = (f"{{}} in pixels, a multiple of {SIDE_MULTIPLE} ({MIN_SIDE}-{MAX_SIDE}); 0: the model's native size "
              "(512 for SD 1.x and SD 2.x base, 768 for SD 2.x v, 1024 for SDXL).")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    negative: Annotated[str, typer.Option(help="What to keep out of the image (the negative prompt).")] = "",
    steps: Annotated[int, typer.Option(help=f"Sampling steps (1-{MAX_STEPS}).")] = DEFAULT_STEPS,
    sampler: Annotated[str, typer.Option(help="Sampler, any case, e.g. 'Euler a' (see the README).")] = DEFAULT_SAMPLER,
    seed: Annotated[int, typer.Option(help="Seed of the first image; image i uses seed+i. Negative: random.")] = -1,
    width: Annotated[int, typer.Option(help=_SIDE_HELP.format("Width"))] = 0,
    height: Annotated[int, typer.Option(help=_SIDE_HELP.format("Height"))] = 0,
    cfg: Annotated[
        float, typer.Option(help=f"Classifier-free guidance scale (0-{MAX_CFG_SCALE:g}).")
    ] = DEFAULT_CFG_SCALE,
    batch_size: Annotated[int, typer.Option(help=f"Images sampled together (1-{MAX_BATCH_SIZE}).")] = 1,
    batch_count: Annotated[int, typer.Option(help=f"Batches run one after another (1-{MAX_BATCH_COUNT}).")] = 1,
    model: Annotated[str, typer.Option(help="A checkpoint file or diffusers folder relative to the model directory "
                                            "(SD 1.x, SD 2.x or SDXL); empty: stable-diffusion/.")] = "",
    hires: Annotated[
        bool, typer.Option("--hires", help="Hires fix: sample at the model's native size, upscale, then refine.")
    ] = False,
    denoise: Annotated[
        float | None, typer.Option(help="Denoising strength (0-1): of the image to image (default 0.75), or of the "
                                        "hires second pass (default, and 0: 0.7).")
    ] = None,
    init_image: Annotated[
        Path | None, typer.Option(help="Start from this image (PNG, JPEG or WebP): image to image.", exists=True,
                                  dir_okay=False, readable=True)
    ] = None,
    mask: Annotated[
        Path | None, typer.Option(help="Inpaint: repaint where this image is white, keep where black (its alpha, "
                                       "if transparent).", exists=True, dir_okay=False, readable=True)
    ] = None,
    mask_blur: Annotated[int, typer.Option(help="Blur of the mask's edge, in pixels.")] = 4,
    mask_outset: Annotated[
        int, typer.Option(help="Grow the mask by this many pixels before the blur (negative: shrink it).")
    ] = 0,
    resize_mode: Annotated[
        ResizeChoice, typer.Option(help="How the init image is fitted to --width x --height.")
    ] = ResizeChoice.just,
    refiner: Annotated[
        str, typer.Option("--refiner", help="SDXL refiner file (relative to the model directory) that finishes "
                                            "the sampling.")
    ] = "",
    refiner_start: Annotated[
        float, typer.Option(help="Fraction of the denoising after which the refiner takes over (0-1; 0 means 0.7).")
    ] = 0.0,
    lora: Annotated[
        list[str] | None,
        typer.Option("--lora", help="A LoRA from the models' lora/ folder, as FILE or FILE:WEIGHT (-10 to 10, "
                                    "default 1); repeat for more. The prompt may add <lora:name:weight>."),
    ] = None,
    clip_skip: Annotated[
        int, typer.Option(help="Text-encoder layers to skip from the end, A1111's \"Clip skip\" (1: none).")
    ] = 1,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the PNGs (created when missing).", file_okay=False)
    ] = Path("."),
    models_dir: Annotated[
        Path | None,
        typer.Option(help="Folder of the models (local only).", show_default=models_dir_help(), file_okay=False),
    ] = None,
    dtype: DtypeOption = None,
    quantize: QuantizeOption = None,
    low_memory: LowMemoryOption = False,
    pad_attention_heads: PadAttentionHeadsOption = False,
    prediction_type: PredictionTypeOption = PredictionType.auto,
    cache_dir: CacheDirOption = None,
    no_cache: NoCacheOption = False,
    server: Annotated[
        str | None, typer.Option("--server", "-s", help="Generate on this server (host:port) instead of locally.")
    ] = None,
    ca: CaOption = None,
    fingerprint: FingerprintOption = None,
    no_tls: NoTlsOption = False,
    shared_secret: SecretOption = None,
    shared_secret_file: SecretFileOption = None,
) -> None:
    """Generate images locally, or on a server with --server; writes PNGs and prints their paths.

    An invalid value exits with status 2, any other failure with 1, Ctrl-C with 130.
    """
    configure_blas()
    from mlx_sd.app.generate import (
        encoded,
        follow,
        local_engine,
        lora_weights,
        option_error,
        validated_as_sent,
        write_images,
    )
    from mlx_sd.engine.errors import InvalidRequest, MlxSdError, ModelNotFound
    from mlx_sd.engine.request import GenerationRequest

    if server is None:
        misplaced, rule = {"--ca": ca, "--fingerprint": fingerprint, "--no-tls": no_tls}, "need --server"
    else:
        misplaced = {"--models-dir": models_dir, "--dtype": dtype, "--quantize": quantize, "--cache-dir": cache_dir,
                     "--no-cache": no_cache, "--low-memory": low_memory,
                     "--pad-attention-heads": pad_attention_heads,
                     "--prediction-type": prediction_type is not PredictionType.auto}
        rule = "apply to local generation only"
    if given := [name for name, value in misplaced.items() if value]:
        raise typer.BadParameter(f"{', '.join(given)}: {rule}")
    check_low_memory(low_memory, no_cache, quantize)
    try:
        request = validated_as_sent(GenerationRequest(
            prompt=prompt, negative_prompt=negative, width=width, height=height, steps=steps, cfg_scale=cfg,
            seed=seed, sampler=sampler, enable_hr=hires, batch_size=batch_size, batch_count=batch_count,
            denoising_strength=denoise if denoise is not None else DEFAULT_IMG2IMG_STRENGTH if init_image else 0.0,
            init_image=init_image.read_bytes() if init_image else b"", mask=mask.read_bytes() if mask else b"",
            mask_blur=mask_blur, mask_outset=mask_outset, resize_mode=list(ResizeChoice).index(resize_mode),
            loras=lora_weights(lora or []), clip_skip=clip_skip,
            model=model,
            refiner_model=refiner, refiner_start=refiner_start,
        ))
    except InvalidRequest as exc:
        fail(option_error(exc), code=2)

    root = models_dir or default_models_dir()
    try:
        out.mkdir(parents=True, exist_ok=True)  # before generating, so a bad --out fails fast
        if server is None:
            with local_engine(root, cache_folder(cache_dir, no_cache), dtype, quantize, low_memory,
                              pad_attention_heads, prediction_type.value) as engine:
                result = follow(engine(request), request)
        else:
            with _connected(server, ca, fingerprint, no_tls, shared_secret, shared_secret_file) as client:
                result = follow(client.generate(request), request)
        for path in write_images(encoded(result, request), out):
            typer.echo(path)
    except KeyboardInterrupt:
        fail("cancelled", code=130)
    except ModelNotFound as exc:
        fail(f"{exc} (in {root})")
    except (MlxSdError, OSError) as exc:
        fail(str(exc))


app.add_typer(config_app, name="config")
app.add_typer(service_app, name="service")
app.command("discover")(discover_command)
app.command("upscale")(upscale_command)
app.command("convert-pth")(convert_pth_command)
app.command("bench")(bench_command)
app.command("doctor", context_settings=SERVE_ARGS)(doctor_command)


if __name__ == "__main__":
    app()
