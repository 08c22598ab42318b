"""Checkpoint files on disk: safetensors headers, pickle refusal, and where each network's file is.

Only safetensors is ever read. Pickle-based formats can run arbitrary code when loaded, so they are
refused by name and, for files that claim to be safetensors, by their first bytes. Draw Things'
own `.ckpt` files are SQLite databases of its tensors, recognised by their header and refused with
a message that says what to use instead.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from mlx_sd.engine.errors import CheckpointError, ModelNotFound, UnsupportedModelFormat
from mlx_sd.engine.model_names import PICKLE_SUFFIXES

SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database
# A safetensors header is JSON; real SD headers are ~100 KB, so anything huge is not one.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# Bytes per value of each dtype the safetensors format defines.
ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
              "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}

# Folder names of the model-directory layout and of a diffusers pipeline folder.
SINGLE_FILE_DIR = "stable-diffusion"
VAE_DIR = "vae"
MODEL_FILE = "model.safetensors"  # the file name in both folders of a model directory
DIFFUSERS_WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors"),
    "text_encoder_2": ("model.safetensors", "model.fp16.safetensors"),
}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    # Where the tensor's bytes lie in the file, checked to be inside its data section.
    start: int
    stop: int
    # For a part of a stored tensor (rows along its first axis): the first row's index there.
    row_offset: int = 0

    def rows(self, index: int, count: int) -> TensorInfo:
        """Part `index` of `count` equal parts along the first axis (a fused tensor's pieces)."""
        rows = self.shape[0] // count
        row_bytes = (self.stop - self.start) // max(self.shape[0], 1)
        start = self.start + index * rows * row_bytes
        return TensorInfo(self.dtype, (rows, *self.shape[1:]), start, start + rows * row_bytes,
                          self.row_offset + index * rows)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    raw: bytes  # the JSON bytes, hashed for the cache fingerprint
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def is_sqlite(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:  # absent or unreadable: whoever opens it reports that
        return False


def refuse_pickle(path: Path) -> None:
    """Refuses the formats that are never read: Draw Things databases, then pickles by name."""
    if is_sqlite(path):
        raise UnsupportedModelFormat(
            f"{path.name} is a Draw Things model (an SQLite database of its own tensors), a format that is "
            "not read; put the model's single-file .safetensors checkpoint in the model directory and "
            "name that file instead"
        )
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path} is a pickle checkpoint ({path.suffix}); pickle files can run code when loaded, "
            "so they are refused. Convert it to .safetensors with a trusted tool first."
        )


def _describe_magic(head: bytes) -> str | None:
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (PyTorch's pickle-based .pt/.ckpt format)"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "a Python pickle"
    return None


def read_header(path: Path, max_header_bytes: int = _MAX_HEADER_BYTES) -> SafetensorsHeader:
    """Parse a safetensors header (of at most `max_header_bytes`) without reading any tensor data."""
    refuse_pickle(path)
    if not path.is_file():
        raise ModelNotFound(str(path), "checkpoint file not found")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if (kind := _describe_magic(head)) is not None:
            raise CheckpointError(f"{path} is {kind}, not safetensors; pickle data is never loaded")
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, max_header_bytes):
            raise CheckpointError(f"{path} is not a safetensors file (bad header length {length})")
        raw = f.read(length)
    try:
        entries = json.loads(raw, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a safetensors file (unreadable header: {e})") from None
    except RecursionError:
        raise CheckpointError(f"{path} is not a safetensors file (its header nests too deeply)") from None
    if not isinstance(entries, dict):
        raise CheckpointError(f"{path} is not a safetensors file (header is not a JSON object)")
    metadata = entries.pop("__metadata__", None) or {}
    data_start = 8 + length
    try:
        tensors = {k: _tensor_info(v, data_start, size) for k, v in entries.items()}
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} has a malformed safetensors header ({e})") from None
    return SafetensorsHeader(path, raw, tensors, metadata)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number a header may hold")


