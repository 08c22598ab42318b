"""Weights of the restoration networks (upscaler, face restorer, face detector) -> MLX modules.

Their released weights are flat state dicts whose names already match our modules, so each
network's table (`convert.esrgan_keys`, `convert.gfpgan_keys`, `convert.retinaface_keys`) only
infers the configuration from the shapes, drops what inference does not use and re-lays out the
few tensors whose shape differs; this module reads the file and loads strictly.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from convert.formats import read_header
from convert.transforms import to_mlx
from mlx_sd.engine.errors import CheckpointError

# Prefixes some tools add to every key: DataParallel's `module.` (facexlib's detector files).
_WRAPPER_PREFIXES = ("module.",)


def read_weights(path: Path) -> dict[str, mx.array]:
    """The tensors of a safetensors file (pickles refused), wrapper prefixes removed."""
    read_header(path)  # refuses pickles and non-safetensors files with a clear message
    weights = mx.load(str(path))
    for prefix in _WRAPPER_PREFIXES:
        if weights and all(k.startswith(prefix) for k in weights):
            weights = {k[len(prefix):]: v for k, v in weights.items()}
    return weights


def load_strict(model: nn.Module, weights: dict[str, mx.array], dtype: mx.Dtype, source: Path) -> nn.Module:
    """Load `weights` (torch layouts, our names) into `model`; every parameter must be given once."""
    targets = dict(tree_flatten(model.parameters()))
    missing, extra = sorted(targets.keys() - weights.keys()), sorted(weights.keys() - targets.keys())
    if missing or extra:
        raise CheckpointError(
            f"{source} does not match the {type(model).__name__} architecture: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    arrays = []
    for name, target in targets.items():
        array = to_mlx(weights[name], target.ndim, dtype)
        if array.shape != target.shape:
            raise CheckpointError(f"{source}: {name} has shape {weights[name].shape}, expected {target.shape}")
        arrays.append((name, array))
    model.load_weights(arrays, strict=True)
    mx.eval(model.parameters())
    model.eval()  # batch norms use their running statistics
    return model


def shape_of(weights: dict[str, mx.array], key: str, source: Path) -> tuple[int, ...]:
    if key not in weights:
        raise CheckpointError(f"{source} lacks {key}")
    return tuple(weights[key].shape)
