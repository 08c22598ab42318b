"""Key tables for LoRA files: each file's module names -> (network, our module path).

A LoRA key is a module name plus a part naming the factor (`lora_down.weight`, `lora_A.weight`,
`alpha`, ...). Module names come in three spellings, each a prefix per network plus a module path:
  - kohya: `lora_unet_` / `lora_te_` (SDXL: `lora_te1_`, `lora_te2_`), then the path with `.` as `_`,
    in diffusers' names (SD 1.x trainers) or LDM's (`input_blocks_4_1_...`, SDXL trainers);
  - diffusers/PEFT: `unet.` / `text_encoder.` (SDXL: `text_encoder_2.`), then the dotted path; a file
    without these prefixes holds UNet modules.
Since `_` is ambiguous, kohya names are matched against a table made from the loaded networks' own
module paths, never parsed. A new model family adds rows to `PREFIXES`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from convert.keymaps import KeyMap, unet_original

# network -> (kohya prefixes, diffusers/PEFT prefixes, what sits between the prefix and our path)
PREFIXES: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "unet": (("lora_unet_",), ("unet.", ""), ""),
    "text_encoder": (("lora_te_", "lora_te1_"), ("text_encoder.",), "text_model."),
    # SDXL's second text encoder (OpenCLIP ViT-bigG in transformers' names), once the family exists.
    "text_encoder_2": (("lora_te2_",), ("text_encoder_2.",), "text_model."),
}

# The factor parts of a key, longest first; the module name is what precedes one of them.
FACTORS = (
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight",
    "lora.down.weight", "lora.up.weight", "alpha", "dora_scale",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
)
DOWN = ("lora_down.weight", "lora_A.weight", "lora.down.weight")
UP = ("lora_up.weight", "lora_B.weight", "lora.up.weight")


@dataclass(frozen=True)
class Target:
    network: str
    path: str  # our module's dotted path in that network


def split_key(key: str) -> tuple[str, str] | None:
    """(module name, factor) of a LoRA file's key, or None when it ends in no known factor."""
    for factor in sorted(FACTORS, key=len, reverse=True):
        if key.endswith("." + factor):
            return key[: -len(factor) - 1], factor
    return None


def _ldm_paths(paths: Iterable[str], levels: int, per_level: int) -> dict[str, list[str]]:
    """Our UNet module paths -> their LDM spellings, by inverting the checkpoint table (an
    upsampler has two: slot 1 or 2 of its output block)."""
    table: KeyMap = unet_original(levels, per_level)
    blocks: dict[str, list[str]] = {}
    for theirs, ours in table.blocks.items():
        blocks.setdefault(ours, []).append(theirs)
    layers = {ours: theirs for theirs, ours in table.layers.items()}
    result = {}
    for path in paths:
        dotted = path + "."
        ours = max((b for b in blocks if dotted.startswith(b)), key=len, default=None)
        if ours is None:
            continue
        rest = dotted[len(ours):]
        layer = max((name for name in layers if rest.startswith(name)), key=len, default=None)
        if layer is not None:
            rest = layers[layer] + rest[len(layer):]
        result[path] = [(theirs + rest)[:-1] for theirs in blocks[ours]]
    return result


def module_table(networks: dict[str, Iterable[str]], unet_levels: tuple[int, int] | None = None,
                 ) -> dict[str, Target]:
    """Every spelling of every module a LoRA may target -> its Target. `networks` maps a network's
    name to the paths of its weight-bearing layers; `unet_levels` (levels, resnets per level) adds
    the UNet's LDM spellings."""
    table: dict[str, Target] = {}
    for network, paths in networks.items():
        kohya, dotted, inner = PREFIXES[network]
        paths = list(paths)
        spellings = {path: [inner + path] for path in paths}
        if network == "unet" and unet_levels is not None:
            for path, ldm in _ldm_paths(paths, *unet_levels).items():
                spellings[path] += ldm
        for path, names in spellings.items():
            target = Target(network, path)
            for name in names:
                for prefix in kohya:
                    table[prefix + name.replace(".", "_")] = target
                for prefix in dotted:
                    table[prefix + name] = target
    return table
