"""Weight-only quantization of the UNet and the text encoder (`--quantize 8|4`).

Linear (and embedding) layers become `nn.QuantizedLinear`/`QuantizedEmbedding`, storing
`bits`-bit weights with an fp scale and bias per group of input features; activations stay in
the model's dtype. Convolutions are left as they are: MLX has no quantized convolution. The
group size is the largest of 128, 64 and 32 that divides a layer's input width; layers whose
width none divides (the tiny test models' are small) stay unquantized.
"""

from __future__ import annotations

import mlx.nn as nn

BITS = (4, 8)
GROUP_SIZES = (128, 64, 32)


def quantize(model: nn.Module, bits: int) -> int:
    """Quantize `model` in place; returns how many layers were quantized."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    count = 0

    def params(_: str, module: nn.Module) -> bool | dict:
        nonlocal count
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            return False
        width = module.weight.shape[-1]
        group = next((g for g in GROUP_SIZES if width % g == 0), None)
        if group is None:
            return False
        count += 1
        return {"group_size": group, "bits": bits}

    nn.quantize(model, class_predicate=params)
    return count
