"""`--quantize 8|4` on the tiny SD-1 models: quantized layers appear, the networks still run on
the CPU, and their outputs stay close to the unquantized ones."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from convert import NetworkConfigs, load_networks
from mlx_sd.models.quantize import quantize

FIXTURES = Path(__file__).parents[1] / "fixtures" / "sd1_tiny"
# Relative error (max|q - ref| / max|ref|) measured on the tiny random models (groups of 32):
# 8-bit 0.8% (text) / 0.6% (UNet), 4-bit 17% / 11%. The bounds leave ~2x room and still fail
# on a wrongly quantized or skipped-dequantize layer (error ~100%).
TOLERANCE = {8: 0.015, 4: 0.3}


def load() -> object:
    configs = NetworkConfigs.from_dict(json.loads((FIXTURES / "golden.json").read_text())["configs"])
    return load_networks(FIXTURES / "diffusers", dtype="float32", configs=configs)


def relative_error(ours: mx.array, reference: mx.array) -> float:
    ours_np, ref_np = np.array(ours), np.array(reference)
    return float(np.abs(ours_np - ref_np).max() / np.abs(ref_np).max())


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_unet_and_text_encoder_stay_close(bits: int) -> None:
    models, reference = load(), load()
    key = mx.random.key(0)
    ids = mx.array([[49406, 320, 1125, 539, 49407] + [49407] * 72])
    latents = mx.random.normal((2, 16, 16, 4), key=key)
    context = reference.text_encoder(ids)
    context = mx.concatenate([context, context])

    assert quantize(models.unet, bits) > 0 and quantize(models.text_encoder, bits) > 0
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in models.unet.named_modules())

    text = relative_error(models.text_encoder(ids), reference.text_encoder(ids))
    eps = relative_error(models.unet(latents, mx.array([500, 500]), context),
                         reference.unet(latents, mx.array([500, 500]), context))
    assert text < TOLERANCE[bits] and eps < TOLERANCE[bits], (text, eps)


def test_unsupported_bits_are_refused() -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize(nn.Linear(64, 64), 3)
