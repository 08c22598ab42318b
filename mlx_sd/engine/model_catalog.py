"""What the model directory holds that this server can use: SD checkpoints a request can name, and
the upscaler and face-restoration weights. For clients that list a server's models (Draw Things'
model browser).

Checkpoints are recognised from their safetensors header (or a diffusers folder's unet/config.json)
without reading tensor data. The work is bounded: at most MAX_ENTRIES folders and files are looked
at and MAX_HEADERS files opened, MAX_DEPTH folders deep (past a bound, the rest is left out).
Hidden entries (upload temporaries among them) are skipped, symlinked folders are not entered, and
a file reached through a symlink counts only when it stays inside the directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from convert.formats import read_header
from convert.keymaps import SINGLE_FILE_SECTIONS
from mlx_sd.engine.errors import MlxSdError
from mlx_sd.faces.restore import DETECTOR_FILE, RESTORER_FILE
from mlx_sd.engine.upscale import UPSCALER_FILE

MAX_ENTRIES = 4096  # folders and files looked at
MAX_HEADERS = 256  # checkpoint headers (or diffusers configs) read
MAX_DEPTH = 4  # folders below the model directory
MAX_HEADER_BYTES = 16 * 1024**2  # real SD-1 headers are ~100 KB
MAX_CONFIG_BYTES = 64 * 1024
SD1 = "v1"  # Draw Things' version string of SD 1.x models

_PREFIX = {network: prefix for prefix, network in SINGLE_FILE_SECTIONS.items()}
_UNET, _TEXT_ENCODER = _PREFIX["unet"], _PREFIX["text_encoder"]
_DIFFUSERS_UNET_CONFIG = Path("unet") / "config.json"


@dataclass(frozen=True)
class CatalogEntry:
    file: str  # relative to the model directory: what a client names in a request or FilesExist
    name: str  # a human name
    kind: str  # "model" | "upscaler" | "face_restorer"
    version: str  # Draw Things' model version ("v1" for SD 1.x); "" where it does not apply


def catalog(models_dir: Path) -> list[CatalogEntry]:
    """The SD-1 checkpoints of `models_dir` (sorted by file), then its upscaler and face restorer."""
    root = Path(models_dir).resolve()
    models = []
    for relative, version in _checkpoints(root):
        path = Path(relative)
        name = path.parent.name if path.stem == "model" and path.parent.name else path.stem
        models.append(CatalogEntry(relative, name, "model", version))
    entries = sorted(models, key=lambda entry: entry.file)
    if (root / UPSCALER_FILE).is_file():
        entries.append(CatalogEntry(UPSCALER_FILE, "Real-ESRGAN", "upscaler", ""))
    if (root / RESTORER_FILE).is_file() and (root / DETECTOR_FILE).is_file():
        entries.append(CatalogEntry(RESTORER_FILE, "GFPGAN", "face_restorer", ""))
    return entries


def _checkpoints(root: Path) -> Iterator[tuple[str, str]]:
    """(relative name, version) of each loadable checkpoint, within the bounds above."""
    restoration = {UPSCALER_FILE, RESTORER_FILE, DETECTOR_FILE}
    entries = headers = 0
    # os.walk does not enter symlinked folders; hidden folders are pruned in place.
    for folder, dirs, files in os.walk(root):
        relative_folder = Path(folder).relative_to(root)
        depth = len(relative_folder.parts)
        entries += 1
        if entries > MAX_ENTRIES:
            return
        if depth and _inside(root, Path(folder) / _DIFFUSERS_UNET_CONFIG):
            dirs[:] = []  # a diffusers folder is one model; its parts are not listed
            headers += 1
            if headers > MAX_HEADERS:
                return
            if _diffusers_version(Path(folder)):
                yield relative_folder.as_posix(), SD1
            continue
        dirs[:] = [d for d in sorted(dirs) if not d.startswith(".")] if depth < MAX_DEPTH else []
        for name in sorted(files):
            entries += 1
            if entries > MAX_ENTRIES:
                return
            relative = (relative_folder / name).as_posix()
            if name.startswith(".") or not name.endswith(".safetensors") or relative in restoration:
                continue
            path = Path(folder) / name
            if not _inside(root, path):
                continue
            headers += 1
            if headers > MAX_HEADERS:
                return
            if _single_file_version(path):
                yield relative, SD1


def _inside(root: Path, path: Path) -> bool:
    """Whether `path` is a file that stays inside `root` when symlinks are followed."""
    return path.is_file() and root in path.resolve().parents


def _single_file_version(path: Path) -> str:
    """"v1" for an original-layout SD-1 checkpoint (CLIP text encoder, 4-channel UNet with
    convolutional attention projections); "" for anything else, unreadable files included."""
    try:
        header = read_header(path, max_header_bytes=MAX_HEADER_BYTES)
    except (MlxSdError, OSError):
        return ""
    tensors = header.tensors
    conv_in = tensors.get(f"{_UNET}input_blocks.0.0.weight")
    proj_in = tensors.get(f"{_UNET}middle_block.1.proj_in.weight")
    if conv_in is None or proj_in is None or not any(key.startswith(_TEXT_ENCODER) for key in tensors):
        return ""
    return SD1 if len(conv_in.shape) == 4 and conv_in.shape[1] == 4 and len(proj_in.shape) == 4 else ""


def _diffusers_version(folder: Path) -> str:
    """"v1" for a diffusers folder whose UNet is SD-1's kind (4 input channels, convolutional
    attention projections, no added embeddings as SDXL has)."""
    path = folder / _DIFFUSERS_UNET_CONFIG
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            return ""
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""
    if not isinstance(config, dict):
        return ""
    sd1 = (config.get("in_channels") == 4 and not config.get("use_linear_projection")
           and config.get("addition_embed_type") is None)
    return SD1 if sd1 and (folder / "text_encoder").is_dir() else ""
