"""Network configs read off the weight shapes of a single-file checkpoint.

Shapes are PyTorch's (conv OIHW, linear out x in), keyed by our (diffusers) names. What shapes
cannot tell follows SD-1 conventions: 8 UNet attention heads, 64-wide CLIP heads, GroupNorm of 32.
"""

from __future__ import annotations

from convert.keymaps import distinct_indices
from mlx_sd.engine.errors import CheckpointError
from mlx_sd.models.clip import CLIPTextConfig
from mlx_sd.models.unet import UNetConfig
from mlx_sd.models.vae import VAEConfig

Shapes = dict[str, tuple[int, ...]]

SD1_UNET_HEADS = 8
CLIP_HEAD_WIDTH = 64


def _require(shapes: Shapes, key: str, network: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(
            f"cannot read the {network} architecture off the checkpoint: it has no {key!r} (is it SD-1?)"
        )
    return shapes[key]


def infer_unet_config(shapes: Shapes) -> UNetConfig:
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
    return UNetConfig(
        in_channels=_require(shapes, "conv_in.weight", "UNet")[1],
        out_channels=_require(shapes, "conv_out.weight", "UNet")[0],
        block_out_channels=channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn),
        layers_per_block=per_level,
        attention_head_dim=SD1_UNET_HEADS,
        transformer_layers_per_block=depths[0] if len(set(depths)) == 1 else depths,
        cross_attention_dim=context[1],
        use_linear_projection=len(proj_in) == 2,
    )


def infer_vae_config(shapes: Shapes) -> VAEConfig:
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
    )


def infer_clip_config(shapes: Shapes) -> CLIPTextConfig:
    vocab, hidden = _require(shapes, "embeddings.token_embedding.weight", "text encoder")
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_require(shapes, "encoder.layers.0.mlp.fc1.weight", "text encoder")[0],
        num_hidden_layers=len(distinct_indices(shapes, r"encoder\.layers\.(\d+)\.")),
        num_attention_heads=max(hidden // CLIP_HEAD_WIDTH, 1),
        max_position_embeddings=_require(shapes, "embeddings.position_embedding.weight", "text encoder")[0],
    )


INFER = {"unet": infer_unet_config, "vae": infer_vae_config, "text_encoder": infer_clip_config}
