"""The commands that work on local files and this machine rather than a server: `upscale`,
`convert-pth` and `bench` (registered on the app in cli.py). Heavy modules load inside them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlx_sd.app.options import DtypeOption, cache_folder, configure_blas, fail
from mlx_sd.app.paths import default_models_dir, models_dir_help


def upscale_command(
    image: Annotated[Path, typer.Argument(help="Image to upscale.", exists=True, dir_okay=False, readable=True)],
    scale: Annotated[
        float | None, typer.Option(help="Output size over input size; default: the network's own (e.g. 4).", min=0.1)
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="PNG to write; default: IMAGE_x<scale>.png beside it.",
                                  dir_okay=False)
    ] = None,
    models_dir: Annotated[
        Path | None, typer.Option(help="Folder of the models.", show_default=models_dir_help(), file_okay=False)
    ] = None,
) -> None:
    """Upscale an image with the Real-ESRGAN network in MODELS_DIR/upscaler/model.safetensors."""
    configure_blas()
    from mlx_sd.engine.backends import from_environment
    from mlx_sd.engine.errors import MlxSdError
    from mlx_sd.engine.upscale import UPSCALER_FILE, upscale_file

    try:
        written = upscale_file(image, out, (models_dir or default_models_dir()) / UPSCALER_FILE, scale,
                               from_environment())
    except (MlxSdError, OSError) as exc:
        fail(str(exc))
    typer.echo(f"wrote {written}")


def convert_pth_command(
    source: Annotated[Path, typer.Argument(help="Released PyTorch weights (.pth), e.g. GFPGANv1.4.pth.",
                                           exists=True, dir_okay=False)],
    destination: Annotated[Path, typer.Argument(help="The .safetensors file to write.", dir_okay=False)],
) -> None:
    """Convert upscaler / face-restoration .pth weights to safetensors (needs PyTorch; loads tensors only)."""
    from convert.pth import convert_pth
    from mlx_sd.engine.errors import MlxSdError

    try:
        written = convert_pth(source, destination)
    except MlxSdError as exc:
        fail(str(exc))
    typer.echo(f"wrote {written}")


def _sides(value: str | None) -> tuple[int, ...] | None:
    try:
        return None if value is None else tuple(int(side) for side in value.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected sides in pixels such as 512,1024, got {value!r}") from None


def bench_command(
    models_dir: Annotated[
        Path | None,
        typer.Option(help="Folder of the models; without a default model a random-weight SD 1.5 is measured.",
                     show_default=models_dir_help(), file_okay=False),
    ] = None,
    sizes: Annotated[
        str | None, typer.Option(help="Image sides to measure, comma-separated.", show_default="512,1024",
                                 callback=_sides)
    ] = None,
    steps: Annotated[int, typer.Option(help="Sampling steps of the measured image.", min=1)] = 20,
    dtype: DtypeOption = None,
    quick: Annotated[bool, typer.Option("--quick", help="One timed call per measurement, and 512 only "
                                                        "unless --sizes says otherwise.")] = False,
) -> None:
    """Measure this machine (UNet step, image, peak memory, fused attention, mx.compile) and print a
    Markdown block to paste into an issue (see docs/operations.md)."""
    configure_blas()
    from mlx_sd.engine import bench
    from mlx_sd.engine.backends import from_environment
    from mlx_sd.engine.errors import InvalidRequest, MlxSdError

    chosen = sizes or (bench.QUICK_SIZES if quick else bench.DEFAULT_SIZES)
    repeats = 1 if quick else bench.DEFAULT_REPEATS
    root = models_dir or default_models_dir()
    try:
        block = bench.bench(root, sizes=chosen, steps=steps, dtype=dtype, repeats=repeats, backend=from_environment(),
                            cache_dir=cache_folder(None, False), log=lambda line: typer.echo(line, err=True))
    except InvalidRequest as exc:
        fail(str(exc), code=2)
    except (MlxSdError, OSError) as exc:
        fail(str(exc))
    typer.echo(block)
