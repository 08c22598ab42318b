"""The memory guard: the estimate, the budget check, and refusals over the API with the tiny model."""

from __future__ import annotations

from pathlib import Path

import grpc
import mlx.core as mx
import pytest

from grpc_service.generated import imageservice_pb2 as pb
from mlx_sd.engine.errors import InvalidRequest, MemoryBudgetExceeded
from mlx_sd.engine.memory_budget import (
    VAE_LIVE_MAPS,
    VAE_LIVE_MAPS_CPU,
    MemoryBudget,
    ModelShape,
    estimate_request_bytes,
    format_bytes,
)
from mlx_sd.engine.model_store import ModelStore
from mlx_sd.models.unet import UNetConfig
from mlx_sd.models.vae import VAEConfig
from mlx_sd.engine.pipeline import Pipeline
from mlx_sd.engine.request import GenerationRequest

TINY_SHAPE = ModelShape(attention_heads=8, vae_full_resolution_channels=32)


def test_the_attention_term_is_the_documented_formula() -> None:
    estimate = estimate_request_bytes(512, 512, 1, 2)
    assert estimate.unet_attention == 4096**2 * 8 * 2 * 2  # tokens^2 x heads x CFG x fp16, for one image


def test_the_estimate_grows_with_area_squared_and_a_batch_adds_only_its_latents() -> None:
    small, large = estimate_request_bytes(256, 256, 1, 4), estimate_request_bytes(512, 512, 1, 4)
    assert large.unet_attention == 16 * small.unet_attention  # 4x the tokens, squared
    batch = estimate_request_bytes(256, 256, 3, 4)  # the networks run image by image
    assert batch.latents == 3 * small.latents and batch.total == small.total + 2 * small.latents


