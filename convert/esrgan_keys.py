"""Real-ESRGAN checkpoints: which generator, and its sizes, read off the keys and shapes.

Names are basicsr's (`conv_first`, `body.N.rdbK.convJ`, ...) for RRDBNet and realesrgan's
(`body.N`) for SRVGGNetCompact, which our modules keep, so only conv layouts change on load.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx

from convert.keymaps import distinct_indices
from convert.restoration import shape_of
from mlx_sd.engine.errors import CheckpointError
from mlx_sd.models.esrgan import RRDBNet, RRDBNetConfig, SRVGGNetCompact, SRVGGNetCompactConfig

# conv_first's input channels -> scale: x2/x1 models see 2x2/4x4 pixel-unshuffled RGB.
_RRDB_SCALES = {3: 4, 12: 2, 48: 1}


def build_upscaler(weights: dict[str, mx.array], source: Path) -> RRDBNet | SRVGGNetCompact:
    """An unloaded network whose architecture and sizes match `weights`."""
    keys = list(weights)
    if "conv_first.weight" in weights:
        num_feat, in_channels = shape_of(weights, "conv_first.weight", source)[:2]
        if in_channels not in _RRDB_SCALES:
            raise CheckpointError(f"{source}: RRDBNet with {in_channels} input channels is not supported")
        return RRDBNet(RRDBNetConfig(
            scale=_RRDB_SCALES[in_channels],
            num_feat=num_feat,
            num_block=len(distinct_indices(keys, r"body\.(\d+)\.")),
            num_grow_ch=shape_of(weights, "body.0.rdb1.conv1.weight", source)[0],
        ))
    if "body.0.weight" in weights:
        convs = sorted(distinct_indices((k for k in keys if weights[k].ndim == 4), r"body\.(\d+)\.weight"))
        prelus = distinct_indices((k for k in keys if weights[k].ndim == 1 and k.endswith("weight")),
                                  r"body\.(\d+)\.weight")
        if prelus != {i + 1 for i in convs[:-1]}:
            # relu/leaky-relu variants have no weights between the convs; no released model uses them.
            raise CheckpointError(f"{source}: only SRVGGNetCompact with PReLU activations is supported")
        out_channels = shape_of(weights, f"body.{convs[-1]}.weight", source)[0]
        return SRVGGNetCompact(SRVGGNetCompactConfig(
            num_feat=shape_of(weights, "body.0.weight", source)[0],
            num_conv=len(convs) - 2,
            upscale=math.isqrt(out_channels // 3),
        ))
    if any(k.startswith(("model.", "RRDB_trunk.")) for k in keys):
        raise CheckpointError(f"{source} is an original-ESRGAN checkpoint; only basicsr/Real-ESRGAN names are supported")
    raise CheckpointError(f"{source} is neither a Real-ESRGAN RRDBNet nor an SRVGGNetCompact checkpoint")
