"""Public entry points: load a model (SD 1.x, SD 2.x, SDXL) for inference, or convert it once for fast loads."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import mlx.core as mx

from convert.assemble import ModelNetworks, NetworkConfigs, assemble
from convert.cache import cache_entry, is_converted, is_fresh, read_converted, source_fingerprints, write_converted
from convert.formats import find_layout
from convert.reader import ReaderFactory, TensorReader
from mlx_sd.engine.errors import CheckpointError

log = logging.getLogger(__name__)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def resolve_dtype(dtype: mx.Dtype | str | None) -> mx.Dtype:
    """None picks fp16 on Metal and fp32 on CPU, where fp16 matmuls are slow and imprecise."""
    if dtype is None:
        return mx.float16 if mx.metal.is_available() else mx.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    return dtype


def load_networks(
    source: str | Path,
    *,
    dtype: mx.Dtype | str | None = None,
    vae_path: str | Path | None = None,
    configs: NetworkConfigs | None = None,
    cache_dir: str | Path | None = None,
    reader: ReaderFactory = TensorReader,
) -> ModelNetworks:
    """Load the networks of a model of any family (text encoders, UNet, VAE).

    `source` is a single-file checkpoint, a diffusers folder, a model directory
    (`stable-diffusion/` + optional `vae/model.safetensors`) or a file written by `convert_checkpoint`.
    `vae_path` replaces the checkpoint's VAE. `configs` overrides what would be read from the
    checkpoint. With `cache_dir`, a converted copy is reused while its sources are unchanged and
    (re)written otherwise. `reader` makes the tensor reader for the load (`mx.load`'s by default;
    the CPU backend's reads on every core, see mlx_sd.engine.backends).
    """
    source, dtype = Path(source), resolve_dtype(dtype)
    vae_path = Path(vae_path) if vae_path is not None else None
    if source.is_file() and is_converted(source):
        if vae_path is not None or configs is not None:
            raise CheckpointError(f"{source} is already converted; convert again to change its VAE or configs")
        return read_converted(source, dtype, reader)

    layout = find_layout(source, vae_path)
    if cache_dir is None:
        return assemble(layout, dtype, configs, reader)

    entry = cache_entry(Path(cache_dir), layout, dtype, configs)
    sources = source_fingerprints(layout)
    if is_fresh(entry, sources):
        return read_converted(entry, dtype, reader)
    models = assemble(layout, dtype, configs, reader)
    try:
        write_converted(models, entry, sources)
    except OSError as e:  # a cache that cannot be written only costs speed
        log.warning("could not write the converted-weights cache %s: %s", entry, e)
    return models


def convert_checkpoint(
    source: str | Path,
    destination: str | Path,
    dtype: mx.Dtype | str = "float32",
    *,
    vae_path: str | Path | None = None,
    configs: NetworkConfigs | None = None,
    reader: ReaderFactory = TensorReader,
) -> Path:
    """Write the MLX-layout weights of `source` and return the file written.

    A `destination` directory is used as a cache directory (the entry `load_networks(source,
    cache_dir=destination)` looks for), and so is a new name without a suffix, created as one;
    otherwise it names the `.safetensors` file to write.
    """
    source, destination, dtype = Path(source), Path(destination), resolve_dtype(dtype)
    vae_path = Path(vae_path) if vae_path is not None else None
    layout = find_layout(source, vae_path)
    created = not destination.exists() and not destination.suffix
    if not destination.is_dir() and not created and destination.suffix != ".safetensors":
        raise ValueError(
            f"destination must be a folder (an existing one, or a new name without a suffix) or a .safetensors "
            f"file, got {destination}"
        )
    if created:
        destination.mkdir(parents=True)
    try:
        target = cache_entry(destination, layout, dtype, configs) if destination.is_dir() else destination
        write_converted(assemble(layout, dtype, configs, reader), target, source_fingerprints(layout))
    except BaseException:
        if created:
            shutil.rmtree(destination, ignore_errors=True)
        raise
    return target
