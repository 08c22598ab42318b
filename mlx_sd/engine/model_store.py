"""The loaded model: kept between requests, switched when a request names another, reloaded when
its files change.

A request names its model by a path relative to the model directory: a single-file SD-1 checkpoint
(`my_model.safetensors`, `stable-diffusion/model.safetensors`) or a diffusers folder. "" is the
default model, `stable-diffusion/` (single file or diffusers folder). The directory's optional
`vae/model.safetensors` replaces the VAE of every model. One model is held at a time: switching
frees the previous one before the next is read, so memory peaks at one model.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from convert.assemble import ModelNetworks, NetworkConfigs
from convert.families import SD2, SD2_V_NATIVE_SIZE
from convert.formats import MODEL_FILE, SINGLE_FILE_DIR, VAE_DIR, CheckpointLayout, find_layout
from convert.cache import cache_entry, lazy_network_weights
from convert.loader import load_networks, resolve_dtype
from mlx_sd.engine.backends import Backend, choose, from_environment
from mlx_sd.engine import prediction
from mlx_sd.engine.errors import CheckpointError, InvalidRequest, ModelNotFound
from mlx_sd.engine.lora_merge import LoraMerger, unet_levels
from mlx_sd.engine.model_hash import short_model_hash
from mlx_sd.engine.model_names import name_problem, shown_name
from mlx_sd.models.layers import pad_attention_heads
from mlx_sd.models.quantize import quantize
from mlx_sd.engine.reloading import ReloadingValue
from mlx_sd.engine.tokenizer import EOS_TOKEN, OPEN_CLIP_PAD_TOKEN, CLIPTokenizer, default_tokenizer

log = logging.getLogger(__name__)

CHECKPOINT = f"{SINGLE_FILE_DIR}/{MODEL_FILE}"


@dataclass(frozen=True)
class LoadedModel:
    models: ModelNetworks
    tokenizer: CLIPTokenizer
    name: str  # shown in each image's parameters
    hash: str  # A1111's short model hash: the first 10 hex digits of the checkpoint's SHA-256
    activation_dtype: mx.Dtype  # what the networks are fed and compute in (see Backend.activation_dtype)
    # Low-memory mode: frees the text encoder's weights, which are read again when next used.
    release_text_encoder: Callable[[], None] | None = None
    tokenizer_2: CLIPTokenizer | None = None  # SDXL's second text encoder's (it pads with "!")
    prediction: str = prediction.EPSILON  # what the UNet predicts (mlx_sd.engine.prediction)
    native_size: int = 512  # the side of the images the model was trained on
    # The LoRAs merged into its weights (mlx_sd.engine.lora_merge), made with it.
    loras: LoraMerger = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        networks = {name: getattr(self.models, name) for name in ("unet", "text_encoder", "text_encoder_2")}
        networks = {name: network for name, network in networks.items() if network is not None}
        object.__setattr__(self, "loras", LoraMerger(networks, unet_levels(self.models.unet)))


@dataclass(frozen=True)
class ModelSource:
    """What `load_networks` reads for one model: a single file or a diffusers folder, and the VAE that
    replaces its own (None: its own)."""

    path: Path
    vae: Path | None

    def layout(self) -> CheckpointLayout:
        return find_layout(self.path, self.vae)


class ModelStore:
    """Loads the model a request names (see the module's docstring), and loads it again when any of
    its files changes. Called from the one generation thread, which serialises requests.

    `low_memory` keeps the text encoder's weights (~250 MB in fp16) out of memory between prompt
    encodings: they are read back from the converted cache for each request and freed after it.
    It needs the cache, and leaves the text encoder unquantized.

    `backend` runs the networks (mlx_sd.engine.backends): each is prepared for it once loaded and
    quantized. By default `MLX_SD_BACKEND` picks it, read once here.

    `prediction_type` ("auto", "epsilon" or "v") is what every model's UNet predicts; "auto"
    decides per model (mlx_sd.engine.prediction).
    `pad_attention_heads` zero-pads the networks' attention heads to a size MLX's fused Metal
    kernel takes (mlx_sd.models.layers.attention; exact). The CPU backend's attention ignores it.
    """

    def __init__(self, models_dir: Path, *, dtype: mx.Dtype | str | None = None,
                 cache_dir: Path | None = None, configs: NetworkConfigs | None = None,
                 quantize_bits: int | None = None, low_memory: bool = False,
                 backend: Backend | str | None = None, pad_attention_heads: bool = False,
                 prediction_type: str = "auto") -> None:
        if prediction_type not in prediction.SETTINGS:
            raise ValueError(f"prediction type must be one of {', '.join(prediction.SETTINGS)}, got {prediction_type!r}")
        self._prediction_type = prediction_type
        if low_memory and cache_dir is None:
            raise ValueError("low-memory mode reads the text encoder back from the converted-weights cache; "
                             "it cannot be used without the cache")
        if low_memory and quantize_bits is not None:
            raise ValueError("low-memory mode and quantization cannot be combined: the text encoder is read "
                             "back unquantized from the cache")
        self._low_memory = low_memory
        self._backend = from_environment() if backend is None else choose(backend)
        self._models_dir = Path(models_dir)
        self._dtype = dtype
        self._quantize_bits = quantize_bits
        self._cache_dir = cache_dir
        self._configs = configs
        self._pad_attention_heads = pad_attention_heads
        self._current: tuple[ModelSource, ReloadingValue[LoadedModel]] | None = None

    @property
    def models_dir(self) -> Path:
        return self._models_dir

    @property
    def backend(self) -> Backend:
        return self._backend

    def sibling(self) -> ModelStore:
        """A store of the same settings with a slot of its own: SDXL's refiner, held beside the base."""
        other = copy.copy(self)
        other._current = None
        return other

    def get(self, model: str = "") -> LoadedModel:
        """The model named `model` ("" the default), loaded if another one (or none) is held.

        Raises InvalidRequest for a name that leads outside the model directory, ModelNotFound for
        one that is not there, and CheckpointError (UnsupportedModelFormat for a Draw Things
        database) for a file that cannot be read.
        """
        source = self._source(model)
        if self._current is None or self._current[0] != source:
            source.layout()  # a name that cannot be loaded (a refused format) keeps the held model
            self._current = None  # free the previous model before the next one is read
            mx.clear_cache()
            # A checkpoint that cannot be used stays refused until its files change, so a 100 MB
            # header is not parsed again for every request.
            loaded = ReloadingValue(lambda: source.layout().files, lambda: self._load(source),
                                    remembered=(CheckpointError,))
            self._current = (source, loaded)
        return self._current[1].get()

    def _source(self, model: str) -> ModelSource:
        # Resolved, so that the default model and the same checkpoint named by its path are one.
        root = self._models_dir.resolve()
        standalone_vae = root / VAE_DIR / MODEL_FILE
        vae = standalone_vae.resolve() if standalone_vae.is_file() else None
        if not model:
            if not (root / SINGLE_FILE_DIR).exists():
                raise ModelNotFound(CHECKPOINT, "model file not found in the model directory")
            layout = find_layout(root)
            return ModelSource((layout.single_file or root / SINGLE_FILE_DIR).resolve(), vae)
        if (problem := name_problem(model)) is not None:
            raise InvalidRequest("model", f"{shown_name(model)!r} {problem}")
        path = Path(os.path.realpath(root / model))
        if root not in path.parents:
            raise InvalidRequest("model", f"{model!r} leads outside the model directory")
        if not path.exists():
            raise ModelNotFound(model, "model file not found in the model directory")
        return ModelSource(path, vae)

    def _load(self, source: ModelSource) -> LoadedModel:
        started = time.monotonic()
        models = load_networks(source.path, dtype=self._dtype, vae_path=source.vae, cache_dir=self._cache_dir,
                               configs=self._configs, reader=self._backend.reader)
        layout = source.layout()
        predicts = prediction.decide(self._prediction_type, layout, models.unet, models.family.name)
        if self._quantize_bits is not None:  # the VAE is all convolutions, which MLX cannot quantize
            for name, network in models.networks().items():
                if name != "vae":
                    quantize(network, self._quantize_bits)
        for network in models.networks().values():
            pad_attention_heads(network, self._pad_attention_heads)
        models = self._backend.prepare_models(models)
        release = self._text_encoder_release(models, source) if self._low_memory else None
        # A single file is named by its stem, as A1111 does; a diffusers folder by its folder's name.
        checkpoint = layout.single_file or layout.diffusers["unet"]
        folder = source.path.parent if layout.single_file else source.path
        name = checkpoint.stem if layout.single_file else folder.name
        tokenizers = {network: _tokenizer(folder / network.replace("text_encoder", "tokenizer"), kind)
                      for network, kind in models.family.text_encoders.values()}
        model_hash = short_model_hash(checkpoint, self._cache_dir)
        log.info("loaded %s (%s)%s in %.1f s", source.path, models.family.title,
                 f" with VAE {layout.vae_override}" if layout.vae_override else "", time.monotonic() - started)
        dtype = self._backend.activation_dtype(models.unet.conv_in.weight.dtype)
        # A single file does not say its training size; SD 2.x's v models are 768-v.
        v_single_file = models.family is SD2 and predicts == prediction.V and layout.single_file is not None
        native = SD2_V_NATIVE_SIZE if v_single_file else models.unet.config.sample_size * 8
        return LoadedModel(models, tokenizers.get("text_encoder"), name, model_hash, dtype, release,
                           tokenizers.get("text_encoder_2"), predicts, native)

    def _text_encoder_release(self, models: ModelNetworks, source: ModelSource) -> Callable[[], None] | None:
        """A function that swaps the text encoders' weights for unevaluated reads of the cache entry
        `load_networks` used, freeing their memory until they are next used; it is run once now."""
        dtype = resolve_dtype(self._dtype)
        entry = cache_entry(Path(self._cache_dir), source.layout(), dtype, self._configs)
        if not entry.is_file():
            log.warning("low-memory mode is off: the converted-weights cache %s could not be written", entry)
            return None

        def release() -> None:
            for name, network in models.networks().items():
                if name.startswith("text_encoder"):
                    network.load_weights(lazy_network_weights(entry, name, dtype), strict=True)

        release()
        return release


def _tokenizer(folder: Path, kind: str) -> CLIPTokenizer:
    """A diffusers folder's tokenizer, else the shipped vocabulary padded as the encoder's kind is
    (OpenCLIP's tokenizers pad with "!", OpenAI CLIP's with end-of-text)."""
    if folder.is_dir():
        return CLIPTokenizer.from_folder(folder)
    return default_tokenizer(OPEN_CLIP_PAD_TOKEN if kind == "open_clip" else EOS_TOKEN)
