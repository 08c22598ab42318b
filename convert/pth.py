"""Released PyTorch `.pth` weights (Real-ESRGAN, GFPGAN, facexlib) -> safetensors, once.

This is the only place a pickle is ever opened, and only on a user's command with torch installed:
`torch.load(weights_only=True)` restores tensors and plain containers and refuses to run code.
The server itself reads safetensors only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlx_sd.engine.errors import CheckpointError

# Where the released files keep their state dict: Real-ESRGAN/GFPGAN training checkpoints store
# the EMA weights (used for inference) under params_ema, some under params.
_STATE_KEYS = ("params_ema", "params", "state_dict")


def _state_dict(loaded: object, source: Path) -> dict:
    if isinstance(loaded, dict):
        for key in _STATE_KEYS:
            if isinstance(loaded.get(key), dict):
                return loaded[key]
        if loaded and all(hasattr(v, "shape") for v in loaded.values()):
            return loaded
    raise CheckpointError(f"{source} holds no state dict of tensors (looked for {', '.join(_STATE_KEYS)})")


def convert_pth(source: str | Path, destination: str | Path) -> Path:
    """Write the tensors of a `.pth` file as fp32/fp16 safetensors; `module.` prefixes are removed."""
    try:
        import torch
    except ImportError:
        raise CheckpointError("converting a .pth file needs PyTorch: pip install torch") from None
    from safetensors.numpy import save_file

    source, destination = Path(source), Path(destination)
    if not source.is_file():
        raise CheckpointError(f"{source} not found")
    try:
        loaded = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError and others for unsafe or broken files
        raise CheckpointError(f"{source} could not be read safely: {e}") from None
    tensors = {}
    for name, tensor in _state_dict(loaded, source).items():
        name = name.removeprefix("module.")
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
            tensor = tensor.float()
        tensors[name] = np.ascontiguousarray(tensor.detach().cpu().numpy())
    destination.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(destination), metadata={"source": source.name})
    return destination
