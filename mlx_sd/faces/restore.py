"""`restore_faces`: detect -> align to the FFHQ template -> GFPGAN -> feathered paste-back.

Weights, in the model directory (convert the released .pth files once with `mlx-sd convert-pth`):
  face_restoration/gfpgan.safetensors     GFPGANv1.4.pth
  face_restoration/detection.safetensors  facexlib's detection_mobilenet0.25_Final.pth
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from convert.gfpgan_keys import build_restorer, prepare_restorer_weights
from convert.loader import resolve_dtype
from convert.restoration import load_strict, read_weights
from convert.retinaface_keys import build_detector, prepare_detector_weights
from mlx_sd.engine.backends import Backend
from mlx_sd.faces import align
from mlx_sd.faces.detection import FaceDetector
from mlx_sd.models.gfpgan import GFPGANv1Clean

RESTORER_FILE = "face_restoration/gfpgan.safetensors"
DETECTOR_FILE = "face_restoration/detection.safetensors"


def missing_files(models_dir: Path) -> list[str]:
    """The face-restoration files absent from `models_dir`, as relative names."""
    return [name for name in (RESTORER_FILE, DETECTOR_FILE) if not (Path(models_dir) / name).is_file()]


@dataclass
class FaceRestorer:
    detector: FaceDetector
    restorer: GFPGANv1Clean
    dtype: mx.Dtype = mx.float32

    def restore_crop(self, crop: np.ndarray) -> np.ndarray:
        """GFPGAN on an aligned float RGB crop in [0, 255]; the result is clamped like GFPGANer's."""
        x = mx.array(crop.astype(np.float32))[None] / 127.5 - 1.0
        y = self.restorer(x.astype(self.dtype)).astype(mx.float32)
        return np.array((mx.clip(y[0], -1.0, 1.0) + 1.0) * 127.5)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """An HxWx3 uint8 RGB image with every detected face restored; unchanged without faces."""
        faces = self.detector.detect(pixels)
        if not faces:
            return pixels
        side = self.restorer.config.out_size
        points, mask = align.template(side), align.feathered_mask(side)
        image = pixels.astype(np.float32)
        for face in faces:
            matrix = align.similarity(face.landmarks, points)
            crop = align.warp(pixels, matrix, (side, side), align.CROP_BORDER)
            image = align.paste(image, self.restore_crop(crop), matrix, mask)
        return np.clip(np.round(image), 0, 255).astype(np.uint8)


def load_restorer(path: Path, dtype: mx.Dtype, backend: Backend = Backend.MLX) -> GFPGANv1Clean:
    weights = read_weights(path)
    return backend.prepare(load_strict(build_restorer(weights, path), prepare_restorer_weights(weights), dtype, path))


def load_detector(path: Path, dtype: mx.Dtype, backend: Backend = Backend.MLX) -> FaceDetector:
    weights = read_weights(path)
    network = load_strict(build_detector(weights, path), prepare_detector_weights(weights), dtype, path)
    return FaceDetector(backend.prepare(network), dtype)


def load_face_restorer(models_dir: str | Path, dtype: mx.Dtype | str | None = None,
                       backend: Backend = Backend.MLX) -> FaceRestorer:
    models_dir, dtype = Path(models_dir), resolve_dtype(dtype)
    return FaceRestorer(load_detector(models_dir / DETECTOR_FILE, dtype, backend),
                        load_restorer(models_dir / RESTORER_FILE, dtype, backend), dtype)
