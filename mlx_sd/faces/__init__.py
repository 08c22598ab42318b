"""Face restoration: RetinaFace detection, five-landmark alignment, GFPGAN, feathered paste-back."""

from mlx_sd.faces.restore import DETECTOR_FILE, RESTORER_FILE, FaceRestorer, load_face_restorer, missing_files

__all__ = ["DETECTOR_FILE", "RESTORER_FILE", "FaceRestorer", "load_face_restorer", "missing_files"]
