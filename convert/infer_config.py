"""Network configs read off the weight shapes of a single-file checkpoint.

Shapes are PyTorch's (conv OIHW, linear out x in), keyed by our (diffusers) names. What shapes
cannot tell follows the model family (convert.families): UNet heads (8 for SD-1, 64 wide after),
the VAE's latent scale, the text encoders' activation (OpenCLIP's exact GELU); and the common
conventions: 64-wide CLIP heads, GroupNorm of 32, 256 Fourier features per SDXL size value.
"""

from __future__ import annotations

from collections.abc import Callable

from convert.families import Family
from convert.keymaps import distinct_indices
from mlx_sd.engine.errors import CheckpointError
from mlx_sd.models.clip import CLIPTextConfig
from mlx_sd.models.unet import UNetConfig
from mlx_sd.models.vae import VAEConfig

Shapes = dict[str, tuple[int, ...]]

SD1_UNET_HEADS = 8
CLIP_HEAD_WIDTH = 64
ADDITION_TIME_EMBED_DIM = 256  # SDXL's, base and refiner


def _require(shapes: Shapes, key: str, network: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(
            f"cannot read the {network} architecture off the checkpoint: it has no {key!r}"
        )
    return shapes[key]


def infer_unet_config(shapes: Shapes, family: Family) -> UNetConfig:
    levels = len(distinct_indices(shapes, r"down_blocks\.(\d+)\."))
    per_level = len(distinct_indices(shapes, r"down_blocks\.0\.resnets\.(\d+)\."))
    channels = tuple(_require(shapes, f"down_blocks.{i}.resnets.0.conv1.weight", "UNet")[0] for i in range(levels))
    down_attn = [f"down_blocks.{i}.attentions.0.proj_in.weight" in shapes for i in range(levels)]
    up_attn = [f"up_blocks.{i}.attentions.0.proj_in.weight" in shapes for i in range(levels)]
    depths = tuple(
        len(distinct_indices(shapes, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.")) or 1
        for i in range(levels)
    )
    proj_in = _require(shapes, "mid_block.attentions.0.proj_in.weight", "UNet")
    context = _require(shapes, "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", "UNet")
    added = shapes.get("add_embedding.linear_1.weight")
    width = family.unet_head_width
    return UNetConfig(
        in_channels=_require(shapes, "conv_in.weight", "UNet")[1],
        out_channels=_require(shapes, "conv_out.weight", "UNet")[0],
        block_out_channels=channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn),
        layers_per_block=per_level,
        attention_head_dim=tuple(max(c // width, 1) for c in channels) if width else SD1_UNET_HEADS,
        transformer_layers_per_block=depths[0] if len(set(depths)) == 1 else depths,
        cross_attention_dim=context[1],
        use_linear_projection=len(proj_in) == 2,
        sample_size=family.native_size // 8,
        addition_embed_type="text_time" if added else None,
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM if added else None,
        projection_class_embeddings_input_dim=added[1] if added else None,
    )


def infer_vae_config(shapes: Shapes, family: Family) -> VAEConfig:
    levels = len(distinct_indices(shapes, r"encoder\.down_blocks\.(\d+)\."))
    return VAEConfig(
        in_channels=_require(shapes, "encoder.conv_in.weight", "VAE")[1],
        out_channels=_require(shapes, "decoder.conv_out.weight", "VAE")[0],
        block_out_channels=tuple(
            _require(shapes, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", "VAE")[0] for i in range(levels)
        ),
        layers_per_block=len(distinct_indices(shapes, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
        latent_channels=_require(shapes, "decoder.conv_in.weight", "VAE")[1],
        use_quant_conv="quant_conv.weight" in shapes,
        use_post_quant_conv="post_quant_conv.weight" in shapes,
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in shapes,
        scaling_factor=family.vae_scaling_factor,
    )


def infer_clip_config(shapes: Shapes, open_clip: bool) -> CLIPTextConfig:
    vocab, hidden = _require(shapes, "embeddings.token_embedding.weight", "text encoder")
    projection = shapes.get("text_projection.weight")
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_require(shapes, "encoder.layers.0.mlp.fc1.weight", "text encoder")[0],
        num_hidden_layers=len(distinct_indices(shapes, r"encoder\.layers\.(\d+)\.")),
        num_attention_heads=max(hidden // CLIP_HEAD_WIDTH, 1),
        max_position_embeddings=_require(shapes, "embeddings.position_embedding.weight", "text encoder")[0],
        hidden_act="gelu" if open_clip else "quick_gelu",
        text_projection_dim=projection[0] if projection else None,
    )


def _text_encoder(network: str) -> Callable[[Shapes, Family], CLIPTextConfig]:
    def infer(shapes: Shapes, family: Family) -> CLIPTextConfig:
        kinds = {name: kind for name, kind in family.text_encoders.values()}
        return infer_clip_config(shapes, kinds.get(network) == "open_clip")

    return infer


INFER = {"unet": infer_unet_config, "vae": infer_vae_config, "text_encoder": _text_encoder("text_encoder"),
         "text_encoder_2": _text_encoder("text_encoder_2")}
