"""The seam (mlx_sd.cpu.apply.accelerate): a loaded network's layers and blocks swapped for their CPU
forms with the same parameters, quantized layers left alone; and what mlx_sd.engine.backends decides."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from convert import NetworkConfigs
from convert.reader import TensorReader
from mlx_sd.engine import backends
from mlx_sd.engine.backends import Backend
from mlx_sd.cpu import layers
from mlx_sd.cpu.apply import accelerate
from mlx_sd.cpu.norms import GroupNormSiLU
from mlx_sd.cpu.reader import ParallelTensorReader
from mlx_sd.models.clip import CLIPTextModel
from mlx_sd.models.quantize import quantize
from mlx_sd.models.unet import UNet2DConditionModel
from mlx_sd.models.vae import AutoencoderKL

CONFIGS = NetworkConfigs.from_dict(
    json.loads((Path(__file__).parents[1] / "fixtures" / "sd1_tiny" / "golden.json").read_text())["configs"])
NETWORKS = {"text_encoder": lambda: CLIPTextModel(CONFIGS.text_encoder),
            "unet": lambda: UNet2DConditionModel(CONFIGS.unet), "vae": lambda: AutoencoderKL(CONFIGS.vae)}
# Modules every one of which the seam replaces: none may be left.
PLAIN = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.SiLU)


@pytest.mark.parametrize("name", NETWORKS)
def test_the_parameters_and_their_names_are_kept(name: str) -> None:
    network = NETWORKS[name]()
    before = dict(tree_flatten(network.parameters()))
    accelerated = accelerate(network)
    after = dict(tree_flatten(accelerated.parameters()))
    assert after.keys() == before.keys()
    assert all(after[key] is value for key, value in before.items())
    accelerated.load_weights(list(before.items()), strict=True)


@pytest.mark.parametrize("name", NETWORKS)
def test_no_plain_layer_is_left(name: str) -> None:
    network = accelerate(NETWORKS[name]())
    left = [path for path, module in network.named_modules() if type(module) in PLAIN]
    assert left == []
    assert any(isinstance(module, layers.Linear) for _, module in network.named_modules())


def test_the_heads_group_norm_applies_the_silu() -> None:
    for network in (accelerate(NETWORKS["unet"]()), accelerate(NETWORKS["vae"]()).decoder):
        assert type(network.conv_norm_out) is GroupNormSiLU and type(network.conv_act) is nn.Identity


def test_blocks_take_their_fused_forms() -> None:
    unet = accelerate(NETWORKS["unet"]())
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert type(block) is layers.BasicTransformerBlock and type(block.ff) is layers.FeedForward
    assert type(block.attn1) is layers.Attention and type(unet.down_blocks[0].resnets[0]) is layers.ResnetBlock2D


def test_quantized_layers_are_left_as_they_are() -> None:
    mx.random.seed(0)
    plain, fast = NETWORKS["unet"](), NETWORKS["unet"]()
    fast.update(plain.parameters())
    for network in (plain, fast):
        quantize(network, 8)
    quantized = sum(isinstance(m, nn.QuantizedLinear) for _, m in plain.named_modules())
    assert quantized > 0
    accelerate(fast)
    assert sum(isinstance(m, nn.QuantizedLinear) for _, m in fast.named_modules()) == quantized
    x, t = mx.random.normal((1, 16, 16, 4)), mx.array(500)
    context = mx.random.normal((1, 77, CONFIGS.unet.cross_attention_dim))
    expected, ours = np.array(plain(x, t, context)), np.array(fast(x, t, context))
    assert np.abs(ours - expected).max() <= 1e-5 * np.abs(expected).max()


def test_backend_settings() -> None:
    assert backends.choose("mlx") is Backend.MLX
    assert backends.choose("auto") is (Backend.CPU if backends.kernels_usable() else Backend.MLX)
    assert backends.from_environment({}) is backends.choose("auto")
    assert backends.from_environment({"MLX_SD_BACKEND": "mlx"}) is Backend.MLX
    with pytest.raises(ValueError, match="MLX_SD_BACKEND must be one of auto, mlx, cpu"):
        backends.choose("metal")


def test_what_each_backend_runs() -> None:
    assert Backend.MLX.activation_dtype(mx.float16) == mx.float16
    assert Backend.CPU.activation_dtype(mx.bfloat16) == mx.float32
    assert Backend.MLX.reader is TensorReader and Backend.CPU.reader is ParallelTensorReader
    network = NETWORKS["vae"]()
    assert Backend.MLX.prepare(network) is network
    assert type(network.decoder.conv_out) is nn.Conv2d
