"""GenerationRequest's Draw Things fields: seed_mode and stochastic_sampling_gamma validation, and the
client's proto carrying only the documented API's fields."""

from __future__ import annotations

import math

import pytest

from grpc_service.servicer import request_from_proto, request_to_proto
from mlx_sd.engine.errors import InvalidRequest
from mlx_sd.engine.request import GenerationRequest


def test_defaults_are_torch_cpu_noise_and_tcd_gamma_0_3() -> None:
    request = GenerationRequest().validated()
    assert request.seed_mode == "torch_cpu" and request.stochastic_sampling_gamma == 0.3


@pytest.mark.parametrize("mode", ["legacy", "torch_cpu", "scale_alike", "nvidia_gpu"])
def test_every_seed_mode_is_accepted(mode: str) -> None:
    assert GenerationRequest(seed_mode=mode).validated().seed_mode == mode


@pytest.mark.parametrize("mode", ["", "cuda", "TORCH_CPU", "nvidia gpu"])
def test_an_unknown_seed_mode_is_invalid(mode: str) -> None:
    with pytest.raises(InvalidRequest, match="seed_mode") as raised:
        GenerationRequest(seed_mode=mode).validated()
    assert "nvidia_gpu" in str(raised.value)  # the message lists what is supported


@pytest.mark.parametrize("gamma", [0, 0.0, 0.5, 1.0])
def test_gamma_in_range_is_kept_as_a_float(gamma: float) -> None:
    kept = GenerationRequest(stochastic_sampling_gamma=gamma).validated().stochastic_sampling_gamma
    assert kept == gamma and isinstance(kept, float)


@pytest.mark.parametrize("gamma", [-0.1, 1.01, math.nan, math.inf])
def test_gamma_out_of_range_is_invalid(gamma: float) -> None:
    with pytest.raises(InvalidRequest, match="stochastic_sampling_gamma"):
        GenerationRequest(stochastic_sampling_gamma=gamma).validated()


@pytest.mark.parametrize("name", ["TCD", "euler a ays", "DPM++ SDE Substep", "UniPC Trailing"])
def test_draw_things_sampler_names_are_canonicalised(name: str) -> None:
    assert GenerationRequest(sampler=name).validated().sampler.casefold() == name.casefold()


def test_the_client_sends_the_documented_fields_and_leaves_the_domain_ones_out() -> None:
    request = GenerationRequest(prompt="a cat", seed=5, sampler="TCD", seed_mode="nvidia_gpu",
                                stochastic_sampling_gamma=0.6)
    message = request_to_proto(request)
    assert message.prompt == "a cat" and message.seed == 5 and message.sampler == "TCD"
    back = request_from_proto(message)
    assert back.seed_mode == "torch_cpu" and back.stochastic_sampling_gamma == 0.3


@pytest.mark.parametrize("sampler", ["LCM", "tcd"])
def test_distilled_samplers_take_at_most_50_steps(sampler: str) -> None:
    assert GenerationRequest(sampler=sampler, steps=50).validated().steps == 50
    with pytest.raises(InvalidRequest, match="steps") as raised:
        GenerationRequest(sampler=sampler, steps=51).validated()
    assert "at most 50" in str(raised.value)
    assert GenerationRequest(sampler="TCD Trailing", steps=150).validated().steps == 150


@pytest.mark.parametrize(("fields", "message"), [
    (dict(width=2048, height=2048, upscale=True, upscale_factor=4, batch_size=8, batch_count=2), "GiB of pixels"),
    (dict(width=2048, height=2048, upscale=True, batch_size=8, batch_count=2), "GiB of pixels"),  # 0: up to 4
    (dict(upscale=True, upscale_factor=5), "between 0 and 4"),
])
def test_upscaling_is_bounded(fields: dict, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as caught:
        GenerationRequest(**fields).validated()
    assert caught.value.field == "upscale_factor"


def test_an_upscale_within_the_bounds_is_kept() -> None:
    request = GenerationRequest(width=1024, height=512, upscale=True, upscale_factor=4).validated()
    assert (request.upscale, request.upscale_factor) == (True, 4)
    # 2048x2048 x4 is 8192 pixels a side, 192 MiB an image: ten of them fit.
    assert GenerationRequest(width=2048, height=2048, upscale=True, batch_size=5, batch_count=2).validated().upscale
