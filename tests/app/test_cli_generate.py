"""`mlx-sd generate`, locally and against a real server, on the tiny SD-1 model (64x64, 2 steps)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from grpc_service.auth import SHARED_SECRET_ENV
from mlx_sd.engine import hires
from mlx_sd.app.cli import app
from mlx_sd.engine.events import EventType, ProgressEvent
from mlx_sd.engine.request import GenerationRequest
from tests.conftest import FIXTURES, fake_result

SMALL = ["--width", "64", "--height", "64", "--steps", "2"]

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, ["generate", *map(str, args)], env={SHARED_SECRET_ENV: None})


def trust(server) -> list[object]:
    return ["--server", f"localhost:{server.port}", "--ca", server.tls.cert_path]


def local(models: Path, out: Path, *args: object):
    return run(*args, "--models-dir", models, "--no-cache", "--out", out)


def written(result) -> list[Path]:
    assert result.exit_code == 0, result.stderr
    return [Path(line) for line in result.stdout.splitlines()]


def test_writes_every_image_with_its_seed_and_parameters(tiny_models: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "out"  # created when missing
    result = local(tiny_models, out, "a red fox", *SMALL, "--seed", 7, "--batch-size", 2, "--batch-count", 2)
    paths = written(result)
    assert [p.name for p in paths] == ["7-0.png", "8-0.png", "9-0.png", "10-0.png"]
    for seed, path in enumerate(paths, start=7):
        with Image.open(path) as image:
            assert image.size == (64, 64)
            parameters = image.info["parameters"]
        assert parameters.startswith("a red fox\n") and f"Seed: {seed}," in parameters
    assert re.search(r"\b4/4\b", result.stderr)  # the progress bar counted every sampling step


def test_a_rerun_writes_identical_images_under_new_names(tiny_models: Path, tmp_path: Path) -> None:
    first = written(local(tiny_models, tmp_path, "a red fox", *SMALL, "--seed", 3, "--batch-size", 2))
    second = written(local(tiny_models, tmp_path, "a red fox", *SMALL, "--seed", 3, "--batch-size", 2))
    assert [p.name for p in first] == ["3-0.png", "4-0.png"]
    assert [p.name for p in second] == ["3-1.png", "4-1.png"]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


@pytest.mark.parametrize(
    ("size", "bar"),
    [
        (("--width", "128", "--height", "192"), "3/3"),  # above the tiny model's 128x128: 2 + 1 refining step
        (("--width", "64", "--height", "64"), "2/2"),  # not above it: hires fix is a no-op
    ],
)
def test_hires_second_pass_steps_join_the_progress(tiny_models: Path, tmp_path: Path, size, bar: str) -> None:
    result = local(tiny_models, tmp_path, "a red fox", *size, "--steps", 2, "--hires", "--denoise", 0.5)
    (path,) = written(result)
    with Image.open(path) as image:
        assert image.size == (int(size[1]), int(size[3]))
    assert re.search(rf"\b{bar}\b", result.stderr)


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("--width", "100"), "--width (width)"),
        (("--cfg", "31"), "--cfg (cfg_scale)"),
        (("--sampler", "Nope"), "--sampler (sampler)"),
        (("--denoise", "1.5"), "--denoise (denoising_strength)"),
        (("--refiner", "r.safetensors", "--refiner-start", "1.5"), "--refiner-start (refiner_start)"),
        (("--lora", "style:11"), "--lora (loras)"),
        (("--clip-skip", "13"), "--clip-skip (clip_skip)"),
    ],
)
def test_an_invalid_value_names_its_option(tmp_path: Path, args: tuple[str, str], option: str) -> None:
    result = local(tmp_path, tmp_path, "a red fox", *args)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {option}: ") and len(result.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_missing_model_is_a_clean_error(models_dir: Path, tmp_path: Path) -> None:
    result = local(models_dir, tmp_path / "out", "a red fox", *SMALL)
    assert result.exit_code == 1
    assert "not found" in result.stderr and "stable-diffusion/model.safetensors" in result.stderr
    assert "Traceback" not in result.stderr and list((tmp_path / "out").iterdir()) == []


def test_an_unusable_out_folder_fails_before_generating(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = local(tmp_path / "no models", tmp_path / "file" / "out", "a red fox", *SMALL)
    assert result.exit_code == 1 and "file" in result.stderr and "not found" not in result.stderr


def test_options_of_the_other_mode_are_refused(tmp_path: Path) -> None:
    assert "need --server" in run("a red fox", "--no-tls").stderr
    remote_with_local_options = run("a red fox", "--server", "localhost:1", "--models-dir", tmp_path)
    assert remote_with_local_options.exit_code == 2 and "local generation only" in remote_with_local_options.stderr
    remote_padding = run("a red fox", "--server", "localhost:1", "--pad-attention-heads")
    assert remote_padding.exit_code == 2 and "--pad-attention-heads: apply to local" in remote_padding.stderr


def test_remote_generation_writes_the_same_images(server_factory, tiny_models: Path, tmp_path: Path) -> None:
    server = server_factory()  # TLS on, the real pipeline over `tiny_models`
    request = ["a red fox", "--negative", "blur", *SMALL, "--seed", 11, "--batch-size", 2]
    request += ["--sampler", "euler a", "--cfg", 7.3]  # any case; a cfg that float32 rounds
    remote = written(run(*request, *trust(server), "--out", tmp_path / "remote"))
    expected = written(local(tiny_models, tmp_path / "local", *request))
    assert [p.name for p in remote] == ["11-0.png", "12-0.png"]
    assert [p.read_bytes() for p in remote] == [p.read_bytes() for p in expected]


def hires_steps_engine(request: GenerationRequest, is_cancelled: Callable[[], bool]) -> Iterator[object]:
    """The step events the pipeline yields for a hires run of `request` as the server received it."""
    second_pass = request.steps - hires.img2img_start(request.steps, request.denoising_strength)
    for step in range(request.steps):
        yield ProgressEvent(EventType.SAMPLING, f"sampling step {step + 1}/{request.steps}", step + 1, request.steps)
    for step in range(second_pass):
        yield ProgressEvent(EventType.SECOND_PASS_SAMPLING, f"hires sampling step {step + 1}/{second_pass}",
                            step + 1, second_pass)
    yield fake_result(request.seed, size=64)


def test_the_progress_total_agrees_with_the_servers_float32_strength(server_factory, tmp_path: Path) -> None:
    server = server_factory(engine=hires_steps_engine)
    # float32's 0.7 is 0.69999999: the server refines int(6.9999999) = 6 steps, not 7.
    options = ["--steps", 10, "--hires", "--denoise", 0.7, "--seed", 5, "--out", tmp_path]
    result = run("a red fox", *options, *trust(server))
    assert [p.name for p in written(result)] == ["5-0.png"]
    assert re.search(r"\b16/16\b", result.stderr)


@pytest.mark.parametrize("bits", ["3", "16"])
def test_quantize_takes_only_8_or_4_bits(tmp_path: Path, bits: str) -> None:
    result = local(tmp_path, tmp_path, "a red fox", "--quantize", bits)
    assert result.exit_code == 2 and "must be 8 or 4" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_quantized_local_generation_writes_its_images(tiny_models: Path, tmp_path: Path) -> None:
    result = local(tiny_models, tmp_path / "out", "a red fox", *SMALL, "--quantize", "8", "--seed", "3")
    assert result.exit_code == 0, result.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["3-0.png"]


@pytest.mark.parametrize(("extra", "message"), [(["--no-cache"], "needs the cache"),
                                                (["--quantize", "8"], "don't combine")])
def test_low_memory_needs_the_cache_and_no_quantization(tmp_path: Path, extra: list[str], message: str) -> None:
    result = run("a red fox", "--models-dir", tmp_path, "--out", tmp_path, "--low-memory", *extra)
    assert result.exit_code == 2 and message in result.stderr


def test_low_memory_local_generation_writes_its_images(tiny_models: Path, tmp_path: Path) -> None:
    result = run("a red fox", *SMALL, "--low-memory", "--seed", "3", "--models-dir", tiny_models,
                 "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["3-0.png"]


def test_padded_attention_heads_local_generation_writes_its_images(tiny_models: Path, tmp_path: Path) -> None:
    result = local(tiny_models, tmp_path / "out", "a red fox", *SMALL, "--pad-attention-heads", "--seed", "3")
    assert result.exit_code == 0, result.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["3-0.png"]


def picture_file(path: Path, size: tuple[int, int] = (64, 64), mode: str = "RGB", colour: object = (30, 140, 220)) -> Path:
    Image.new(mode, size, colour).save(path)
    return path


def test_image_to_image_locally_and_remotely_writes_the_same_images(server_factory, tiny_models: Path,
                                                                    tmp_path: Path) -> None:
    image = picture_file(tmp_path / "in.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    request = ["a red fox", *SMALL, "--steps", 4, "--seed", 3, "--init-image", image, "--mask", tmp_path / "mask.png",
               "--denoise", 0.5, "--mask-blur", 2, "--mask-outset", 3, "--resize-mode", "crop"]
    local_run = local(tiny_models, tmp_path / "local", *request)
    expected = written(local_run)
    assert re.search(r"\b2/2\b", local_run.stderr)  # int(0.5 * 4) steps
    remote = written(run(*request, *trust(server_factory()), "--out", tmp_path / "remote"))
    assert [p.read_bytes() for p in remote] == [p.read_bytes() for p in expected]
    text = Image.open(expected[0]).text["parameters"]
    assert "Denoising strength: 0.5, Resize mode: Crop and resize, Mask blur: 2, Mask outset: 3" in text


def test_image_to_image_defaults_to_a1111s_strength(tiny_models: Path, tmp_path: Path) -> None:
    result = local(tiny_models, tmp_path, "a fox", *SMALL, "--steps", 4, "--init-image", picture_file(tmp_path / "a.png"))
    assert "Denoising strength: 0.75" in Image.open(written(result)[0]).text["parameters"]


def test_a_bad_init_image_names_its_option(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not an image")
    result = run("a fox", "--init-image", tmp_path / "bad.png", "--out", tmp_path)
    assert result.exit_code == 2 and "--init-image (init_image)" in result.stderr
    mask = picture_file(tmp_path / "m.png", (32, 32), "L", 255)
    result = run("a fox", "--init-image", picture_file(tmp_path / "a.png"), "--mask", mask, "--out", tmp_path)
    assert result.exit_code == 2 and "--mask (mask)" in result.stderr
    result = run("a fox", "--init-image", picture_file(tmp_path / "a.png"), "--mask-outset", -101, "--out", tmp_path)
    assert result.exit_code == 2 and "--mask-outset (mask_outset)" in result.stderr


def test_an_sdxl_refiner_finishes_the_image(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(FIXTURES / "sdxl_tiny" / "diffusers", models / "stable-diffusion")
    shutil.copytree(FIXTURES / "sdxl_refiner_tiny" / "diffusers", models / "refiner")
    (path,) = written(local(models, tmp_path, "a red fox", *SMALL, "--seed", 3, "--refiner", "refiner",
                            "--refiner-start", 0.5))
    assert re.search(r"Refiner: refiner \[\w+\], Refiner switch at: 0\.5", Image.open(path).text["parameters"])


def test_loras_and_clip_skip_locally_and_remotely(server_factory, tiny_models: Path, tmp_path: Path) -> None:
    (tiny_models / "lora").mkdir()
    shutil.copy(FIXTURES / "lora" / "kohya.safetensors", tiny_models / "lora" / "style.safetensors")
    request = ["a red fox", *SMALL, "--seed", 5, "--lora", "style:0.7", "--lora", "style.safetensors", "--clip-skip", 2]
    (path,) = written(local(tiny_models, tmp_path / "local", *request))
    with Image.open(path) as image:
        parameters = image.info["parameters"]
    assert parameters.startswith("a red fox <lora:style:0.7> <lora:style:1>\n")
    assert "Clip skip: 2" in parameters and re.search(r'Lora hashes: "style: [0-9a-f]{12}, style: [0-9a-f]{12}"',
                                                      parameters)
    (plain,) = written(local(tiny_models, tmp_path / "plain", "a red fox", *SMALL, "--seed", 5, "--clip-skip", 2))
    assert plain.read_bytes() != path.read_bytes()
    (remote,) = written(run(*request, *trust(server_factory()), "--out", tmp_path / "remote"))
    assert remote.read_bytes() == path.read_bytes()