def test_the_shape_is_read_from_the_models_configs() -> None:
    assert ModelShape.of(UNetConfig(), VAEConfig()) == ModelShape()  # SD 1.x: 8 heads, 256 channels
    assert ModelShape.of(UNetConfig(attention_head_dim=(5, 10, 20, 20)), VAEConfig(block_out_channels=(32,))) == \
        ModelShape(attention_heads=5, vae_full_resolution_channels=32)
    sdxl = UNetConfig(block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"))
    assert ModelShape.of(sdxl, VAEConfig()) == ModelShape(attention_heads=10, attention_level=1)


def test_sdxls_attention_is_counted_at_its_first_attention_level() -> None:
    # at 1024x1024 SDXL's first attention has 64x64 tokens and 10 heads: that matrix, batch 1, CFG, fp16
    estimate = estimate_request_bytes(1024, 1024, 1, 2, ModelShape(attention_heads=10, attention_level=1))
    assert estimate.unet_attention == (64 * 64) ** 2 * 10 * 2 * 2


def test_an_upcast_vae_is_counted_in_fp32() -> None:
    shape = ModelShape.of(UNetConfig(), VAEConfig(), vae_itemsize=4)
    assert shape == ModelShape(vae_itemsize=4)
    fp16 = estimate_request_bytes(1024, 1024, 1, 2, ModelShape())
    upcast = estimate_request_bytes(1024, 1024, 1, 2, shape)
    assert upcast.vae_decode == 4 * (1024 * 1024 * 256 * VAE_LIVE_MAPS + 16384**2) == 2 * fp16.vae_decode
    assert upcast.unet_attention == fp16.unet_attention


def test_a_request_that_could_never_fit_is_an_invalid_argument_naming_the_limit() -> None:
    with pytest.raises(InvalidRequest, match=r"memory budget of 1\.00 GiB") as caught:
        MemoryBudget(1024**3).check(2048, 2048, 8, 2, in_use=0)
    assert str(caught.value).startswith("width x height x batch_size: 2048x2048 with batch_size 8 needs about")


def test_a_request_that_does_not_fit_beside_the_weights_is_resource_exhausted() -> None:
    needed = estimate_request_bytes(512, 512, 1, 2).total
    budget = MemoryBudget(needed + 100)
    assert budget.check(512, 512, 1, 2, in_use=100).total == needed  # exactly fits
    with pytest.raises(MemoryBudgetExceeded, match=f"beside the {format_bytes(101)} in use"):
        budget.check(512, 512, 1, 2, in_use=101)


GIB = 1024**3
# SD 1.x in fp16: UNet, CLIP text encoder and VAE parameters (859.52 M, 123.06 M, 83.65 M) x 2 bytes.
SD1_FP16_WEIGHTS = (859_520_964 + 123_060_480 + 83_653_863) * 2


def metal_formula(width: int, height: int, batch: int) -> int:
    """docs/api.md's Metal estimate for SD 1.x (8 heads, C = 256, 8 live maps), b = 2 bytes."""
    tokens = (width // 8) * (height // 8)
    latents = batch * 4 * tokens * 4 * 4
    attention = tokens**2 * 8 * 2 * 2
    vae = 2 * (width * height * 256 * 8 + tokens**2)
    return latents + attention + vae


def mac_budget(memory_gib: int) -> MemoryBudget:
    """Metal's default on an Apple silicon Mac: the working set it recommends (2/3 of memory up to 24 GB,
    as MLX reports it there), soft, under physical memory."""
    return MemoryBudget(memory_gib * GIB * 2 // 3, hard_limit=memory_gib * GIB)


@pytest.mark.parametrize(
    "memory_gib, width, height, batch, outcome",
    [
        (8, 512, 512, 1, "runs"),  # 3.8 GB with the weights, under the 5.3 GiB working set
        (8, 512, 512, 4, "runs"),  # a batch adds only its latents: 3.8 GB
        (8, 768, 768, 1, "warns"),  # 7.4 GB: past the working set, within the 8 GiB
        (8, 1024, 1024, 1, "refused"),  # 13.4 GB alone: more than the Mac has
        (16, 512, 512, 4, "runs"),
        (16, 768, 768, 2, "runs"),  # under the 10.7 GiB working set
        (16, 1024, 1024, 1, "warns"),  # 15.6 GB: within 16 GiB
        (24, 768, 768, 4, "runs"),  # 7.4 GB, under the 16 GiB working set
        (24, 1024, 1024, 4, "runs"),  # 15.6 GB
        (24, 1152, 1152, 1, "warns"),  # 22.2 GB: past the working set, within 24 GiB
        (24, 1536, 1536, 1, "refused"),  # 55.9 GB alone
    ],
)
def test_the_metal_budget_on_8_16_and_24_gb_macs(memory_gib, width, height, batch, outcome, caplog) -> None:
    estimate = estimate_request_bytes(width, height, batch, 2, ModelShape(), VAE_LIVE_MAPS)
    assert estimate.total == metal_formula(width, height, batch)
    budget = mac_budget(memory_gib)
    if outcome == "refused":
        with pytest.raises(InvalidRequest, match=f"more than the physical memory of {memory_gib}.00 GiB"):
            budget.check(width, height, batch, 2, SD1_FP16_WEIGHTS)
        return
    with caplog.at_level("WARNING", logger="mlx_sd.engine.memory_budget"):
        budget.check(width, height, batch, 2, SD1_FP16_WEIGHTS)
    warned = [r.getMessage() for r in caplog.records]
    assert bool(warned) == (outcome == "warns")
    assert all("more than the recommended GPU working set" in message for message in warned)


def test_metal_refuses_beside_the_weights_only_beyond_physical_memory() -> None:
    budget = mac_budget(16)
    needed = estimate_request_bytes(1024, 1024, 1, 2).total
    with pytest.raises(MemoryBudgetExceeded, match="more than the physical memory of 16.00 GiB"):
        budget.check(1024, 1024, 1, 2, in_use=16 * GIB - needed + 1)


def test_an_explicit_budget_still_refuses_on_metal() -> None:
    """--memory-budget is a hard limit, whatever the device."""
    with pytest.raises(InvalidRequest, match="more than the memory budget of 4.00 GiB"):
        MemoryBudget(4 * GIB).check(1024, 1024, 1, 2, in_use=0)


def test_the_estimate_bounds_the_measured_peak_of_the_tiny_model(tiny_models: Path) -> None:
    pipeline = Pipeline(ModelStore(tiny_models))
    request = GenerationRequest(prompt="a boat", width=128, height=64, steps=1, batch_size=2).validated()
    list(pipeline(request))  # loads the weights
    weights = mx.get_active_memory()
    mx.clear_cache()
    mx.reset_peak_memory()
    list(pipeline(request))
    measured = mx.get_peak_memory() - weights
    estimate = estimate_request_bytes(128, 64, 2, 4, TINY_SHAPE, VAE_LIVE_MAPS_CPU).total  # tests run on the CPU
    assert 0 < measured <= estimate < 4 * measured  # an upper bound, and not a wild one


def generation(**fields: object) -> pb.ImageGenerationRequest:
    return pb.ImageGenerationRequest(**{"prompt": "a boat", "width": 64, "height": 64, "steps": 1, **fields})


def test_the_server_refuses_by_the_budget_before_generating(server_factory, stub_for, tiny_models: Path) -> None:
    fits_alone = estimate_request_bytes(256, 256, 1, 4, TINY_SHAPE, VAE_LIVE_MAPS_CPU).total + 1024  # not beside the weights
    stub = stub_for(server_factory(memory_budget=fits_alone))
    assert list(stub.GenerateImage(generation()))[-1].images  # small enough: runs
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.GenerateImage(generation(width=256, height=256)))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"memory budget of {format_bytes(fits_alone)}" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.GenerateImage(generation(width=2048, height=2048, batch_size=8)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("width x height x batch_size:")
    assert f"memory budget of {format_bytes(fits_alone)}" in caught.value.details()
