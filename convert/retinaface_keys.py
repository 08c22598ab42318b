"""facexlib's RetinaFace detector checkpoints (detection_mobilenet0.25_Final.pth, converted).

Our module keeps facexlib's names (`module.` is stripped by the reader), so loading only drops
the batch norms' step counters. The ResNet-50 variant is recognised and refused by name.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from mlx_sd.engine.errors import CheckpointError
from mlx_sd.models.retinaface import RetinaFace


def build_detector(weights: dict[str, mx.array], source: Path) -> RetinaFace:
    if "body.stage1.0.0.weight" in weights:
        return RetinaFace()
    if any(k.startswith("body.layer1.") for k in weights):
        raise CheckpointError(
            f"{source} is RetinaFace-ResNet50; this build runs facexlib's mobilenet0.25 detector "
            "(detection_mobilenet0.25_Final.pth)")
    raise CheckpointError(f"{source} is not a facexlib RetinaFace checkpoint")


def prepare_detector_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    return {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}
