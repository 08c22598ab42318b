"""Model families (SD 1.x, SD 2.x, SDXL base, SDXL refiner): what tells them apart in a checkpoint and
what differs between them at load time. Detection reads only names (and a diffusers folder's
unet/config.json), never tensor data.

A single file (original LDM/SGM layout) is recognised by the prefix of its text encoder's keys; a
UNet with an added embedding (`label_emb`) belongs to the SDXL families only. A diffusers folder is
recognised by its text encoder folders and their configs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mlx_sd.engine.errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# The UNet key only the SDXL families have: the first layer of the added (text_time) embedding.
ADDED_EMBEDDING_KEY = f"{UNET_PREFIX}label_emb.0.0.weight"


@dataclass(frozen=True)
class Family:
    name: str  # "sd1" | "sd2" | "sdxl" | "sdxl_refiner"
    title: str  # for people
    # Single-file key prefix -> (network, text encoder kind: "clip" in transformers' names,
    # "open_clip" in OpenCLIP's), for the text encoders; the UNet and VAE prefixes are shared.
    text_encoders: dict[str, tuple[str, str]]
    # SD 2.x files carry OpenCLIP ViT-H's 24th layer, which the model never runs (it reads the
    # penultimate layer), and its unused text projection; diffusers' converter drops the layer,
    # and so are both dropped here.
    drops_last_text_layer: bool
    # UNet attention heads: SD 1.x has 8 per level; later families have 64-wide heads.
    unet_head_width: int | None
    vae_scaling_factor: float
    native_size: int  # the side of the images it was trained on (SD 2.x v-prediction: 768)
    draw_things_version: str  # Draw Things' model "version" string

    @property
    def networks(self) -> tuple[str, ...]:
        """The networks of a model of this family, text encoders first."""
        return (*sorted(network for network, _ in self.text_encoders.values()), "unet", "vae")

    @property
    def has_added_embedding(self) -> bool:
        return self.name.startswith("sdxl")


SD1 = Family("sd1", "SD 1.x", {"cond_stage_model.transformer.": ("text_encoder", "clip")}, False, None,
             0.18215, 512, "v1")
SD2 = Family("sd2", "SD 2.x", {"cond_stage_model.model.": ("text_encoder", "open_clip")}, True, 64,
             0.18215, 512, "v2")
SDXL = Family("sdxl", "SDXL", {"conditioner.embedders.0.transformer.": ("text_encoder", "clip"),
                               "conditioner.embedders.1.model.": ("text_encoder_2", "open_clip")},
              False, 64, 0.13025, 1024, "sdxl_base_v0.9")
SDXL_REFINER = Family("sdxl_refiner", "SDXL refiner", {"conditioner.embedders.0.model.": ("text_encoder_2", "open_clip")},
                      False, 64, 0.13025, 1024, "sdxl_refiner_v0.9")
FAMILIES = {family.name: family for family in (SD1, SD2, SDXL, SDXL_REFINER)}
# SD 2.x v-prediction models (768-v) were trained on 768x768 images.
SD2_V_NATIVE_SIZE = 768


def single_file_sections(family: Family) -> dict[str, str]:
    """Key prefix -> network of a single file of `family`."""
    sections = {UNET_PREFIX: "unet", VAE_PREFIX: "vae"}
    return sections | {prefix: network for prefix, (network, _) in family.text_encoders.items()}


def detect_single_file(keys: Iterable[str], path: Path | str) -> Family:
    """The family of an original-layout single file, from its key names.

    Raises CheckpointError for a file of no known family (listing the prefixes looked for) and
    for one that mixes families (naming a key of each)."""
    keys = list(keys)
    found: dict[str, str] = {}  # family -> a key of it
    for family in FAMILIES.values():
        for prefix in family.text_encoders:
            if (key := next((k for k in keys if k.startswith(prefix)), None)) is not None:
                found.setdefault(family.name, key)
    if not found:
        looked_for = ", ".join(sorted(p for f in FAMILIES.values() for p in f.text_encoders))
        raise CheckpointError(f"{path}: not a checkpoint of a known model family (SD 1.x, SD 2.x, SDXL): it has "
                              f"no text encoder keys; looked for keys starting with {looked_for}")
    if len(found) > 1:
        raise CheckpointError(f"{path} mixes model families: " + "; ".join(
            f"{key} is {FAMILIES[name].title}'s" for name, key in sorted(found.items())))
    family = FAMILIES[next(iter(found))]
    added = ADDED_EMBEDDING_KEY in keys
    if added != family.has_added_embedding:
        key = next(iter(found.values()))
        unet = f"its UNet has {ADDED_EMBEDDING_KEY}" if added else f"its UNet lacks {ADDED_EMBEDDING_KEY}"
        raise CheckpointError(f"{path} mixes model families: {key} is {family.title}'s but {unet}")
    return family


def detect_diffusers(unet_config: dict, text_encoder_configs: dict[str, dict], path: Path | str) -> Family:
    """The family of a diffusers folder, from which text encoder folders it has (OpenCLIP's GELU
    tells SD 2.x's one encoder from SD 1.x's) and its UNet's config."""
    present = set(text_encoder_configs)
    if not present:
        raise CheckpointError(f"{path}: not a model of a known family: it has neither text_encoder/ nor text_encoder_2/")
    if present == {"text_encoder"}:
        family = SD2 if text_encoder_configs["text_encoder"].get("hidden_act") == "gelu" else SD1
    else:
        family = SDXL if "text_encoder" in present else SDXL_REFINER
    added = unet_config.get("addition_embed_type")
    if (added == "text_time") != family.has_added_embedding:
        raise CheckpointError(f"{path} mixes model families: its text encoders ({', '.join(sorted(present))}) are "
                              f"{family.title}'s but unet/config.json has addition_embed_type {added!r}")
    return family
