"""Converted MLX weights on disk, so later loads skip conversion.

A converted file is safetensors in MLX layout, keys `<network>.<our name>`, whose metadata records
the format version, the dtype, the configs and a fingerprint of every source file. As a cache entry
it is trusted only while all recorded fingerprints still match the sources; it is written to a
temporary name and renamed into place, so a crash never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from convert.assemble import MODEL_TYPES, ModelNetworks, NetworkConfigs
from convert.families import FAMILIES, SD1
from convert.formats import CheckpointLayout, read_header
from convert.reader import ReaderFactory, Request, TensorReader
from mlx_sd.engine.errors import CheckpointError

FORMAT = "mlx-sd-sd1"
FORMAT_VERSION = "1"

# The fingerprint hashes the header (names, shapes, offsets) plus this many evenly spaced blocks of
# tensor data: ~1 MiB read instead of hashing 2 GB, yet a different fine-tune of the same layout
# (same header, same size, perhaps a preserved mtime) still changes it.
_SAMPLE_BLOCKS = 16
_SAMPLE_BYTES = 64 * 1024


def fingerprint(path: Path) -> dict[str, Any]:
    """Identity of a safetensors source file: resolved path, size, mtime_ns and a content hash of
    its whole header and sampled blocks of its data."""
    return file_fingerprint(path, read_header(path).raw)


def file_fingerprint(path: Path, header: bytes = b"") -> dict[str, Any]:
    """Identity of any file: resolved path, size, mtime_ns and a hash of `header` (hashed whole)
    plus evenly spaced sampled blocks of the file."""
    stat = path.stat()
    digest = hashlib.sha256(header)
    digest.update(str(stat.st_size).encode())
    with path.open("rb") as f:
        for i in range(_SAMPLE_BLOCKS):
            f.seek(stat.st_size * i // _SAMPLE_BLOCKS)
            digest.update(f.read(_SAMPLE_BYTES))
    return {
        "path": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256_sampled": digest.hexdigest(),
    }


def source_fingerprints(layout: CheckpointLayout) -> list[dict[str, Any]]:
    """Every file the conversion reads: the weights, and the config.json beside a diffusers folder's
    or a standalone VAE's (hashed whole: a changed config, say the VAE's force_upcast, is a new model)."""
    configs = dict.fromkeys(path.parent / "config.json" for path in layout.files if path != layout.single_file)
    return [fingerprint(path) for path in layout.files] + [
        file_fingerprint(config, config.read_bytes()) for config in configs if config.is_file()]


def is_converted(path: Path) -> bool:
    return path.suffix == ".safetensors" and read_header(path).metadata.get("format") == FORMAT


def cache_entry(cache_dir: Path, layout: CheckpointLayout, dtype: mx.Dtype, configs: NetworkConfigs | None) -> Path:
    """The entry's name depends on which files are read (however the model was named: a model
    directory, its checkpoint file, a diffusers folder) and what was asked for; whether it is
    still valid, on the files' contents."""
    request = {
        "sources": [str(path.resolve()) for path in layout.files],
        "dtype": dtype_name(dtype),
        "configs": (configs or NetworkConfigs()).to_dict(),
    }
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir / f"sd1-{key}.safetensors"


def is_fresh(entry: Path, sources: list[dict[str, Any]]) -> bool:
    """True when `entry` is a converted file of this format version made from exactly `sources`."""
    if not entry.is_file():
        return False
    try:
        metadata = read_header(entry).metadata
    except CheckpointError:
        return False
    return (
        metadata.get("format") == FORMAT
        and metadata.get("format_version") == FORMAT_VERSION
        and json.loads(metadata.get("sources", "null")) == sources
    )


def write_converted(models: ModelNetworks, path: Path, sources: list[dict[str, Any]]) -> None:
    """Save the model's networks atomically (temporary file, fsync, rename)."""
    arrays = {f"{n}.{k}": v for n, network in models.networks().items() for k, v in tree_flatten(network.parameters())}
    dtypes = {v.dtype for v in arrays.values()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": dtype_name(dtypes.pop()) if len(dtypes) == 1 else "mixed",
        "configs": json.dumps(models.configs.to_dict()),
        "family": models.family.name,
        "sources": json.dumps(sources),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # mx.save_safetensors appends ".safetensors" to names without it, so the temp name keeps it.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_converted(path: Path, dtype: mx.Dtype, reader: ReaderFactory = TensorReader) -> ModelNetworks:
    """Load a converted file, its tensors read with a `reader()`: no renaming or re-layout, only a
    cast when `dtype` differs."""
    header = read_header(path)
    metadata = header.metadata
    if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is not an mlx-sd converted file of format version {FORMAT_VERSION}; convert the source again"
        )
    configs = NetworkConfigs.from_dict(json.loads(metadata["configs"]))
    family = FAMILIES.get(metadata.get("family", SD1.name))
    if family is None:
        raise CheckpointError(f"{path}: converted file of an unknown model family {metadata['family']!r}")
    tensors = dict(header.tensors)
    tensor_reader, stream = reader(), mx.default_stream(mx.cpu)  # as stored: nothing to re-lay out
    models = {}
    for network in family.networks:
        model = MODEL_TYPES[network](getattr(configs, network))
        keys = [k for k in tensors if k.startswith(f"{network}.")]
        requests = [Request(path, k, tensors.pop(k), None, stream) for k in keys]
        arrays = dict(zip(keys, tensor_reader.read(requests)))
        weights = _take_network(arrays, network, dtype)
        try:
            model.load_weights(weights, strict=True)
        except ValueError as e:
            raise CheckpointError(f"{path}: damaged converted file ({network}: {e})") from None
        mx.eval(model.parameters())
        models[network] = model
    if tensors:
        raise CheckpointError(f"{path}: damaged converted file (unexpected keys: {sorted(tensors)[:10]})")
    return ModelNetworks(models.get("text_encoder"), models["unet"], models["vae"], models.get("text_encoder_2"),
                         family)


def _take_network(arrays: dict[str, mx.array], network: str, dtype: mx.Dtype) -> list[tuple[str, mx.array]]:
    """Pop one network's weights from a converted file's arrays, named as in the network."""
    prefix = f"{network}."
    return [(k[len(prefix):], arrays.pop(k).astype(dtype)) for k in list(arrays) if k.startswith(prefix)]


def lazy_network_weights(path: Path, network: str, dtype: mx.Dtype) -> list[tuple[str, mx.array]]:
    """One network's weights in a converted file, unevaluated: nothing is read until they are used."""
    return _take_network(mx.load(str(path)), network, dtype)


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")