def _tensor_info(entry: object, data_start: int, file_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise TypeError(f"a tensor entry is {type(entry).__name__}, not an object")
    dtype = entry["dtype"]
    if dtype not in ITEM_BYTES:
        raise ValueError(f"unknown dtype {str(dtype)[:20]!r}")
    offsets = _sizes(entry["data_offsets"], "data_offsets")
    if len(offsets) != 2:
        raise ValueError("data_offsets must be two integers")
    begin, end = offsets
    shape = _sizes(entry["shape"], "shape")
    if not 0 <= begin <= end <= file_size - data_start:
        raise ValueError(f"data offsets {begin}..{end} outside the {file_size - data_start}-byte data section")
    if math.prod(shape) * ITEM_BYTES[dtype] != end - begin:
        raise ValueError(f"shape {list(shape)[:8]} of {dtype} does not fill its {end - begin} bytes")
    return TensorInfo(dtype, shape, data_start + begin, data_start + end)


def _sizes(values: object, field: str) -> tuple[int, ...]:
    """Non-negative integers (not bools or floats), at most 8 of them."""
    if not isinstance(values, list) or len(values) > 8:
        raise ValueError(f"{field} must be a list of at most 8 integers")
    if not all(type(v) is int and 0 <= v < 2**63 for v in values):
        raise ValueError(f"{field} must hold non-negative integers")
    return tuple(values)


@dataclass(frozen=True)
class CheckpointLayout:
    """Which file holds which network. `single_file` holds all three unless a folder form is used."""

    single_file: Path | None = None
    diffusers: dict[str, Path] | None = None  # network -> weights file; its config.json sits beside it
    vae_override: Path | None = None

    @property
    def files(self) -> list[Path]:
        files = [self.single_file] if self.single_file else list((self.diffusers or {}).values())
        if self.vae_override is not None:
            files.append(self.vae_override)
        return files


def _diffusers_weights(folder: Path, network: str) -> Path:
    sub = folder / network
    for name in DIFFUSERS_WEIGHT_NAMES[network]:
        if (sub / name).is_file():
            return sub / name
    pickles = sorted(p.name for p in sub.glob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        refuse_pickle(sub / pickles[0])
    raise CheckpointError(f"diffusers folder {folder}: no {' or '.join(DIFFUSERS_WEIGHT_NAMES[network])} in {sub}")


def find_layout(source: Path, vae_path: Path | None = None) -> CheckpointLayout:
    """Locate the weights of a model given a file, a diffusers folder or a model directory.

    A model directory holds `stable-diffusion/` (a single file `model.safetensors` or a diffusers
    folder) and optionally `vae/model.safetensors`, which replaces the checkpoint's VAE.
    """
    if not source.exists():
        raise ModelNotFound(str(source), "model not found")
    if vae_path is not None and not vae_path.is_file():
        raise ModelNotFound(str(vae_path), "VAE file not found")
    if source.is_file():
        refuse_pickle(source)
        return CheckpointLayout(single_file=source, vae_override=vae_path)
    if (source / "unet").is_dir():
        # An overridden VAE need not be present in the folder; the text encoders present depend on
        # the family (convert.families.detect_diffusers checks them).
        networks = {n: _diffusers_weights(source, n) for n in DIFFUSERS_WEIGHT_NAMES
                    if not (n == "vae" and vae_path) and (n not in TEXT_ENCODERS or (source / n).is_dir())}
        return CheckpointLayout(diffusers=networks, vae_override=vae_path)
    inner = source / SINGLE_FILE_DIR
    if inner.is_dir():
        standalone_vae = source / VAE_DIR / MODEL_FILE
        vae = vae_path or (standalone_vae if standalone_vae.is_file() else None)
        single_file = inner / MODEL_FILE
        if not (single_file.exists() or (inner / "unet").is_dir()):  # whatever else lies there is not the model
            raise ModelNotFound(str(single_file), f"model file not found (nor a diffusers folder in {inner})")
        return find_layout(single_file if single_file.exists() else inner, vae)
    pickles = sorted(p for p in source.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        refuse_pickle(pickles[0])
    raise CheckpointError(
        f"no checkpoint in {source}: expected {SINGLE_FILE_DIR}/{MODEL_FILE} "
        "or a diffusers folder with unet/, vae/ and text_encoder/ (and/or text_encoder_2/)"
    )


def read_config(weights_file: Path) -> dict:
    """The diffusers/transformers config.json beside a weights file."""
    path = weights_file.parent / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"diffusers folder is missing {path}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
