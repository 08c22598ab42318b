"""Declarative key tables: checkpoint names -> our module names (which are diffusers' names).

A `KeyMap` renames a key in two steps, both by longest matching prefix:
  1. `blocks` maps a module path (e.g. `input_blocks.4.1.`) to ours (`down_blocks.1.attentions.0.`);
  2. `layers` maps the first layer name of what follows (e.g. `in_layers.0.`) to ours (`norm1.`).
The original (CompVis/LDM) block numbering depends on the model's structure, so its tables are built
from the number of levels and resnets per level, read off the checkpoint's own keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from convert.families import SD1, single_file_sections

# Sections of an original SD 1.x single-file checkpoint, by key prefix (other families:
# convert.families.single_file_sections).
SINGLE_FILE_SECTIONS = single_file_sections(SD1)

# Tensors real checkpoints carry that are not weights of our networks: the DDPM schedule buffers,
# EMA bookkeeping and CLIP's position-id buffer. They are dropped on purpose, nothing else is.
IGNORED_KEYS = re.compile(
    r"(betas|alphas_cumprod(_prev)?|sqrt_(one_minus_|recip_|recipm1_)?alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|posterior_\w+|logvar|lvlb_weights"
    r"|model_ema\..*|.*position_ids|.*logit_scale)"
)


@dataclass(frozen=True)
class KeyMap:
    blocks: dict[str, str]
    layers: dict[str, str] = field(default_factory=dict)
    # A renamed key ending in one of these holds several of our tensors stacked along its first
    # axis, in this order (OpenCLIP's fused attention projections).
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Our names of the tensors stored transposed (a matrix the model multiplies from the right).
    transposed: frozenset[str] = frozenset()

    def parts(self, name: str) -> list[str]:
        """The names of our tensors in the renamed key `name`, in their stacking order."""
        suffix = next((s for s in self.fused if name.endswith(s)), None)
        if suffix is None:
            return [name]
        return [name[: -len(suffix)] + part for part in self.fused[suffix]]

    def rename(self, key: str) -> str | None:
        """Our name for `key`, or None when no block prefix claims it."""
        block = _longest_prefix(key, self.blocks)
        if block is None:
            return None
        rest = key[len(block) :]
        layer = _longest_prefix(rest, self.layers)
        if layer is not None:
            rest = self.layers[layer] + rest[len(layer) :]
        return self.blocks[block] + rest


def _longest_prefix(key: str, table: dict[str, str]) -> str | None:
    matches = [p for p in table if key.startswith(p)]
    return max(matches, key=len) if matches else None


def distinct_indices(keys: Iterable[str], pattern: str) -> set[int]:
    """The values of the `(\\d+)` group of `pattern` (matched at the start of keys)."""
    regex = re.compile(pattern)
    return {int(m.group(1)) for k in keys if (m := regex.match(k))}


# --- UNet ---------------------------------------------------------------------------------------

UNET_DIFFUSERS = KeyMap({"": ""})

_UNET_ORIGINAL_RESNET = {
    "in_layers.0.": "norm1.",
    "in_layers.2.": "conv1.",
    "emb_layers.1.": "time_emb_proj.",
    "out_layers.0.": "norm2.",
    "out_layers.3.": "conv2.",
    "skip_connection.": "conv_shortcut.",
}


def unet_original(levels: int, per_level: int) -> KeyMap:
    """LDM numbering: `input_blocks` run conv_in, then per level `per_level` (resnet, attention)
    pairs and a downsampler; `output_blocks` run per level `per_level + 1` pairs, the last one
    followed by an upsampler in slot 1 (no attention) or 2."""
    blocks = {
        "input_blocks.0.0.": "conv_in.",
        "time_embed.0.": "time_embedding.linear_1.",
        "time_embed.2.": "time_embedding.linear_2.",
        "label_emb.0.0.": "add_embedding.linear_1.",  # SDXL's added (text_time) embedding
        "label_emb.0.2.": "add_embedding.linear_2.",
        "middle_block.0.": "mid_block.resnets.0.",
        "middle_block.1.": "mid_block.attentions.0.",
        "middle_block.2.": "mid_block.resnets.1.",
        "out.0.": "conv_norm_out.",
        "out.2.": "conv_out.",
    }
    stride = per_level + 1
    for i in range(levels):
        for j in range(per_level):
            blocks[f"input_blocks.{1 + i * stride + j}.0."] = f"down_blocks.{i}.resnets.{j}."
            blocks[f"input_blocks.{1 + i * stride + j}.1."] = f"down_blocks.{i}.attentions.{j}."
        blocks[f"input_blocks.{(i + 1) * stride}.0.op."] = f"down_blocks.{i}.downsamplers.0.conv."
        for j in range(stride):
            blocks[f"output_blocks.{i * stride + j}.0."] = f"up_blocks.{i}.resnets.{j}."
            blocks[f"output_blocks.{i * stride + j}.1."] = f"up_blocks.{i}.attentions.{j}."
        for slot in (1, 2):
            blocks[f"output_blocks.{i * stride + per_level}.{slot}.conv."] = f"up_blocks.{i}.upsamplers.0.conv."
    return KeyMap(blocks, _UNET_ORIGINAL_RESNET)


def unet_original_for(keys: Iterable[str]) -> KeyMap:
    keys = list(keys)
    levels = len(distinct_indices(keys, r"input_blocks\.(\d+)\.0\.op\.")) + 1
    outputs = len(distinct_indices(keys, r"output_blocks\.(\d+)\."))
    return unet_original(levels, max(outputs // levels - 1, 1))


# --- VAE ----------------------------------------------------------------------------------------

_VAE_ORIGINAL_LAYERS = {
    "nin_shortcut.": "conv_shortcut.",
    # mid-block attention (stored as 1x1 convs; the transforms make them linear)
    "norm.": "group_norm.",
    "q.": "to_q.",
    "k.": "to_k.",
    "v.": "to_v.",
    "proj_out.": "to_out.0.",
}

# Names older diffusers releases used for the VAE attention, still found in standalone VAE files.
_VAE_DIFFUSERS_LEGACY_LAYERS = {
    "query.": "to_q.",
    "key.": "to_k.",
    "value.": "to_v.",
    "proj_attn.": "to_out.0.",
}

# Names are kept; the attention blocks are listed so that their layer names get the legacy renames.
_VAE_ATTENTIONS = ("encoder.mid_block.attentions.0.", "decoder.mid_block.attentions.0.")
VAE_DIFFUSERS = KeyMap({"": "", **{block: block for block in _VAE_ATTENTIONS}}, _VAE_DIFFUSERS_LEGACY_LAYERS)


def vae_original(levels: int, per_level: int) -> KeyMap:
    """LDM numbering: encoder `down.i.block.j`, decoder `up.i.block.j` counted from the bottom,
    i.e. reversed relative to diffusers' `up_blocks`."""
    blocks = {"quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}
    for side in ("encoder", "decoder"):
        blocks |= {
            f"{side}.conv_in.": f"{side}.conv_in.",
            f"{side}.norm_out.": f"{side}.conv_norm_out.",
            f"{side}.conv_out.": f"{side}.conv_out.",
            f"{side}.mid.block_1.": f"{side}.mid_block.resnets.0.",
            f"{side}.mid.attn_1.": f"{side}.mid_block.attentions.0.",
            f"{side}.mid.block_2.": f"{side}.mid_block.resnets.1.",
        }
    for i in range(levels):
        up = levels - 1 - i
        for j in range(per_level + 1):
            blocks[f"encoder.down.{i}.block.{j}."] = f"encoder.down_blocks.{i}.resnets.{j}."
            blocks[f"decoder.up.{i}.block.{j}."] = f"decoder.up_blocks.{up}.resnets.{j}."
        blocks[f"encoder.down.{i}.downsample."] = f"encoder.down_blocks.{i}.downsamplers.0."
        blocks[f"decoder.up.{i}.upsample."] = f"decoder.up_blocks.{up}.upsamplers.0."
    return KeyMap(blocks, _VAE_ORIGINAL_LAYERS)


def is_original_vae(keys: Iterable[str]) -> bool:
    return any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys)


