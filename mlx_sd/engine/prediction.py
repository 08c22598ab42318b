"""What a model's UNet predicts: the noise ("epsilon") or the velocity ("v", SD 2.x 768-v and some
fine-tunes). Decided once per load, and logged:

1. a setting that forces it (`--prediction-type epsilon|v`; "auto" decides as below);
2. a sidecar config: a `.yaml` beside a single file (the LDM config's `parameterization: "v"`,
   absent meaning epsilon) or a diffusers folder's `scheduler/scheduler_config.json`
   (`prediction_type`);
3. for SD 2.x without one, A1111's probe (`is_using_v_parameterization_for_sd2`): the UNet at
   timestep 999 on a latent of 0.5s with a context of 0.5s; a mean of (output - input) below -1
   is a v model. Its latent is 8x8 and its context two tokens;
4. otherwise epsilon, what SD 1.x and SDXL base models predict.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import mlx.core as mx

from convert.families import SD2
from convert.formats import CheckpointLayout
from mlx_sd.engine.errors import CheckpointError
from mlx_sd.models.unet import UNet2DConditionModel

log = logging.getLogger(__name__)

EPSILON, V = "epsilon", "v"
SETTINGS = ("auto", EPSILON, V)
_DIFFUSERS_NAMES = {"epsilon": EPSILON, "v_prediction": V}
_PARAMETERIZATION = re.compile(r"^\s*parameterization\s*:\s*[\"']?(\w+)[\"']?\s*(#.*)?$", re.MULTILINE)
_MAX_SIDECAR_BYTES = 1 << 20
PROBE_THRESHOLD = -1.0  # A1111's


def decide(setting: str, layout: CheckpointLayout, unet: UNet2DConditionModel, family_name: str) -> str:
    """EPSILON or V for a loaded model (see the module's docstring); `setting` is one of SETTINGS."""
    if setting not in SETTINGS:
        raise ValueError(f"prediction type must be one of {', '.join(SETTINGS)}, got {setting!r}")
    source = layout.single_file or layout.diffusers["unet"].parent.parent
    if setting != "auto":
        log.info("%s: %s prediction, as set", source, setting)
        return setting
    sidecar = sidecar_prediction(layout)
    if sidecar is not None:
        log.info("%s: %s prediction, from %s", source, sidecar[0], sidecar[1])
        return sidecar[0]
    if family_name == SD2.name:
        kind, mean = probe(unet)
        log.info("%s: %s prediction, detected as A1111 does (mean of output - input %.3f, v below %g)",
                 source, kind, mean, PROBE_THRESHOLD)
        return kind
    log.info("%s: epsilon prediction (no sidecar config)", source)
    return EPSILON


def sidecar_prediction(layout: CheckpointLayout) -> tuple[str, Path] | None:
    """(prediction, the file that says so), or None without a sidecar config."""
    if layout.single_file is not None:
        for path in (layout.single_file.with_suffix(".yaml"), layout.single_file.with_suffix(".yml")):
            if path.is_file():
                text = _read(path)
                match = _PARAMETERIZATION.search(text)
                value = match.group(1) if match else "eps"
                if value not in ("eps", "v"):
                    raise CheckpointError(f"{path}: parameterization {value!r} is neither \"eps\" nor \"v\"")
                return (V if value == "v" else EPSILON), path
        return None
    path = layout.diffusers["unet"].parent.parent / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    try:
        value = json.loads(_read(path)).get("prediction_type", "epsilon")
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a JSON object: {e}") from None
    if value not in _DIFFUSERS_NAMES:
        raise CheckpointError(f"{path}: prediction_type {value!r} is not supported (epsilon or v_prediction)")
    return _DIFFUSERS_NAMES[value], path


def _read(path: Path) -> str:
    if path.stat().st_size > _MAX_SIDECAR_BYTES:
        raise CheckpointError(f"{path} is larger than a config ({_MAX_SIDECAR_BYTES} bytes)")
    return path.read_text(encoding="utf-8", errors="replace")


def probe(unet: UNet2DConditionModel) -> tuple[str, float]:
    """A1111's test: (V or EPSILON, the mean it compared)."""
    dtype = unet.conv_in.weight.dtype
    x = mx.full((1, 8, 8, unet.config.in_channels), 0.5, dtype=dtype)
    context = mx.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=dtype)
    mean = float(mx.mean((unet(x, mx.array([999.0]), context) - x).astype(mx.float32)))
    return (V if mean < PROBE_THRESHOLD else EPSILON), mean
