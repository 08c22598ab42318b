"""Textual inversion embeddings: `<models>/embeddings/<name>.safetensors`, used where a prompt
writes `name` (as A1111 matches them: by the name's tokens, case-insensitively) or, on purpose,
`embedding:name` (ComfyUI's reference, which fails the request when the file is absent).

A1111's safetensors form holds `emb_params`, (vectors, width); SDXL's holds `clip_l` and `clip_g`,
one per text encoder. A file with one tensor of a name none of these is read as that tensor. Only the files
whose name occurs in a prompt are read. Pickled embeddings (`.pt`, `.bin`) are never read.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from convert.formats import read_header
from mlx_sd.engine import prompt_weights
from mlx_sd.engine.errors import InvalidRequest, ModelNotFound
from mlx_sd.engine.model_hash import sha256_of
from mlx_sd.engine.model_names import file_in_folder
from mlx_sd.engine.tokenizer import WINDOW

EMBEDDINGS_DIR = "embeddings"
SUFFIX = ".safetensors"
MAX_FILES = 10_000  # bounds the folder listing a request pays for
# The tensor each text encoder takes, by the encoder's name in the model.
KEYS = {"text_encoder": ("emb_params", "clip_l"), "text_encoder_2": ("clip_g",)}


def referenced(models_dir: Path, prompts: list[str], width: int, encoder: str = "text_encoder",
               ) -> dict[str, np.ndarray]:
    """name -> (vectors, width) float32 of every embedding whose name occurs in `prompts`, and
    `embedding:name` -> its vectors for every one they reference explicitly.

    Raises ModelNotFound naming the file an explicit reference means when it is absent, InvalidRequest
    naming the file when its vectors do not fit the text encoder (another family's embedding) or
    exceed a 75-token window, CheckpointError for a file that is not safetensors (a pickle).
    """
    found = {}
    for written in dict.fromkeys(name for prompt in prompts for name in prompt_weights.references(prompt)):
        name, path = _reference(models_dir, written)
        found[prompt_weights.REFERENCE + name] = _vectors(path, width, encoder)
    folder = Path(models_dir) / EMBEDDINGS_DIR
    if not folder.is_dir():
        return found
    text = " ".join(prompts).lower()
    for n, path in enumerate(sorted(folder.glob("*" + SUFFIX))):
        if n == MAX_FILES:
            break
        if path.stem.lower() not in text or not path.is_file():
            continue
        found[path.stem] = _vectors(path, width, encoder)
    return found


def file_of(models_dir: Path, name: str) -> Path:
    """The file of an embedding `referenced` read, by its key there."""
    if name.startswith(prompt_weights.REFERENCE):
        return _reference(models_dir, name[len(prompt_weights.REFERENCE):])[1]
    return Path(models_dir) / EMBEDDINGS_DIR / (name + SUFFIX)


def short_hash(path: Path) -> str:
    """A1111's embedding hash: the first 12 hex digits of the SHA-256 of the whole file."""
    return sha256_of(path)[:12]


def _reference(models_dir: Path, name: str) -> tuple[str, Path]:
    """(name, file) of `embedding:name`: as ComfyUI, a name with trailing commas that no file has
    means the name without them."""
    try:
        return name, file_in_folder(models_dir, EMBEDDINGS_DIR, name, "prompt", "embedding")
    except ModelNotFound:
        if name.rstrip(",") in ("", name):
            raise
    name = name.rstrip(",")
    return name, file_in_folder(models_dir, EMBEDDINGS_DIR, name, "prompt", "embedding")


def _vectors(path: Path, width: int, encoder: str) -> np.ndarray:
    header = read_header(path)
    names = list(header.tensors)
    known = {k for keys in KEYS.values() for k in keys}
    key = next((k for k in KEYS[encoder] if k in names), names[0] if len(names) == 1 and not known & {*names} else None)
    shown = f"{EMBEDDINGS_DIR}/{path.name}"
    if key is None:
        raise InvalidRequest("prompt", f"{shown}: none of {', '.join(KEYS[encoder])} among its tensors {names[:8]}")
    vectors = np.array(mx.load(str(path))[key].astype(mx.float32))
    vectors = vectors.reshape(-1, vectors.shape[-1]) if vectors.ndim else vectors.reshape(1, 1)
    if vectors.shape[-1] != width:
        raise InvalidRequest("prompt", f"{shown}: {key!r} has vectors of width {vectors.shape[-1]}; this model's "
                                       f"text encoder takes {width} (an embedding for another model family?)")
    if not 1 <= len(vectors) <= WINDOW:
        raise InvalidRequest("prompt", f"{shown}: {len(vectors)} vectors; an embedding has 1 to {WINDOW}")
    return vectors
