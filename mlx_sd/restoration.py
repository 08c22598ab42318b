"""The optional post-processing networks of a model directory, for the pipeline.

- `upscaler/model.safetensors`: Real-ESRGAN, used by the hires fix instead of Lanczos when present.
- `face_restoration/{gfpgan,detection}.safetensors`: GFPGAN + RetinaFace, for restore_faces.
Each is loaded on first use and again when its files change, like the SD model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import mlx.core as mx

from mlx_sd.errors import MissingWeights
from mlx_sd.faces import FaceRestorer, load_face_restorer, missing_files
from mlx_sd.faces.restore import DETECTOR_FILE, RESTORER_FILE
from mlx_sd.upscale import UPSCALER_FILE, Upscaler, load_upscaler

T = TypeVar("T")


class _Cached(Generic[T]):
    """A value loaded from files, loaded again when any of them changes size or time."""

    def __init__(self, files: list[Path], load: Callable[[], T]) -> None:
        self._files, self._load = files, load
        self._value: T | None = None
        self._stamp: tuple | None = None

    def get(self) -> T:
        stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in self._files)
        if self._value is None or stamp != self._stamp:
            self._value = None  # drop the old weights first
            self._value, self._stamp = self._load(), stamp
        return self._value


class Restoration:
    def __init__(self, models_dir: Path, dtype: mx.Dtype | str | None = None) -> None:
        self._models_dir = Path(models_dir)
        self._upscaler = _Cached([self._models_dir / UPSCALER_FILE],
                                 lambda: load_upscaler(self._models_dir / UPSCALER_FILE, dtype))
        self._faces = _Cached([self._models_dir / RESTORER_FILE, self._models_dir / DETECTOR_FILE],
                              lambda: load_face_restorer(self._models_dir, dtype))

    def upscaler(self) -> Upscaler | None:
        """The installed upscaler, or None (the hires fix then resizes with Lanczos)."""
        return self._upscaler.get() if (self._models_dir / UPSCALER_FILE).is_file() else None

    def upscaler_name(self) -> str | None:
        """What the images' parameters call the hires upscaler (None: Lanczos)."""
        return "Real-ESRGAN" if (self._models_dir / UPSCALER_FILE).is_file() else None

    def face_restorer(self) -> FaceRestorer:
        """The face restorer; MissingWeights names the first absent file."""
        missing = missing_files(self._models_dir)
        if missing:
            raise MissingWeights(missing[0])
        return self._faces.get()
