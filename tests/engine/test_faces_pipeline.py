"""restore_faces and the hires fix's upscaler inside the pipeline, on the tiny SD-1 model with the
restoration fixtures installed in its model directory (see tests/fixtures/restoration/README.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from mlx_sd.engine.errors import MissingWeights
from mlx_sd.engine.events import EventType, ProgressEvent
from mlx_sd.faces import DETECTOR_FILE, RESTORER_FILE
from mlx_sd.engine.model_store import ModelStore
from mlx_sd.engine.pipeline import Pipeline
from mlx_sd.engine.request import GenerationRequest
from mlx_sd.engine.upscale import UPSCALER_FILE, load_upscaler
from tests.conftest import FIXTURES, install_tiny_model

RESTORATION = FIXTURES / "restoration"


def _request(**fields) -> GenerationRequest:
    base = dict(prompt="a portrait", width=64, height=64, steps=2, cfg_scale=7.5, seed=7, sampler="Euler")
    return GenerationRequest(**{**base, **fields}).validated()


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    return install_tiny_model(tmp_path)


def _install_faces(models_dir: Path) -> None:
    (models_dir / "face_restoration").mkdir(exist_ok=True)
    save_file(dict(np.load(RESTORATION / "gfpgan_weights.npz")), str(models_dir / RESTORER_FILE))
    shutil.copy(RESTORATION / "retinaface.safetensors", models_dir / DETECTOR_FILE)


def test_missing_face_weights_fail_before_sampling(models_dir: Path) -> None:
    pipeline = Pipeline(ModelStore(models_dir))
    with pytest.raises(MissingWeights, match=RESTORER_FILE):
        next(pipeline(_request(restore_faces=True)))
    (models_dir / "face_restoration").mkdir()
    save_file(dict(np.load(RESTORATION / "gfpgan_weights.npz")), str(models_dir / RESTORER_FILE))
    with pytest.raises(MissingWeights, match=DETECTOR_FILE):
        next(pipeline(_request(restore_faces=True)))


def test_restore_faces_emits_face_restored_per_batch(models_dir: Path) -> None:
    _install_faces(models_dir)
    items = list(Pipeline(ModelStore(models_dir))(_request(restore_faces=True, batch_count=2)))
    events = [i.type for i in items if isinstance(i, ProgressEvent)]
    assert events.count(EventType.FACE_RESTORED) == 2
    assert events.index(EventType.IMAGE_DECODED) < events.index(EventType.FACE_RESTORED)
    assert len(items[-1].images) == 2
    assert all("Face restoration: GFPGAN" in image.parameters.text() for image in items[-1].images)


def test_hires_fix_uses_the_installed_upscaler(models_dir: Path) -> None:
    request = _request(width=192, height=128, enable_hr=True, denoising_strength=0.5)
    pipeline = Pipeline(ModelStore(models_dir))
    lanczos = list(pipeline(request))[-1]
    (models_dir / "upscaler").mkdir()
    shutil.copy(RESTORATION / "esrgan_compact.safetensors", models_dir / UPSCALER_FILE)
    items = list(pipeline(request))
    assert EventType.IMAGE_UPSCALED in [i.type for i in items if isinstance(i, ProgressEvent)]
    texts = [result.images[0].parameters.text() for result in (items[-1], lanczos)]
    assert "Hires upscaler: Real-ESRGAN" in texts[0] and "Lanczos" in texts[1]
    assert items[-1].images[0] != lanczos.images[0]


def test_finished_images_are_upscaled_after_their_faces_are_restored(models_dir: Path) -> None:
    pipeline = Pipeline(ModelStore(models_dir))
    with pytest.raises(MissingWeights, match="upscaler/model.safetensors"):  # before any sampling
        next(pipeline(_request(upscale=True)))
    plain = list(pipeline(_request(width=64, height=64)))[-1].images[0]
    (models_dir / "upscaler").mkdir()
    shutil.copy(RESTORATION / "esrgan_rrdb_x2.safetensors", models_dir / UPSCALER_FILE)
    for factor, side in ((0, 128), (3, 192)):  # 0: the network's own factor
        items = list(pipeline(_request(width=64, height=64, upscale=True, upscale_factor=factor)))
        image = items[-1].images[0]
        assert image.pixels.shape == (side, side, 3)
        assert [i.type for i in items if isinstance(i, ProgressEvent)][-1] == EventType.IMAGE_UPSCALED
        assert f"Postprocess upscale by: {side // 64}, Postprocess upscaler: Real-ESRGAN" in image.parameters.text()
    expected = load_upscaler(models_dir / UPSCALER_FILE).upscale(plain.pixels)
    assert np.array_equal(list(pipeline(_request(width=64, height=64, upscale=True)))[-1].images[0].pixels, expected)


def test_inpainting_pastes_the_original_after_face_restoration_and_before_upscaling(models_dir: Path) -> None:
    from tests.engine.test_img2img import block_mask, picture, png

    _install_faces(models_dir)
    pipeline = Pipeline(ModelStore(models_dir))
    fields = dict(init_image=png(picture()), mask=png(block_mask()), denoising_strength=0.5, restore_faces=True)
    restored = list(pipeline(_request(**fields)))[-1].images[0].pixels
    kept = block_mask() == 0
    assert np.array_equal(restored[kept], picture()[kept])  # the overlay comes after face restoration
    (models_dir / "upscaler").mkdir()
    shutil.copy(RESTORATION / "esrgan_rrdb_x2.safetensors", models_dir / UPSCALER_FILE)
    items = list(pipeline(_request(**fields, upscale=True)))
    events = [i.type for i in items if isinstance(i, ProgressEvent)]
    assert events[:2] == [EventType.TEXT_ENCODED, EventType.IMAGE_ENCODED]
    assert events[-3:] == [EventType.IMAGE_DECODED, EventType.FACE_RESTORED, EventType.IMAGE_UPSCALED]
    expected = load_upscaler(models_dir / UPSCALER_FILE).upscale(restored)
    assert np.array_equal(items[-1].images[0].pixels, expected)
