"""The generation pipeline on the tiny SD-1 model: image parity with diffusers, events, seeds, hires fix;
on each backend (the `backend` fixture: MLX ops and the CPU kernels).

Goldens: tests/fixtures/pipeline (see its README), made by diffusers' StableDiffusionPipeline and by
A1111's k-diffusion path on the same weights, noise and schedule.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_sd.engine.backends import Backend
from mlx_sd.engine.errors import InvalidRequest, MissingWeights, ModelNotFound
from mlx_sd.engine.events import EventType, GeneratedImage, GenerationResult, ProgressEvent
from mlx_sd.engine.images import encode_png
from mlx_sd.engine.model_store import ModelStore
from mlx_sd.engine.pipeline import Pipeline
from mlx_sd.engine.request import GenerationRequest
from mlx_sd.models.fused_attention import recording
from mlx_sd.models.clip import CLIPAttention
from mlx_sd.models.layers import Attention
from mlx_sd.models.unet import UNet2DConditionModel
from mlx_sd.models.vae import AutoencoderKL

FIXTURES = Path(__file__).parents[1] / "fixtures"
GOLDEN = np.load(FIXTURES / "pipeline" / "golden.npz")
CASES = json.loads((FIXTURES / "pipeline" / "cases.json").read_text())["cases"]
# fp32 end to end, measured against the reference path: model error moves the image by < 1e-4
# (fixture README); 5e-4 leaves room for that and still catches a wrong timestep or sigma (>= 2e-3).
IMAGE_ATOL = 5e-4
# fp16 activations on MLX ops (as on Metal) against fp32: measured <= 2 levels of 255 (mean 0.2) over
# 3 to 10 steps of the tiny model.
FP16_LEVELS = 3


def tiny_models_dir(root: Path) -> Path:
    shutil.copytree(FIXTURES / "sd1_tiny" / "diffusers", root / "stable-diffusion")
    return root


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> Pipeline:
    return Pipeline(ModelStore(tiny_models_dir(tmp_path_factory.mktemp("models")), backend=backend))


def request(**fields) -> GenerationRequest:
    base = dict(prompt="a photo of an astronaut riding a horse", negative_prompt="blurry", width=64, height=64,
                steps=3, cfg_scale=7.5, seed=1234, sampler="Euler a")
    return GenerationRequest(**{**base, **fields}).validated()


def run(pipeline: Pipeline, req: GenerationRequest) -> tuple[list[ProgressEvent], GenerationResult]:
    items = list(pipeline(req))
    assert isinstance(items[-1], GenerationResult)
    assert all(isinstance(i, ProgressEvent) for i in items[:-1])
    return items[:-1], items[-1]


def pixels(image: GeneratedImage) -> np.ndarray:
    return image.pixels


def pngs(result: GenerationResult) -> list[bytes]:
    """The images as the servers send them (pixels and parameters), to compare whole results."""
    return [encode_png(image.pixels, image.parameters.text()) for image in result.images]


@pytest.mark.parametrize("case", ["euler", "euler_a", "euler_a_cfg1", "dpmpp_2m_karras"])
def test_images_match_the_reference(pipeline: Pipeline, case: str) -> None:
    spec = CASES[case]
    req = request(prompt=spec["prompt"], negative_prompt=spec["negative_prompt"], width=spec["width"],
                  height=spec["height"], steps=spec["steps"], cfg_scale=spec["cfg"], seed=spec["seed"],
                  sampler=spec["sampler"])
    _, result = run(pipeline, req)
    ours = pixels(result.images[0]).astype(np.float64)
    expected = GOLDEN[spec["expected_image"]].astype(np.float64) * 255
    # PNG pixels are rounded to whole levels: 0.5 of rounding plus the float tolerance.
    assert np.abs(ours - expected).max() <= 0.5 + IMAGE_ATOL * 255


def test_dpmpp_2m_karras_differs_from_diffusers_only_by_its_timestep_rounding(pipeline: Pipeline) -> None:
    # diffusers rounds DPM-Solver's model timesteps to integers (fixture README); A1111 and we do not.
    spec = CASES["dpmpp_2m_karras"]
    _, result = run(pipeline, request(steps=spec["steps"], sampler=spec["sampler"], seed=spec["seed"]))
    gap = np.abs(pixels(result.images[0]) - GOLDEN["dpmpp_2m_karras/diffusers/image"] * 255).max() / 255
    assert gap < 4e-3


def test_events_images_and_parameters(pipeline: Pipeline) -> None:
    events, result = run(pipeline, request(width=128, height=64, batch_size=2, batch_count=2, seed=40, steps=2))
    per_batch = [EventType.SAMPLING] * 2 + [EventType.IMAGE_DECODED]
    assert [e.type for e in events] == [EventType.TEXT_ENCODED] + per_batch * 2
    steps = [e for e in events if e.type == EventType.SAMPLING]
    assert [e.name for e in steps] == ["sampling step 1/2", "sampling step 2/2"] * 2
    assert [(e.step, e.total) for e in steps] == [(1, 2), (2, 2)] * 2
    assert all(e.preview is None for e in events)  # none asked for
    assert all(b.timestamp_ms >= a.timestamp_ms for a, b in zip(events, events[1:]))
    assert [image.seed for image in result.images] == [40, 41, 42, 43]
    for image in result.images:
        assert image.pixels.shape == (64, 128, 3) and image.pixels.dtype == np.uint8
        info = image.parameters.text()
        assert info.startswith("a photo of an astronaut riding a horse\nNegative prompt: blurry\n")
        assert f"Seed: {image.seed}," in info and "Size: 128x64" in info and "Sampler: Euler a" in info


def test_the_same_request_gives_the_same_bytes(pipeline: Pipeline) -> None:
    assert pngs(run(pipeline, request())[1]) == pngs(run(pipeline, request())[1])


def test_image_i_of_a_batch_is_the_image_of_seed_plus_i(pipeline: Pipeline) -> None:
    batch = run(pipeline, request(batch_size=2, seed=77))[1].images
    alone = run(pipeline, request(seed=78))[1].images
    assert pngs(GenerationResult(batch[1:])) == pngs(GenerationResult(alone))  # bit for bit
    assert np.abs(pixels(batch[0]).astype(int) - pixels(batch[1])).max() > 10


def test_the_networks_run_image_by_image(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    # What makes an image independent of its batch, on any device: no matrix product mixes two images' rows.
    rows = {"unet": [], "decode": []}
    unet_call, decode = UNet2DConditionModel.__call__, AutoencoderKL.decode

    def recorded_unet(self, x: mx.array, *args, **kwargs) -> mx.array:
        rows["unet"].append(x.shape[0])
        return unet_call(self, x, *args, **kwargs)

    def recorded_decode(self, latents: mx.array) -> mx.array:
        rows["decode"].append(latents.shape[0])
        return decode(self, latents)

    monkeypatch.setattr(UNet2DConditionModel, "__call__", recorded_unet)
    monkeypatch.setattr(AutoencoderKL, "decode", recorded_decode)
    run(pipeline, request(batch_size=3, steps=2))
    assert rows == {"unet": [2] * 3 * 2, "decode": [1] * 3}  # both guidance halves, 3 images, 2 steps


def test_a_random_seed_is_reported_and_reproduces_the_image(pipeline: Pipeline) -> None:
    _, first = run(pipeline, request(seed=-1))
    seed = first.images[0].seed
    assert 0 <= seed < 2**32 and first.images[0].parameters.seed == seed
    assert pngs(run(pipeline, request(seed=seed))[1]) == pngs(first)


def test_a_prompt_longer_than_one_window_is_used_whole(pipeline: Pipeline) -> None:
    long = " ".join(["a red house by the sea"] * 20)  # ~120 tokens: two windows
    tail_changed = long + " at night"
    assert pngs(run(pipeline, request(prompt=long))[1]) != pngs(run(pipeline, request(prompt=tail_changed))[1])


def test_hires_fix_runs_a_second_pass_at_the_requested_size(pipeline: Pipeline) -> None:
    # The tiny UNet's native side is 16 latents = 128 px, so 192x128 is larger than native.
    events, result = run(pipeline, request(width=192, height=128, enable_hr=True, steps=4, denoising_strength=0.5))
    types = [e.type for e in events]
    assert types == (
        [EventType.TEXT_ENCODED] + [EventType.SAMPLING] * 4 + [EventType.IMAGE_DECODED, EventType.IMAGE_UPSCALED,
         EventType.SECOND_PASS_IMAGE_ENCODED] + [EventType.SECOND_PASS_SAMPLING] * 2
        + [EventType.SECOND_PASS_IMAGE_DECODED]
    )
    assert result.images[0].pixels.shape == (128, 192, 3)
    assert "Denoising strength: 0.5, First pass size: 128x128, Hires resize: 192x128" in result.images[0].parameters.text()


def test_hires_fix_at_or_below_native_size_is_a_single_pass(pipeline: Pipeline) -> None:
    events, result = run(pipeline, request(width=128, height=128, enable_hr=True, steps=2))
    assert EventType.SECOND_PASS_SAMPLING not in {e.type for e in events}
    assert pngs(result) == pngs(run(pipeline, request(width=128, height=128, steps=2))[1])


def test_an_explicit_first_pass_size_is_used(pipeline: Pipeline) -> None:
    events, result = run(pipeline, request(width=192, height=128, enable_hr=True, steps=2, denoising_strength=1.0,
                                           hires_first_width=64, hires_first_height=64))
    assert "First pass size: 64x64, Hires resize: 192x128" in result.images[0].parameters.text()
    assert [(e.step, e.total) for e in events if e.type == EventType.SECOND_PASS_SAMPLING] == [(1, 2), (2, 2)]


def test_previews_carry_the_first_images_latents_every_n_steps(pipeline: Pipeline) -> None:
    events, _ = run(pipeline, request(width=128, height=64, steps=4, batch_size=2, preview_every=2))
    previews = [(e.step, e.preview) for e in events if e.type == EventType.SAMPLING]
    assert [step for step, preview in previews if preview is not None] == [2, 4]
    assert all(p.shape == (8, 16, 4) and p.dtype == np.float32 for _, p in previews if p is not None)
    assert np.abs(previews[1][1] - previews[3][1]).max() > 0


def test_clip_skip_reads_an_earlier_layer_and_is_recorded(pipeline: Pipeline) -> None:
    skipped = run(pipeline, request(clip_skip=2))[1]
    assert "Clip skip: 2" in skipped.images[0].parameters.text()
    assert "Clip skip" not in run(pipeline, request())[1].images[0].parameters.text()
    assert np.abs(skipped.images[0].pixels.astype(int) - run(pipeline, request())[1].images[0].pixels).max() > 0
    with pytest.raises(InvalidRequest, match="clip_skip: must be at most 2"):  # the tiny encoder has 2 layers
        next(pipeline(request(clip_skip=3)))


def test_cancellation_stops_within_a_step(pipeline: Pipeline) -> None:
    seen: list[ProgressEvent] = []
    for item in pipeline(request(steps=10), lambda: len(seen) >= 3):
        seen.append(item)
    assert [e.type for e in seen] == [EventType.TEXT_ENCODED, EventType.SAMPLING, EventType.SAMPLING]


def test_restore_faces_without_its_weights_is_refused_before_any_work(pipeline: Pipeline) -> None:
    with pytest.raises(MissingWeights, match="face_restoration/gfpgan.safetensors"):
        next(pipeline(dataclasses.replace(request(), restore_faces=True)))


def test_a_missing_model_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="stable-diffusion/model.safetensors"):
        next(Pipeline(ModelStore(tmp_path))(request()))


def test_the_model_is_reloaded_when_its_files_change(tmp_path: Path) -> None:
    models = tiny_models_dir(tmp_path)
    pipeline = Pipeline(ModelStore(models))
    before = run(pipeline, request(steps=2))[1]
    assert pngs(run(pipeline, request(steps=2))[1]) == pngs(before)
    (models / "vae").mkdir()
    shutil.copy(FIXTURES / "sd1_tiny" / "vae_original" / "model.safetensors", models / "vae" / "model.safetensors")
    after = run(pipeline, request(steps=2))[1]
    assert pngs(after) != pngs(before)


def test_fp16_stored_weights_compute_in_their_backends_dtype(pipeline: Pipeline, backend: Backend,
                                                              tmp_path: Path) -> None:
    # The tiny model's weights are exact in fp16, so only the compute dtype can change the image:
    # the CPU kernels compute in fp32 (a level at most, from rounding), MLX ops in fp16 as on Metal.
    store = ModelStore(tiny_models_dir(tmp_path), dtype="float16", backend=backend)
    assert store.get().activation_dtype == (mx.float32 if backend is Backend.CPU else mx.float16)
    ours = pixels(run(Pipeline(store), request())[1].images[0]).astype(int)
    difference = np.abs(ours - pixels(run(pipeline, request())[1].images[0]))
    assert difference.max() <= (1 if backend is Backend.CPU else FP16_LEVELS)


def test_a_quantized_model_generates_nearly_the_same_image(pipeline: Pipeline, backend: Backend,
                                                           tmp_path: Path) -> None:
    store = ModelStore(tiny_models_dir(tmp_path), quantize_bits=8, backend=backend)
    quantized = pixels(run(Pipeline(store), request())[1].images[0]).astype(int)
    assert any(type(m).__name__ == "QuantizedLinear" for _, m in store.get().models.unet.named_modules())
    difference = np.abs(quantized - pixels(run(pipeline, request())[1].images[0]))
    assert 0 < difference.max() <= 8 and difference.mean() < 1  # 8-bit weights: close, not equal


def test_low_memory_mode_frees_the_text_encoder_and_gives_the_same_image(pipeline: Pipeline, backend: Backend,
                                                                        tmp_path: Path) -> None:
    store = ModelStore(tiny_models_dir(tmp_path / "models"), cache_dir=tmp_path / "cache", low_memory=True,
                       backend=backend)
    low = Pipeline(store)
    encoder = store.get().models.text_encoder
    size = sum(p.nbytes for _, p in tree_flatten(encoder.parameters()))
    for _ in range(2):  # the second request reads the weights back
        held = mx.get_active_memory()
        images = pngs(run(low, request())[1])
        mx.clear_cache()
        assert mx.get_active_memory() <= held  # the text encoder was freed again after encoding
        assert images == pngs(run(pipeline, request())[1])
    before = mx.get_active_memory()
    mx.eval(encoder.parameters())  # what a resident text encoder holds
    assert mx.get_active_memory() - before >= size
    store.get().release_text_encoder()
    assert mx.get_active_memory() <= before


@pytest.mark.parametrize(("options", "message"), [({"cache_dir": None}, "without the cache"),
                                                   ({"quantize_bits": 8}, "cannot be combined")])
def test_low_memory_mode_needs_the_cache_and_no_quantization(tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelStore(tmp_path, low_memory=True, **{"cache_dir": tmp_path, **options})


def test_the_seed_mode_picks_the_noise(pipeline: Pipeline) -> None:
    torch_cpu = pngs(run(pipeline, request())[1])
    assert pngs(run(pipeline, request(seed_mode="legacy"))[1]) == torch_cpu  # served as torch_cpu
    nvidia = run(pipeline, request(seed_mode="nvidia_gpu"))[1]
    assert np.abs(pixels(nvidia.images[0]).astype(int) - run(pipeline, request())[1].images[0].pixels).max() > 10
    assert pngs(run(pipeline, request(seed_mode="nvidia_gpu"))[1]) == pngs(nvidia)


def test_tcd_uses_the_requests_gamma(pipeline: Pipeline) -> None:
    low, high = (run(pipeline, request(sampler="TCD", stochastic_sampling_gamma=g))[1].images[0] for g in (0.0, 0.9))
    assert np.abs(pixels(low).astype(int) - pixels(high)).max() > 10
    assert low.parameters.sampler == "TCD"


def test_padded_attention_heads_give_the_same_image(pipeline: Pipeline, backend: Backend, tmp_path: Path) -> None:
    store = ModelStore(tiny_models_dir(tmp_path / "models"), backend=backend, pad_attention_heads=True)
    models = store.get().models
    assert all(m.pad_heads for network in (models.text_encoder, models.unet, models.vae) for m in network.modules()
               if isinstance(m, (Attention, CLIPAttention)))
    with recording() as calls:
        padded = run(Pipeline(store), request())[1]
    plain = run(pipeline, request())[1]
    if backend is Backend.CPU:  # its own attention runs: the padding is not applied
        assert calls == [] and pngs(padded) == pngs(plain)
    else:
        assert calls and np.abs(pixels(padded.images[0]).astype(int) - pixels(plain.images[0])).max() <= 1
