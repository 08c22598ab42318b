"""LoRA key tables: every spelling of a module maps to it, SDXL's included (its rows are ready for
the two-encoder family)."""

from __future__ import annotations

from convert.lora_keys import Target, module_table, split_key

SDXL_PATHS = {
    "unet": ["down_blocks.1.attentions.0.transformer_blocks.3.attn2.to_k", "up_blocks.0.upsamplers.0.conv",
             "mid_block.attentions.0.proj_out"],
    "text_encoder": ["encoder.layers.0.self_attn.q_proj"],
    "text_encoder_2": ["encoder.layers.31.mlp.fc2"],
}


def test_sdxl_spellings_of_kohya_and_diffusers() -> None:
    table = module_table(SDXL_PATHS, unet_levels=(3, 2))  # SDXL: 3 levels of 2 resnets
    to_k = Target("unet", "down_blocks.1.attentions.0.transformer_blocks.3.attn2.to_k")
    assert table["lora_unet_input_blocks_4_1_transformer_blocks_3_attn2_to_k"] == to_k  # kohya's SDXL names
    assert table["lora_unet_down_blocks_1_attentions_0_transformer_blocks_3_attn2_to_k"] == to_k
    assert table["unet.down_blocks.1.attentions.0.transformer_blocks.3.attn2.to_k"] == to_k
    upsampler = Target("unet", "up_blocks.0.upsamplers.0.conv")
    assert table["lora_unet_output_blocks_2_2_conv"] == table["lora_unet_output_blocks_2_1_conv"] == upsampler
    assert table["lora_unet_middle_block_1_proj_out"] == Target("unet", "mid_block.attentions.0.proj_out")
    te1 = Target("text_encoder", "encoder.layers.0.self_attn.q_proj")
    assert table["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] == te1
    assert table["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == te1
    te2 = Target("text_encoder_2", "encoder.layers.31.mlp.fc2")
    assert table["lora_te2_text_model_encoder_layers_31_mlp_fc2"] == te2
    assert table["text_encoder_2.text_model.encoder.layers.31.mlp.fc2"] == te2


def test_keys_split_into_module_and_factor() -> None:
    assert split_key("lora_unet_conv_in.lora_down.weight") == ("lora_unet_conv_in", "lora_down.weight")
    assert split_key("unet.conv_in.lora.up.weight") == ("unet.conv_in", "lora.up.weight")
    assert split_key("lora_te_x.alpha") == ("lora_te_x", "alpha")
    assert split_key("lora_unet_x.hada_w1_a") == ("lora_unet_x", "hada_w1_a")
    assert split_key("unet.conv_in.weight") is None
