"""The rules for a file name a client gives relative to the model directory (a request's model,
FilesExist, uploads). `name_problem` is pure: where a name leads through symlinks is checked by
whoever opens it, as `file_in_folder` does for the files a request names in one folder (LoRAs,
embeddings).
"""

from __future__ import annotations

import os
from pathlib import Path, PureWindowsPath

from mlx_sd.engine.errors import InvalidRequest, ModelNotFound

# Pickle checkpoints, refused everywhere (convert.formats); defined here, where no import loads MLX.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
MAX_NAME_CHARS = 1024
MAX_COMPONENT_BYTES = 255  # the usual file-system limit for one path component


def name_problem(name: str) -> str | None:
    """Why `name` is refused ("is empty", "contains '..'", ...), or None when it is acceptable."""
    if not name:
        return "is empty"
    if "\0" in name:
        return "contains a NUL character"
    if len(name) > MAX_NAME_CHARS:
        return f"is longer than {MAX_NAME_CHARS} characters"
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        return "is absolute; names are relative to the model directory"
    components = name.split("/")
    # A backslash is an ordinary character here, but a client on Windows may mean a separator.
    if ".." in components or ".." in name.split("\\"):
        return "contains '..'"
    if any(c in ("", ".") for c in components):
        return "has an empty or '.' component"
    if any(len(c.encode()) > MAX_COMPONENT_BYTES for c in components):
        return f"has a component longer than {MAX_COMPONENT_BYTES} bytes"
    return None


def shown_name(name: str) -> str:
    """`name` cut to fit in a message."""
    return name if len(name) <= MAX_NAME_CHARS else name[:64] + "..."


def file_in_folder(models_dir: Path, folder: str, name: str, field: str, kind: str) -> Path:
    """The file `name` means in `<models>/<folder>/`: `.safetensors`, which the name may leave out (a
    pickle's suffix is kept, so that reading refuses it as one). InvalidRequest naming `field` for
    a refused name or one that leads outside the folder; ModelNotFound naming `<folder>/<file>`,
    "`kind` file not found", when it is absent."""
    if (problem := name_problem(name)) is not None:
        raise InvalidRequest(field, f"{shown_name(name)!r} {problem}")
    root = (Path(models_dir) / folder).resolve()
    file = name if Path(name).suffix.lower() in (".safetensors", *PICKLE_SUFFIXES) else name + ".safetensors"
    path = Path(os.path.realpath(root / file))
    if root not in path.parents:
        raise InvalidRequest(field, f"{name!r} leads outside the {kind} folder")
    if not path.is_file():
        raise ModelNotFound(f"{folder}/{file}", f"{kind} file not found")
    return path
