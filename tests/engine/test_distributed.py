"""The parts of a group's work that need no group: a rank's share of a request, and the request as
it travels. The group itself runs in tests/app/test_distributed.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import numpy as np

from grpc_service.status import status_for
from mlx_sd.engine.distributed import decode_request, encode_request, share_of, spreads
from mlx_sd.engine.errors import RankLost
from mlx_sd.engine.events import GenerationResult
from mlx_sd.engine.lora import LoraWeight
from mlx_sd.engine.model_store import ModelStore
from mlx_sd.engine.pipeline import Pipeline
from mlx_sd.engine.request import MAX_PROMPT_CHARS, GenerationRequest
from tests.conftest import TINY_MODEL


def test_image_i_goes_to_rank_i_mod_n() -> None:
    assert [list(share_of(rank, 3, 7)) for rank in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert list(share_of(2, 3, 2)) == []  # fewer images than ranks


def test_a_share_is_made_from_the_seeds_the_images_have_in_the_whole_request(tmp_path: Path) -> None:
    shutil.copytree(TINY_MODEL, tmp_path / "stable-diffusion")
    pipeline = Pipeline(ModelStore(tmp_path))
    request = GenerationRequest(prompt="a lighthouse", width=64, height=64, steps=2, seed=40, sampler="Euler a",
                                batch_size=2, batch_count=2).validated()
    *_, whole = pipeline(request)
    *_, share = pipeline(request, images=[1, 2, 3])  # batches [1, 2] and [3]: others than the whole's
    assert isinstance(whole, GenerationResult) and isinstance(share, GenerationResult)
    assert [image.seed for image in share.images] == [41, 42, 43]
    assert [image.parameters.seed for image in share.images] == [41, 42, 43]
    for mine, theirs in zip(share.images, whole.images[1:]):
        assert np.array_equal(mine.pixels, theirs.pixels)  # each image is computed alone, in any batch


def test_the_request_travels_as_json_of_every_field() -> None:
    request = GenerationRequest(prompt="ünïcode " * 1000, negative_prompt="x" * 10_000, width=128, height=192,
                                steps=7, cfg_scale=3.5, seed=2**40, sampler="DDIM", restore_faces=True,
                                enable_hr=True, denoising_strength=0.4, batch_size=3, batch_count=2, clip_skip=2,
                                hires_first_width=64, hires_first_height=64, preview_every=2, seed_mode="cpu",
                                stochastic_sampling_gamma=0.5, model="other/model.safetensors", upscale=True,
                                upscale_factor=2, mask_blur=4, resize_mode=1, inpaint_full_res=True,
                                inpaint_full_res_padding=32, inpainting_fill=1, inpaint_no_overlay=True, mask_outset=-7,
                                original_width=1024, original_height=768, crop_top=8, crop_left=16,
                                target_width=1024, target_height=960, negative_original_width=512,
                                negative_original_height=640,
                                refiner_model="refiner/model.safetensors", refiner_start=0.75, aesthetic_score=7.5,
                                negative_aesthetic_score=1.5,
                                loras=(LoraWeight("styles/ink", 0.7), LoraWeight("detail.safetensors", -1.5)))
    travelling = [f for f in request.__dataclass_fields__ if f not in ("init_image", "mask", "source")]
    assert all(getattr(request, f) != getattr(GenerationRequest(), f) for f in travelling)
    assert spreads(request)
    assert decode_request(encode_request(request)) == request
    assert decode_request(encode_request(None)) is None
    # The longest a valid request's JSON gets: both prompts at their limit, every character escaped.
    longest = GenerationRequest(prompt="\x01" * MAX_PROMPT_CHARS, negative_prompt="\x01" * MAX_PROMPT_CHARS)
    assert decode_request(encode_request(longest)) == longest


def test_a_lost_rank_is_unavailable() -> None:
    assert status_for(RankLost("rank 1 was lost"))[0] == grpc.StatusCode.UNAVAILABLE


def test_image_to_image_stays_on_rank_0() -> None:
    assert not spreads(GenerationRequest(init_image=b"an image"))
    assert not spreads(GenerationRequest(mask=b"a mask"))
