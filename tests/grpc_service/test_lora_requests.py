"""LoRAs, embeddings and clip skip through both protocols, end to end on the tiny SD-1 model: what the
images' parameters record, that a LoRA changes the image and is taken out again, and the statuses of
bad input."""

from __future__ import annotations

import hashlib
import io
import shutil

import grpc
import numpy as np
import pytest
from PIL import Image

from grpc_service.generated import imageservice_pb2 as api
from tests.conftest import FIXTURES
from tests.dt_client import build_configuration, collect_images, decode_image

KOHYA = FIXTURES / "lora" / "kohya.safetensors"
BASE = dict(prompt="a lighthouse", negative_prompt="fog", width=64, height=64, steps=2, cfg_scale=5, seed=9,
            sampler="DPM++ 2M Karras")


def generate(stub, **fields) -> tuple[list[np.ndarray], list[str]]:
    last = list(stub.GenerateImage(api.ImageGenerationRequest(**{**BASE, **fields})))[-1]
    return [np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in last.images], list(last.info)


def addnet_hash(path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


@pytest.fixture
def style(tiny_models):
    (tiny_models / "lora").mkdir()
    return shutil.copy(KOHYA, tiny_models / "lora" / "style.safetensors")


def test_a_lora_changes_the_image_and_is_taken_out_again(server_factory, stub_for, style) -> None:
    stub = stub_for(server_factory())
    (plain,), _ = generate(stub)
    (field,), (info,) = generate(stub, loras=[api.LoraWeight(file="style", weight=1.0)])
    (tagged,), (tag_info,) = generate(stub, prompt="a lighthouse <lora:style:1>")
    (again,), _ = generate(stub)
    assert not np.array_equal(field, plain)
    assert np.array_equal(field, tagged)  # the field and the prompt's tag are one thing
    assert np.array_equal(again, plain)
    expected = f'Lora hashes: "style: {addnet_hash(style)}"'
    assert expected in info and expected in tag_info
    assert info.startswith("a lighthouse <lora:style:1>\n") and tag_info.startswith("a lighthouse <lora:style:1>\n")


def test_clip_skip_is_read_and_recorded(server_factory, stub_for, tiny_models) -> None:
    stub = stub_for(server_factory())
    (plain,), _ = generate(stub)
    (skipped,), (info,) = generate(stub, clip_skip=2)
    assert not np.array_equal(plain, skipped) and "Clip skip: 2" in info


@pytest.mark.parametrize(("lora", "code", "details"), [
    (api.LoraWeight(file="missing", weight=1), grpc.StatusCode.NOT_FOUND, "lora/missing.safetensors"),
    (api.LoraWeight(file="style", weight=10.5), grpc.StatusCode.INVALID_ARGUMENT, "between -10 and 10"),
    (api.LoraWeight(file="../style", weight=1), grpc.StatusCode.INVALID_ARGUMENT, "'..'"),
])
def test_bad_loras_get_their_status(server_factory, stub_for, style, lora, code, details) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        generate(stub_for(server_factory()), loras=[lora])
    assert caught.value.code() == code and details in caught.value.details()


def test_seventeen_loras_are_too_many(server_factory, stub_for, style) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        generate(stub_for(server_factory()), loras=[api.LoraWeight(file="style", weight=0.1)] * 17)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 16" in caught.value.details()


@pytest.fixture
def embedding(tiny_models):
    import mlx.core as mx

    (tiny_models / "embeddings").mkdir()
    path = tiny_models / "embeddings" / "glow.safetensors"
    mx.save_safetensors(str(path), {"emb_params": mx.random.normal((2, 32), key=mx.random.key(3))})
    return path


def test_embeddings_are_used_and_recorded_with_their_hashes(server_factory, stub_for, embedding) -> None:
    stub = stub_for(server_factory())
    _, (plain_info,) = generate(stub, prompt="a lighthouse, glue")
    (implicit,), (info,) = generate(stub, prompt="a lighthouse, glow")
    (explicit,), (explicit_info,) = generate(stub, prompt="a lighthouse, embedding:glow")
    _, (negative_info,) = generate(stub, negative_prompt="(embedding:glow.safetensors:1.2)")
    assert np.array_equal(implicit, explicit)  # as text, the two would be different tokens
    # A1111's embedding hash: the whole file's SHA-256 (a LoRA's skips the header)
    expected = f'TI hashes: "glow: {hashlib.sha256(embedding.read_bytes()).hexdigest()[:12]}"'
    assert expected in info and expected in explicit_info and expected in negative_info
    assert "TI hashes" not in plain_info


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_missing_embedding_reference_is_not_found_naming_it(server_factory, stub_for, embedding, field) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        generate(stub_for(server_factory()), **{field: "a lighthouse, (embedding:missing:1.1)"})
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "embeddings/missing.safetensors" in caught.value.details()


def test_a_lora_for_another_family_names_the_file_and_key(server_factory, stub_for, tiny_models) -> None:
    import mlx.core as mx

    (tiny_models / "lora").mkdir()
    key = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    mx.save_safetensors(str(tiny_models / "lora" / "xl.safetensors"),
                        {f"{key}.lora_down.weight": mx.zeros((4, 1280)), f"{key}.lora_up.weight": mx.zeros((5120, 4))})
    with pytest.raises(grpc.RpcError) as caught:
        generate(stub_for(server_factory()), loras=[api.LoraWeight(file="xl.safetensors", weight=1)])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"xl.safetensors: '{key}'" in caught.value.details()


def dt_pixels(client, prompt: str = "a lighthouse", **config) -> np.ndarray:
    request = client.pb.GenerateRequest(prompt=prompt, negativePrompt="fog", user="tests", device=2,
                                        configuration=build_configuration(
                                            start_width=1, start_height=1, steps=2, guidance_scale=5.0, seed=9,
                                            sampler=0, **config))
    (data,), _ = collect_images(client.generate(request))
    return decode_image(data)


def test_draw_things_loras_and_their_modes(server_factory, dt_connect, style) -> None:
    client = dt_connect(server_factory())
    plain = dt_pixels(client)
    styled = dt_pixels(client, loras=[("style.safetensors", 1.0, 0)])
    for_the_refiner = dt_pixels(client, loras=[("style.safetensors", 1.0, 2)])  # no refiner here: not applied
    assert not np.array_equal(styled, plain) and np.array_equal(for_the_refiner, plain)
    with pytest.raises(grpc.RpcError) as caught:
        dt_pixels(client, loras=[("missing_lora_f16.safetensors", 1.0, 0)])
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "lora/missing_lora_f16.safetensors" in caught.value.details()


def test_draw_things_embedding_references(server_factory, dt_connect, embedding) -> None:
    client = dt_connect(server_factory())
    assert np.array_equal(dt_pixels(client, "a lighthouse, embedding:glow"), dt_pixels(client, "a lighthouse, glow"))
    with pytest.raises(grpc.RpcError) as caught:
        dt_pixels(client, "a lighthouse, embedding:missing")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "embeddings/missing.safetensors" in caught.value.details()
