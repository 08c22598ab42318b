"""The optional post-processing networks of a model directory, for the pipeline.

- `upscaler/model.safetensors`: Real-ESRGAN, used by the hires fix instead of Lanczos when present,
  and to upscale finished images when a request asks.
- `face_restoration/{gfpgan,detection}.safetensors`: GFPGAN + RetinaFace, for restore_faces.
Each is loaded on first use and again when its files change, like the SD model.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from mlx_sd.engine.backends import Backend
from mlx_sd.engine.errors import MissingWeights
from mlx_sd.faces import FaceRestorer, load_face_restorer, missing_files
from mlx_sd.faces.restore import DETECTOR_FILE, RESTORER_FILE
from mlx_sd.engine.reloading import ReloadingValue
from mlx_sd.engine.upscale import UPSCALER_FILE, Upscaler, load_upscaler


class Restoration:
    def __init__(self, models_dir: Path, dtype: mx.Dtype | str | None = None, backend: Backend = Backend.MLX) -> None:
        self._models_dir = Path(models_dir)
        upscaler = self._models_dir / UPSCALER_FILE
        faces = [self._models_dir / RESTORER_FILE, self._models_dir / DETECTOR_FILE]
        self._upscaler = ReloadingValue(lambda: [upscaler], lambda: load_upscaler(upscaler, dtype, backend=backend))
        self._faces = ReloadingValue(lambda: faces, lambda: load_face_restorer(self._models_dir, dtype, backend))

    def upscaler(self) -> Upscaler | None:
        """The installed upscaler, or None (the hires fix then resizes with Lanczos)."""
        return self._upscaler.get() if (self._models_dir / UPSCALER_FILE).is_file() else None

    def required_upscaler(self) -> Upscaler:
        """The installed upscaler, for a request that asks to upscale; MissingWeights names its file."""
        if not (self._models_dir / UPSCALER_FILE).is_file():
            raise MissingWeights(UPSCALER_FILE)
        return self._upscaler.get()

    def upscaler_name(self) -> str | None:
        """What the images' parameters call the hires upscaler (None: Lanczos)."""
        return "Real-ESRGAN" if (self._models_dir / UPSCALER_FILE).is_file() else None

    def face_restorer(self) -> FaceRestorer:
        """The face restorer; MissingWeights names the first absent file."""
        missing = missing_files(self._models_dir)
        if missing:
            raise MissingWeights(missing[0])
        return self._faces.get()
