"""Face alignment geometry: a similarity fitted to five landmarks, affine warps with bilinear
sampling (cv2.warpAffine's convention), and a feathered paste-back so that only the face changes.

Matrices are 2x3 and map source pixel coordinates to destination ones; pixel (x, y) is the centre
of column x, row y, as in OpenCV.
"""

from __future__ import annotations

import numpy as np

# facexlib's FFHQ five-point template for 512x512 crops (eyes, nose tip, mouth corners), which
# GFPGAN was trained on.
FFHQ_TEMPLATE_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                              [201.26117, 371.41043], [313.08905, 371.15118]])
# Out-of-image pixels of a crop get facexlib's grey (RGB), as its crops do.
CROP_BORDER = (132.0, 133.0, 135.0)


def template(size: int) -> np.ndarray:
    return FFHQ_TEMPLATE_512 * (size / 512.0)


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The rotation + uniform scale + translation taking `src` points closest to `dst` (least
    squares; facexlib uses cv2.estimateAffinePartial2D, the same model fitted robustly)."""
    x, y = src[:, 0], src[:, 1]
    ones, zeros = np.ones_like(x), np.zeros_like(x)
    # x' = a x - b y + tx ; y' = b x + a y + ty
    system = np.concatenate([np.stack([x, -y, ones, zeros], 1), np.stack([y, x, zeros, ones], 1)])
    (a, b, tx, ty), *_ = np.linalg.lstsq(system, np.concatenate([dst[:, 0], dst[:, 1]]), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def invert(matrix: np.ndarray) -> np.ndarray:
    linear = np.linalg.inv(matrix[:, :2])
    return np.concatenate([linear, -linear @ matrix[:, 2:]], axis=1)


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def warp(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int], border: tuple[float, ...] | float = 0.0,
         origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Float HxWxC image warped by `matrix` into a `size` (width, height) canvas whose top-left is
    destination pixel `origin`: each output pixel samples the source bilinearly at the inverse
    mapped position, with `border` outside the source (cv2.BORDER_CONSTANT)."""
    width, height = size
    source = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)))
    source[0, :], source[-1, :], source[:, 0], source[:, -1] = border, border, border, border
    ys, xs = np.mgrid[origin[1]:origin[1] + height, origin[0]:origin[0] + width].astype(np.float64)
    inverse = invert(matrix)
    # Into the padded source's index space, clamped to the border ring.
    sx = np.clip(inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2] + 1, 0, source.shape[1] - 1)
    sy = np.clip(inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2] + 1, 0, source.shape[0] - 1)
    x0 = np.minimum(np.floor(sx).astype(int), source.shape[1] - 2)
    y0 = np.minimum(np.floor(sy).astype(int), source.shape[0] - 2)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    top = source[y0, x0] * (1 - fx) + source[y0, x0 + 1] * fx
    bottom = source[y0 + 1, x0] * (1 - fx) + source[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def feathered_mask(size: int) -> np.ndarray:
    """(size, size, 1) weights of a restored crop: 0 within size/20 of its edge, rising linearly to 1
    over the next size/10 (close to GFPGAN's eroded and blurred square mask)."""
    centres = np.arange(size) + 0.5
    to_edge = np.minimum(centres, size - centres)
    distance = np.minimum(to_edge[:, None], to_edge[None, :])
    return np.clip((distance - size / 20) / (size / 10), 0.0, 1.0)[..., None].astype(np.float32)


def paste(image: np.ndarray, face: np.ndarray, matrix: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Blend a (restored) crop back into the float `image`; `matrix` maps image -> crop pixels.
    Only the crop's bounding box in the image is warped."""
    height, width, _ = image.shape
    inverse = invert(matrix)
    side = face.shape[0]
    corners = apply(inverse, np.array([[-1, -1], [side, -1], [-1, side], [side, side]], dtype=np.float64))
    x0, y0 = np.clip(np.floor(corners.min(0)).astype(int), 0, [width, height])
    x1, y1 = np.clip(np.ceil(corners.max(0)).astype(int) + 1, 0, [width, height])
    if x1 <= x0 or y1 <= y0:
        return image
    size, origin = (x1 - x0, y1 - y0), (x0, y0)
    weight = warp(mask, inverse, size, 0.0, origin)
    region = image[y0:y1, x0:x1]
    out = image.copy()
    out[y0:y1, x0:x1] = weight * warp(face, inverse, size, 0.0, origin) + (1 - weight) * region
    return out
