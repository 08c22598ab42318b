"""The memory guard: the estimate, the budget check, and refusals over the API with the tiny model."""

from __future__ import annotations

from pathlib import Path

import grpc
import mlx.core as mx
import pytest

from grpc_service.generated import imageservice_pb2 as pb
from mlx_sd.errors import InvalidRequest, MemoryBudgetExceeded
from mlx_sd.memory_budget import VAE_LIVE_MAPS_CPU, MemoryBudget, ModelShape, estimate_request_bytes, format_bytes
from mlx_sd.model_store import ModelStore
from mlx_sd.models.unet import UNetConfig
from mlx_sd.models.vae import VAEConfig
from mlx_sd.pipeline import Pipeline
from mlx_sd.request import GenerationRequest

TINY_SHAPE = ModelShape(attention_heads=8, vae_full_resolution_channels=32)


def test_the_attention_term_is_the_documented_formula() -> None:
    estimate = estimate_request_bytes(512, 512, 1, 2)
    assert estimate.unet_attention == 4096**2 * 8 * 1 * 2 * 2  # tokens^2 x heads x batch x CFG x fp16


def test_the_estimate_grows_with_area_squared_and_batch_linearly() -> None:
    small, large = estimate_request_bytes(256, 256, 1, 4), estimate_request_bytes(512, 512, 1, 4)
    assert large.unet_attention == 16 * small.unet_attention  # 4x the tokens, squared
    assert estimate_request_bytes(256, 256, 3, 4).total == 3 * small.total


def test_the_shape_is_read_from_the_models_configs() -> None:
    assert ModelShape.of(UNetConfig(), VAEConfig()) == ModelShape()  # SD 1.x: 8 heads, 256 channels
    assert ModelShape.of(UNetConfig(attention_head_dim=(5, 10, 20, 20)), VAEConfig(block_out_channels=(32,))) == \
        ModelShape(attention_heads=5, vae_full_resolution_channels=32)


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
