"""Face restoration in MLX: GFPGAN and RetinaFace against gfpgan/facexlib outputs, detection
post-processing, and the alignment / paste-back geometry.

Fixtures: tests/fixtures/restoration (made by make_restoration_fixtures.py; see its README).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

from mlx_sd.engine.backends import Backend
from mlx_sd.faces import DETECTOR_FILE, RESTORER_FILE, load_face_restorer, missing_files
from mlx_sd.faces import align
from mlx_sd.faces.detection import FaceDetector, decode_boxes, decode_landmarks, nms, prior_boxes
from mlx_sd.faces.restore import load_detector, load_restorer

FIXTURES = Path(__file__).parents[1] / "fixtures" / "restoration"
# fp32 on MLX's CPU device, MLX ops or CPU kernels: measured relative errors <= 1e-6 (see the README).
REL_TOL = 1e-5


def _rel(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "golden.npz"))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory with the fixture networks as face_restoration/*.safetensors."""
    root = tmp_path_factory.mktemp("faces")
    (root / "face_restoration").mkdir()
    save_file(dict(np.load(FIXTURES / "gfpgan_weights.npz")), str(root / RESTORER_FILE))
    shutil.copy(FIXTURES / "retinaface.safetensors", root / DETECTOR_FILE)
    return root


@pytest.fixture(scope="module")
def detector(models_dir: Path, backend: Backend) -> FaceDetector:
    return load_detector(models_dir / DETECTOR_FILE, mx.float32, backend)


def test_restorer_matches_reference(golden, models_dir: Path, backend: Backend) -> None:
    net = load_restorer(models_dir / RESTORER_FILE, mx.float32, backend)
    assert net.config.out_size == 512 and net.config.different_w and net.config.sft_half
    x = mx.array(golden["gfpgan_input"])[None].astype(mx.float32) / 127.5 - 1.0
    out = np.array(net(x)).transpose(0, 3, 1, 2)
    assert _rel(out[:, :, ::4, ::4], golden["gfpgan_output_grid"]) < REL_TOL
    stats = np.array([out.mean(), np.abs(out).mean(), out.std()])
    np.testing.assert_allclose(stats, golden["gfpgan_output_stats"], rtol=1e-5)


def test_detector_heads_match_reference(golden, detector: FaceDetector) -> None:
    loc, conf, landms = detector.raw(golden["retinaface_input"])
    for ours, name in ((loc, "loc"), (conf, "conf"), (landms, "landms")):
        assert _rel(ours, golden[f"retinaface_{name}"][0]) < REL_TOL


def test_decoding_matches_facexlib(golden) -> None:
    height, width = golden["retinaface_input"].shape[:2]
    priors = prior_boxes(height, width)
    np.testing.assert_allclose(priors, golden["retinaface_priors"], atol=1e-6)
    boxes = decode_boxes(golden["retinaface_loc"][0], priors) * np.array([width, height] * 2)
    landmarks = decode_landmarks(golden["retinaface_landms"][0], priors) * np.array([width, height] * 5)
    np.testing.assert_allclose(boxes, golden["retinaface_boxes"], atol=1e-3)
    np.testing.assert_allclose(landmarks, golden["retinaface_landmarks"], atol=1e-3)


def test_nms_keeps_the_best_of_each_overlapping_group() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 4.0], [21, 20, 31, 30]])
    scores = np.array([0.9, 0.95, 0.5, 0.8, 0.6])
    # 1 beats 0 (IoU 0.68); 3 overlaps 1 by 30/130 and survives; 4 beats 2 (IoU 0.82).
    assert nms(boxes, scores, 0.4) == [1, 3, 4]
    assert nms(boxes, scores, 0.9) == [1, 0, 3, 4, 2]
    assert nms(boxes[:0], scores[:0], 0.4) == []


def test_detect_thresholds_and_scales(golden, detector: FaceDetector) -> None:
    pixels = golden["retinaface_input"]
    detector.conf_threshold = 1.0
    assert detector.detect(pixels) == []
    detector.conf_threshold = 0.0
    faces = detector.detect(pixels)
    detector.conf_threshold = 0.97
    scores = [f.score for f in faces]
    assert faces and scores == sorted(scores, reverse=True)
    # Every face is one of the reference's decoded boxes, in pixels, with its landmarks.
    for face in faces:
        i = int(np.argmin(np.abs(golden["retinaface_boxes"] - face.box).sum(1)))
        np.testing.assert_allclose(face.box, golden["retinaface_boxes"][i], atol=1e-3)
        np.testing.assert_allclose(face.landmarks.reshape(-1), golden["retinaface_landmarks"][i], atol=1e-3)
        assert face.score == pytest.approx(float(golden["retinaface_conf"][0, i, 1]), abs=1e-6)


