"""Options and small helpers that several `mlx-sd` commands share."""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from grpc_service.auth import SHARED_SECRET_ENV, SecretError, resolve_shared_secret
from mlx_sd.app.paths import default_cache_dir

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
# serve's also answers to -s, as gRPCServerCLI's does (the client commands' -s is --server).
ServeSecretOption = Annotated[
    str | None,
    typer.Option(
        "--shared-secret",
        "-s",
        envvar=SHARED_SECRET_ENV,
        show_envvar=True,
        help="Shared secret clients must send (as `authorization: Bearer <secret>`, or in Draw Things' "
        "sharedSecret field). Prefer the env var or a file: flags show in `ps`.",
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
CacheDirOption = Annotated[
    Path | None,
    typer.Option(
        help="Where converted weights are cached so later starts load faster.",
        show_default="the user cache folder's mlx-sd/converted",
        file_okay=False,
    ),
]
NoCacheOption = Annotated[bool, typer.Option("--no-cache", help="Convert weights on every load; cache nothing.")]


class WeightsDtype(StrEnum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


def _quantize_bits(value: int | None) -> int | None:
    if value is not None and value not in (4, 8):
        raise typer.BadParameter(f"must be 8 or 4, got {value}")
    return value


QuantizeOption = Annotated[
    int | None,
    typer.Option(
        "--quantize",
        help="Quantize the UNet's and text encoder's linear layers to 8 or 4 bits (less memory, small loss).",
        callback=_quantize_bits,
    ),
]
LowMemoryOption = Annotated[
    bool,
    typer.Option(
        "--low-memory",
        help="Free the text encoder (~250 MB in fp16) after each prompt encoding; it is read back from the "
        "converted cache for the next request. Needs the cache; not with --quantize.",
    ),
]


class PredictionType(StrEnum):
    auto = "auto"
    epsilon = "epsilon"
    v = "v"


PredictionTypeOption = Annotated[
    PredictionType,
    typer.Option(
        help="What every model's UNet predicts: auto decides per model (a sidecar .yaml or scheduler config, "
        "else A1111's test for SD 2.x, else epsilon); epsilon or v force it (docs/models.md).",
    ),
]
PadAttentionHeadsOption = Annotated[
    bool,
    typer.Option(
        "--pad-attention-heads",
        help="Zero-pad the networks' attention heads to a size MLX's fused Metal kernel takes (SD 1.x: "
        "40 -> 64). Exact; whether it is faster is measured by `mlx-sd bench`. No effect on the CPU backend.",
    ),
]
DtypeOption = Annotated[
    WeightsDtype | None,
    typer.Option(
        help="How the model's weights are held in memory. On the CPU the work is done in float32, except that "
        "bfloat16 weights also make matrix products bfloat16 where the processor has bf16 units (fastest).",
        show_default="float16 on Metal, float32 on CPU",
    ),
]


def check_low_memory(low_memory: bool, no_cache: bool, quantize: int | None) -> None:
    if low_memory and no_cache:
        raise typer.BadParameter("--low-memory needs the cache (drop --no-cache)")
    if low_memory and quantize is not None:
        raise typer.BadParameter("--low-memory and --quantize don't combine")


def fail(message: str, code: int = 1) -> NoReturn:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def parse_size(text: str) -> int:
    """Bytes from "8GiB", "512M", "1048576" (K/M/G are binary multiples, like KiB/MiB/GiB)."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    unit = match and _SIZE_UNITS.get(match.group(2).lower())
    if not match or unit is None:
        raise typer.BadParameter(f"expected a size such as 8GiB, 512MiB or a number of bytes, got {text!r}")
    return int(match.group(1)) * unit


def cache_folder(cache_dir: Path | None, no_cache: bool) -> Path | None:
    return None if no_cache else cache_dir or default_cache_dir()


def resolve_secret(value: str | None, file: Path | None) -> str | None:
    try:
        return resolve_shared_secret(value, file)
    except SecretError as exc:
        raise typer.BadParameter(str(exc)) from exc


def configure_blas() -> None:
    """Load the fast BLAS before anything imports mlx.core (see mlx_sd.cpu.runtime)."""
    from mlx_sd.cpu.runtime import configure

    configure()
