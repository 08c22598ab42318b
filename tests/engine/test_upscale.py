"""Real-ESRGAN in MLX against basicsr/realesrgan outputs, and tiling without seams.

Fixtures: tests/fixtures/restoration (made by make_restoration_fixtures.py; see its README).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_sd.engine.backends import Backend
from mlx_sd.engine.errors import CheckpointError
from mlx_sd.models.esrgan import RRDBNet, SRVGGNetCompact, pixel_shuffle, pixel_unshuffle
from mlx_sd.engine.upscale import load_upscaler, tiled

FIXTURES = Path(__file__).parents[1] / "fixtures" / "restoration"
# fp32 on MLX's CPU device, MLX ops or CPU kernels: measured max |ours - ref| / max |ref| <= 5e-7
# (see the README).
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "golden.npz"))


@pytest.mark.parametrize(("name", "arch", "scale"), [
    ("rrdb_x4", RRDBNet, 4), ("rrdb_x2", RRDBNet, 2), ("compact", SRVGGNetCompact, 4),
])
def test_network_matches_reference(golden, backend: Backend, name: str, arch: type, scale: int) -> None:
    upscaler = load_upscaler(FIXTURES / f"esrgan_{name}.safetensors", dtype="float32", backend=backend)
    assert isinstance(upscaler.network, arch) and upscaler.scale == scale
    x = mx.array(golden["esrgan_input"])[None].astype(mx.float32) / 255.0
    ours = np.array(upscaler.network(x)).transpose(0, 3, 1, 2)
    reference = golden[f"esrgan_{name}"]
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() / np.abs(reference).max() < REL_TOL


def test_upscale_uint8_and_resample(golden) -> None:
    upscaler = load_upscaler(FIXTURES / "esrgan_rrdb_x4.safetensors", dtype="float32")
    pixels = golden["esrgan_input"]
    out = upscaler.upscale(pixels)
    expected = np.clip(golden["esrgan_rrdb_x4"][0].transpose(1, 2, 0), 0, 1) * 255
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3)
    assert np.abs(out.astype(np.float64) - expected).max() <= 0.51
    assert upscaler.upscale(pixels, scale=2).shape == (24, 32, 3)
    assert upscaler.upscale(pixels, size=(50, 40)).shape == (40, 50, 3)


def test_odd_sizes_for_unshuffling_models(golden) -> None:
    upscaler = load_upscaler(FIXTURES / "esrgan_rrdb_x2.safetensors", dtype="float32")
    assert upscaler.upscale(golden["esrgan_input"][:11, :15]).shape == (22, 30, 3)


def _synthetic(height: int, width: int) -> np.ndarray:
    """Edges, gradients and texture everywhere, so that any seam would show."""
    y, x = np.mgrid[:height, :width].astype(np.float32)
    rgb = np.stack([np.sin(x / 3.0) * np.cos(y / 5.0), (x + y) / (height + width) * 2 - 1,
                    np.sign(np.sin(x / 7.0 + y / 11.0))], axis=-1)
    rgb += np.random.default_rng(0).normal(0, 0.2, rgb.shape)
    return np.clip((rgb + 1) * 127.5, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", ["rrdb_x4", "compact", "rrdb_x2"])
def test_tiles_leave_no_seams(name: str) -> None:
    upscaler = load_upscaler(FIXTURES / f"esrgan_{name}.safetensors", dtype="float32")
    pixels = _synthetic(70, 90)
    whole = upscaler.upscale(pixels).astype(int)
    upscaler.tile, upscaler.pad = 32, 24
    pieces = upscaler.upscale(pixels).astype(int)
    # The tiny fixtures' receptive field fits in the context: the tiled image is the untiled one.
    assert np.abs(pieces - whole).max() <= 1
    # With a small context the tiles differ a little at their borders, but never visibly.
    upscaler.pad = 4
    assert np.abs(upscaler.upscale(pixels).astype(int) - whole).mean() < 1.0


def test_tiled_covers_every_pixel_once() -> None:
    x = mx.arange(7 * 10 * 2, dtype=mx.float32).reshape(1, 7, 10, 2)
    double = lambda t: mx.repeat(mx.repeat(t, 2, axis=1), 2, axis=2)  # noqa: E731 (a 2x "network")
    assert mx.array_equal(tiled(double, x, 2, tile=3, pad=1), double(x))


def test_pixel_shuffle_round_trip() -> None:
    x = mx.random.normal((2, 4, 6, 12), key=mx.random.key(0))
    assert mx.array_equal(pixel_unshuffle(pixel_shuffle(x, 2), 2), x)


def test_unknown_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    mx.save_safetensors(str(path), {"something.weight": mx.zeros((3, 3))})
    with pytest.raises(CheckpointError, match="neither"):
        load_upscaler(path)
    with pytest.raises(CheckpointError, match="pickle"):
        load_upscaler(tmp_path / "RealESRGAN_x4plus.pth")


def test_upscale_file_writes_a_png(tmp_path: Path, golden) -> None:
    from PIL import Image

    from mlx_sd.engine.upscale import upscale_file

    source = tmp_path / "in.jpg"
    Image.fromarray(golden["esrgan_input"]).save(source, quality=95)
    written = upscale_file(source, None, FIXTURES / "esrgan_compact.safetensors")
    assert written == tmp_path / "in_x4.png" and Image.open(written).size == (64, 48)
    written = upscale_file(source, tmp_path / "half.png", FIXTURES / "esrgan_compact.safetensors", scale=0.5)
    assert Image.open(written).size == (8, 6)


def test_convert_pth_round_trip(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from convert.pth import convert_pth

    weights = mx.load(str(FIXTURES / "esrgan_compact.safetensors"))
    state = {f"module.{k}": torch.from_numpy(np.array(v.astype(mx.float32))) for k, v in weights.items()}
    torch.save({"params_ema": state}, tmp_path / "model.pth")
    upscaler = load_upscaler(convert_pth(tmp_path / "model.pth", tmp_path / "model.safetensors"))
    assert isinstance(upscaler.network, SRVGGNetCompact)


def test_convert_pth_without_torch_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from convert.pth import convert_pth

    monkeypatch.setitem(sys.modules, "torch", None)  # as if PyTorch were not installed
    with pytest.raises(CheckpointError, match="needs PyTorch"):
        convert_pth(tmp_path / "model.pth", tmp_path / "model.safetensors")