def test_warp_matches_opencv(golden) -> None:
    out = align.warp(golden["warp_src"], golden["warp_matrix"], (36, 30), (135, 133, 132))
    # OpenCV quantises sample positions to 1/32 pixel and rounds to uint8: across a full-range
    # edge that moves a value by up to 255/32, plus rounding.
    error = np.abs(out - golden["warp_out"])
    assert error.max() <= 255 / 32 + 0.5 and error.mean() < 0.6


def test_similarity_recovers_a_known_transform() -> None:
    angle, scale = np.deg2rad(-23), 1.7
    truth = np.array([[scale * np.cos(angle), -scale * np.sin(angle), 40.0],
                      [scale * np.sin(angle), scale * np.cos(angle), -12.5]])
    landmarks = np.array([[30.0, 40], [60, 41], [45, 55], [33, 70], [58, 69]])
    fitted = align.similarity(landmarks, align.apply(truth, landmarks))
    np.testing.assert_allclose(fitted, truth, atol=1e-9)
    np.testing.assert_allclose(align.apply(align.invert(fitted), align.apply(fitted, landmarks)), landmarks)


def test_align_then_paste_an_identity_restorer_keeps_the_image() -> None:
    y, x = np.mgrid[:160, :200].astype(np.float32)
    image = np.stack([x, y, (x + y) / 2], -1)  # bilinear sampling is exact on linear ramps
    landmarks = align.template(64) * 1.3 + [50.0, 30.0]
    matrix = align.similarity(landmarks, align.template(64))
    crop = align.warp(image, matrix, (64, 64), align.CROP_BORDER)
    pasted = align.paste(image, crop, matrix, align.feathered_mask(64))
    np.testing.assert_allclose(pasted, image, atol=1e-3)
    # A changed crop changes the image only under the crop's footprint, fully at its centre.
    pasted = align.paste(image, np.zeros_like(crop), matrix, align.feathered_mask(64))
    changed = np.abs(pasted - image).max(-1) > 1e-3
    footprint = align.apply(align.invert(matrix), np.array([[0.0, 0], [64, 64]]))
    rows, cols = np.nonzero(changed)
    assert footprint[0, 0] <= cols.min() and cols.max() <= footprint[1, 0]
    assert footprint[0, 1] <= rows.min() and rows.max() <= footprint[1, 1]
    centre = np.round(align.apply(align.invert(matrix), np.array([[32.0, 32]]))).astype(int)[0]
    assert pasted[centre[1], centre[0]].max() == pytest.approx(0, abs=1e-3)


def test_restore_faces_changes_only_faces(golden, models_dir: Path) -> None:
    restorer = load_face_restorer(models_dir, "float32")
    pixels = np.repeat(np.repeat(golden["retinaface_input"], 2, 0), 2, 1)  # 200x240
    restorer.detector.conf_threshold = 1.0  # random weights: nothing passes
    assert np.array_equal(restorer(pixels), pixels)
    restorer.detector.conf_threshold = 0.0
    faces = restorer.detector.detect(pixels)[:1]
    restorer.detector.detect = lambda _: faces  # one garbage "face" from the random detector
    out = restorer(pixels)
    assert out.dtype == np.uint8 and out.shape == pixels.shape and not np.array_equal(out, pixels)
    matrix = align.similarity(faces[0].landmarks, align.template(512))
    footprint = align.apply(align.invert(matrix), np.array([[0.0, 0], [512, 0], [0, 512], [512, 512]]))
    rows, cols = np.nonzero((out != pixels).any(-1))
    assert footprint[:, 0].min() - 1 <= cols.min() and cols.max() <= footprint[:, 0].max() + 1
    assert footprint[:, 1].min() - 1 <= rows.min() and rows.max() <= footprint[:, 1].max() + 1


def test_missing_files_are_named(tmp_path: Path, models_dir: Path) -> None:
    assert missing_files(tmp_path) == [RESTORER_FILE, DETECTOR_FILE]
    assert missing_files(models_dir) == []
