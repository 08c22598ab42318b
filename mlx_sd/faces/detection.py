"""RetinaFace post-processing as facexlib does it: prior boxes, decoding, thresholds and NMS."""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_sd.models.retinaface import RetinaFace

# facexlib's mobilenet0.25 configuration: prior sizes per level, level strides, the variances
# the offsets were encoded with, and the BGR channel means subtracted from the input.
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCE = (0.1, 0.2)
MEAN_BGR = (104.0, 117.0, 123.0)
# FaceRestoreHelper's choices: confidence 0.97, NMS IoU 0.4, and faces whose eyes are closer than
# 5 pixels (profiles, tiny faces) are skipped (GFPGANer's eye_dist_threshold).
CONF_THRESHOLD = 0.97
NMS_THRESHOLD = 0.4
MIN_EYE_DISTANCE = 5.0


@dataclass(frozen=True)
class Face:
    box: np.ndarray  # (4,) x0, y0, x1, y1 in pixels
    score: float
    landmarks: np.ndarray  # (5, 2) x, y: left eye, right eye, nose, mouth left, mouth right


def prior_boxes(height: int, width: int) -> np.ndarray:
    """(N, 4) centre-size priors, normalised, ordered level, row, column, size (as the heads)."""
    levels = []
    for step, sizes in zip(STEPS, MIN_SIZES):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy, cx = np.meshgrid((np.arange(rows) + 0.5) * step / height, (np.arange(cols) + 0.5) * step / width,
                             indexing="ij")
        per_size = [np.stack([cx, cy, np.full_like(cx, s / width), np.full_like(cx, s / height)], -1) for s in sizes]
        levels.append(np.stack(per_size, axis=2).reshape(-1, 4))
    return np.concatenate(levels).astype(np.float32)


def decode_boxes(loc: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """Normalised x0, y0, x1, y1 from the regressed centre offsets and log-size ratios."""
    centre = priors[:, :2] + loc[:, :2] * VARIANCE[0] * priors[:, 2:]
    size = priors[:, 2:] * np.exp(loc[:, 2:] * VARIANCE[1])
    return np.concatenate([centre - size / 2, centre + size / 2], axis=1)


def decode_landmarks(pre: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """Normalised (N, 10) landmark coordinates: offsets from each prior's centre, in prior sizes."""
    offsets = pre.reshape(-1, 5, 2) * VARIANCE[0] * priors[:, None, 2:]
    return (priors[:, None, :2] + offsets).reshape(-1, 10)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy non-maximum suppression (torchvision's rule: IoU above `threshold` is dropped)."""
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        best, order = order[0], order[1:]
        keep.append(int(best))
        low = np.maximum(boxes[best, :2], boxes[order, :2])
        high = np.minimum(boxes[best, 2:], boxes[order, 2:])
        inter = np.prod(np.clip(high - low, 0, None), axis=1)
        order = order[inter / (areas[best] + areas[order] - inter) <= threshold]
    return keep


class FaceDetector:
    def __init__(self, network: RetinaFace, dtype: mx.Dtype = mx.float32,
                 conf_threshold: float = CONF_THRESHOLD, nms_threshold: float = NMS_THRESHOLD) -> None:
        self.network, self.dtype = network, dtype
        self.conf_threshold, self.nms_threshold = conf_threshold, nms_threshold

    def raw(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The network's (loc, scores, landmark offsets) for one HxWx3 uint8 RGB image."""
        x = mx.array(pixels[:, :, ::-1].astype(np.float32)) - mx.array(MEAN_BGR)
        loc, conf, landms = self.network(x[None].astype(self.dtype))
        return tuple(np.array(t[0].astype(mx.float32)) for t in (loc, conf, landms))

    def detect(self, pixels: np.ndarray) -> list[Face]:
        """Faces in an HxWx3 uint8 RGB image, most confident first."""
        height, width, _ = pixels.shape
        loc, conf, landms = self.raw(pixels)
        priors = prior_boxes(height, width)
        boxes = decode_boxes(loc, priors) * np.array([width, height] * 2, dtype=np.float32)
        points = decode_landmarks(landms, priors) * np.array([width, height] * 5, dtype=np.float32)
        scores = conf[:, 1]
        hits = np.flatnonzero(scores > self.conf_threshold)
        faces = [Face(boxes[i], float(scores[i]), points[i].reshape(5, 2))
                 for i in (hits[k] for k in nms(boxes[hits], scores[hits], self.nms_threshold))]
        return [f for f in faces if np.linalg.norm(f.landmarks[0] - f.landmarks[1]) >= MIN_EYE_DISTANCE]
