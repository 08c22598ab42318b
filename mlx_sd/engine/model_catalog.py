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

from convert.families import SDXL_REFINER, UNET_PREFIX, detect_diffusers, detect_single_file
from convert.formats import TEXT_ENCODERS, read_header
from mlx_sd.engine.errors import MlxSdError
from mlx_sd.faces.restore import DETECTOR_FILE, RESTORER_FILE
from mlx_sd.engine.upscale import UPSCALER_FILE

MAX_ENTRIES = 4096  # folders and files looked at
MAX_HEADERS = 256  # checkpoint headers (or diffusers configs) read
MAX_DEPTH = 4  # folders below the model directory
MAX_HEADER_BYTES = 16 * 1024**2  # real SD headers are ~100-200 KB
MAX_CONFIG_BYTES = 64 * 1024
_DIFFUSERS_UNET_CONFIG = Path("unet") / "config.json"


@dataclass(frozen=True)
class CatalogEntry:
    file: str  # relative to the model directory: what a client names in a request or FilesExist
    name: str  # a human name
    kind: str  # "model" | "upscaler" | "face_restorer"
    version: str  # Draw Things' model version ("v1", "v2", "sdxl_base_v0.9"); "" where it does not apply


def catalog(models_dir: Path) -> list[CatalogEntry]:
    """The checkpoints of `models_dir` (sorted by file), then its upscaler and face restorer."""
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
            if version := _diffusers_version(Path(folder)):
                yield relative_folder.as_posix(), version
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
            if version := _single_file_version(path):
                yield relative, version


def _inside(root: Path, path: Path) -> bool:
    """Whether `path` is a file that stays inside `root` when symlinks are followed."""
    return path.is_file() and root in path.resolve().parents


def _single_file_version(path: Path) -> str:
    """Draw Things' version of an original-layout checkpoint of a family served as a base model
    (SD 1.x, SD 2.x, SDXL; a refiner runs only as a second stage) with a 4-channel UNet; "" for
    anything else, unreadable files included."""
    try:
        header = read_header(path, max_header_bytes=MAX_HEADER_BYTES)
        family = detect_single_file(header.tensors, path)
    except (MlxSdError, OSError):
        return ""
    conv_in = header.tensors.get(f"{UNET_PREFIX}input_blocks.0.0.weight")
    if family is SDXL_REFINER or conv_in is None or len(conv_in.shape) != 4 or conv_in.shape[1] != 4:
        return ""
    return family.draw_things_version


def _diffusers_version(folder: Path) -> str:
    """Draw Things' version of a diffusers folder of a family served as a base model whose UNet takes
    4 input channels; "" for anything else."""
    try:
        unet = _small_json(folder / _DIFFUSERS_UNET_CONFIG)
        text_encoders = {name: _small_json(folder / name / "config.json") for name in TEXT_ENCODERS
                         if (folder / name).is_dir()}
        family = detect_diffusers(unet, text_encoders, folder)
    except (MlxSdError, OSError, ValueError):
        return ""
    if family is SDXL_REFINER or unet.get("in_channels") != 4:
        return ""
    return family.draw_things_version


def _small_json(path: Path) -> dict:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is larger than a config")
    config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    return config