def vae_original_for(keys: Iterable[str]) -> KeyMap:
    keys = list(keys)
    levels = len(distinct_indices(keys, r"encoder\.down\.(\d+)\."))
    per_level = len(distinct_indices(keys, r"encoder\.down\.0\.block\.(\d+)\."))
    return vae_original(levels, per_level)


# --- CLIP text encoder --------------------------------------------------------------------------

# transformers nests the model under `text_model.`; old single files saved it without that level.
CLIP = KeyMap({"": "", "text_model.": ""})

_OPEN_CLIP_LAYERS = {
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "attn.in_proj_": "self_attn.in_proj_",  # fused q, k, v: see `fused`
    "attn.out_proj.": "self_attn.out_proj.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}
_QKV = ("q_proj", "k_proj", "v_proj")


def open_clip(layers: int) -> KeyMap:
    """OpenCLIP's text tower (SD 2.x's ViT-H, SDXL's bigG) as transformers names it; only its
    first `layers` resblocks are claimed."""
    blocks = {
        "token_embedding.": "embeddings.token_embedding.",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_final.": "final_layer_norm.",
        "text_projection": "text_projection.weight",
    }
    blocks |= {f"transformer.resblocks.{i}.": f"encoder.layers.{i}." for i in range(layers)}
    fused = {f"self_attn.in_proj_{p}": tuple(f"self_attn.{q}.{p}" for q in _QKV) for p in ("weight", "bias")}
    return KeyMap(blocks, _OPEN_CLIP_LAYERS, fused, frozenset({"text_projection.weight"}))


def open_clip_layers(keys: Iterable[str]) -> int:
    return len(distinct_indices(keys, r"transformer\.resblocks\.(\d+)\."))
