"""The loaded model of a model directory: kept between requests, reloaded when its files change."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from convert.assemble import SD1Configs, SD1Models
from convert.formats import MODEL_FILE, SINGLE_FILE_DIR, CheckpointLayout, find_layout
from convert.loader import load_sd1
from mlx_sd.errors import ModelNotFound
from mlx_sd.models.quantize import quantize
from mlx_sd.reloading import ReloadingValue
from mlx_sd.tokenizer import CLIPTokenizer, default_tokenizer

log = logging.getLogger(__name__)

CHECKPOINT = f"{SINGLE_FILE_DIR}/{MODEL_FILE}"
_HASH_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class LoadedModel:
    models: SD1Models
    tokenizer: CLIPTokenizer
    name: str  # shown in each image's parameters
    hash: str  # A1111's short model hash: the first 10 hex digits of the checkpoint's SHA-256


class ModelStore:
    """Loads `<models_dir>/stable-diffusion/` (single file or diffusers folder) and the optional
    `<models_dir>/vae/model.safetensors`, and loads again when any of those files changes."""

    def __init__(self, models_dir: Path, *, dtype: mx.Dtype | str | None = None,
                 cache_dir: Path | None = None, configs: SD1Configs | None = None,
                 quantize_bits: int | None = None) -> None:
        self._models_dir = Path(models_dir)
        self._dtype = dtype
        self._quantize_bits = quantize_bits
        self._cache_dir = cache_dir
        self._configs = configs
        self._loaded = ReloadingValue(lambda: self._layout().files, self._load)

    @property
    def models_dir(self) -> Path:
        return self._models_dir

    def get(self) -> LoadedModel:
        return self._loaded.get()

    def _layout(self) -> CheckpointLayout:
        if not (self._models_dir / SINGLE_FILE_DIR).exists():
            raise ModelNotFound(CHECKPOINT, "model file not found in the model directory")
        return find_layout(self._models_dir)

    def _load(self) -> LoadedModel:
        started = time.monotonic()
        models = load_sd1(self._models_dir, dtype=self._dtype, cache_dir=self._cache_dir, configs=self._configs)
        if self._quantize_bits is not None:  # the VAE is all convolutions, which MLX cannot quantize
            for network in (models.unet, models.text_encoder):
                quantize(network, self._quantize_bits)
        layout = self._layout()
        # A single file is named by its stem, as A1111 does; a diffusers folder by the UNet's file.
        checkpoint = layout.single_file or layout.diffusers["unet"]
        name = checkpoint.stem if layout.single_file else SINGLE_FILE_DIR
        tokenizer_dir = self._models_dir / SINGLE_FILE_DIR / "tokenizer"
        tokenizer = CLIPTokenizer.from_folder(tokenizer_dir) if tokenizer_dir.is_dir() else default_tokenizer()
        log.info("loaded %s%s in %.1f s", checkpoint,
                 f" with VAE {layout.vae_override}" if layout.vae_override else "", time.monotonic() - started)
        return LoadedModel(models, tokenizer, name, _short_hash(checkpoint))


def _short_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:10]
