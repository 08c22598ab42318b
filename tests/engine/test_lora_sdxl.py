"""SDXL: LoRAs merged into the tiny SDXL model against diffusers' StableDiffusionXLPipeline
`load_lora_weights` + `fuse_lora` (fixtures: tests/fixtures/make_lora_fixtures.py, `lora_sdxl/`),
and A1111's prompt syntax through both text encoders (emphasis per encoder, clip_l/clip_g embeddings)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from convert import load_networks
from mlx_sd.engine import conditioning, embeddings, lora_merge, prompt_weights
from mlx_sd.engine.backends import Backend
from mlx_sd.engine.errors import InvalidRequest, ModelNotFound
from mlx_sd.engine.extra_networks import ExtraNetworks
from mlx_sd.engine.model_store import LoadedModel, ModelStore
from mlx_sd.engine.request import GenerationRequest
from tests.conftest import backend_or_skip
from tests.engine.test_lora import REL_TOL, relative_error

FIXTURES = Path(__file__).parents[1] / "fixtures"
LORAS = FIXTURES / "lora_sdxl"
WEIGHT = json.loads((LORAS / "golden.json").read_text())["weight"]  # what the goldens were fused at


@pytest.fixture(scope="module")
def golden() -> dict[str, mx.array]:
    return mx.load(str(LORAS / "golden.safetensors"))


@pytest.fixture(params=[b.value for b in Backend])
def backend(request: pytest.FixtureRequest) -> Backend:
    return backend_or_skip(request.param)


def load(backend: Backend):
    models = backend.prepare_models(load_networks(FIXTURES / "sdxl_tiny" / "diffusers", dtype=mx.float32,
                                                  reader=backend.reader))
    networks = {"unet": models.unet, "text_encoder": models.text_encoder, "text_encoder_2": models.text_encoder_2}
    return models, lora_merge.LoraMerger(networks, lora_merge.unet_levels(models.unet))


def outputs(models, golden) -> dict[str, mx.array]:
    eps = models.unet(golden["x"].transpose(0, 2, 3, 1), golden["t"], golden["context"],
                      text_embeds=golden["text_embeds"], time_ids=golden["time_ids"]).transpose(0, 3, 1, 2)
    ids = golden["ids"].astype(mx.int32)
    hidden_2, pooled = models.text_encoder_2.hidden_and_pooled(ids, 0)
    return {"unet": eps, "text_encoder": models.text_encoder(ids),
            "text_encoder_2": models.text_encoder_2.final_layer_norm(hidden_2), "text_encoder_2_pooled": pooled}


@pytest.mark.parametrize("form", ["kohya", "peft"])
def test_outputs_match_diffusers_with_the_lora_fused(backend: Backend, golden: dict, form: str) -> None:
    models, merger = load(backend)
    for name, value in outputs(models, golden).items():
        assert relative_error(value, golden[f"none.{name}"]) <= REL_TOL, name  # the baseline agrees

    merger.apply([(LORAS / f"{form}.safetensors", WEIGHT)])
    for name, value in outputs(models, golden).items():
        assert relative_error(value, golden[f"{form}.{name}"]) <= REL_TOL, name
        # the LoRA moves every output far beyond the tolerance, so the comparison means something
        assert relative_error(value, golden[f"none.{name}"]) > 100 * REL_TOL, name


def test_an_sd1_lora_is_refused_naming_its_first_misfitting_key() -> None:
    _, merger = load(Backend.MLX)
    # SDXL's first level has no attention: SD 1.x's first attention layers match nothing
    with pytest.raises(InvalidRequest, match=r"kohya.safetensors: 'lora_unet_down_blocks_0_attentions_0_.*' "
                                             r"matches no layer"):
        merger.apply([(FIXTURES / "lora" / "kohya.safetensors", 1.0)])


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    root = tmp_path_factory.mktemp("sdxl")
    shutil.copytree(FIXTURES / "sdxl_tiny" / "diffusers", root / "stable-diffusion")
    return ModelStore(root).get()


def encode(model: LoadedModel, prompt: str, models_dir: Path) -> tuple[dict, dict]:
    """The conditioning of `prompt`, with the embeddings in `models_dir`."""
    request = GenerationRequest(prompt=prompt, negative_prompt="blurry", width=64, height=64).validated()
    extras = ExtraNetworks(models_dir).prepare(model, request.prompt, request.negative_prompt)
    return conditioning.encode_prompts(model, request, extras)


def test_both_encoders_take_the_emphasis_each_with_its_mean_restored(model: LoadedModel, tmp_path: Path) -> None:
    weighted, _ = encode(model, "a (red:1.5) dog", tmp_path)
    plain, _ = encode(model, "a red dog", tmp_path)
    # A1111's algorithm by hand: each encoder's windows times the token weights, its mean restored
    prompt = prompt_weights.weighted_windows(model.tokenizer, ["a (red:1.5) dog"])[0]
    assert sorted(set(prompt.weights.ravel())) == [1.0, 1.5]
    expected = []
    widths = [model.models.text_encoder.config.hidden_size, model.models.text_encoder_2.config.hidden_size]
    parts = np.split(np.array(plain["context"][0]), [widths[0]], axis=-1)
    for part in parts:
        scaled = part * prompt.weights[0][:, None]
        expected.append(scaled * (part.mean() / scaled.mean()))
    assert np.allclose(np.array(weighted["context"][0]), np.concatenate(expected, axis=-1), atol=1e-5)
    assert not np.allclose(np.array(weighted["context"]), np.array(plain["context"]), atol=1e-3)
    # the pooled output is not weighted (A1111)
    assert np.array_equal(np.array(weighted["text_embeds"]), np.array(plain["text_embeds"]))


def test_clip_l_and_clip_g_embeddings_stand_in_for_their_vectors(model: LoadedModel, tmp_path: Path) -> None:
    folder = tmp_path / embeddings.EMBEDDINGS_DIR
    folder.mkdir()
    vectors = {key: encoder.embeddings.token_embedding.weight[mx.array(tokenizer.encode("red dog"))]
               for key, encoder, tokenizer in (("clip_l", model.models.text_encoder, model.tokenizer),
                                               ("clip_g", model.models.text_encoder_2, model.tokenizer_2))}
    mx.save_safetensors(str(folder / "MyStyle.safetensors"), vectors)
    with_embedding, _ = encode(model, "a photo, mystyle", tmp_path)
    referenced, _ = encode(model, "a photo, (embedding:MyStyle:1.2)", tmp_path)  # ComfyUI's explicit reference
    plain, _ = encode(model, "a photo, red dog", tmp_path)
    weighted, _ = encode(model, "a photo, (red dog:1.2)", tmp_path)
    for key in ("context", "text_embeds"):
        assert np.allclose(np.array(with_embedding[key]), np.array(plain[key]), atol=1e-5), key
        assert np.allclose(np.array(referenced[key]), np.array(weighted[key]), atol=1e-5), key
    with pytest.raises(ModelNotFound, match=r"embeddings/missing\.safetensors"):
        encode(model, "a photo, embedding:missing", tmp_path)
    # an SD 1.x embedding has nothing for the second encoder
    mx.save_safetensors(str(folder / "MyStyle.safetensors"), {"emb_params": vectors["clip_l"]})
    with pytest.raises(InvalidRequest, match=r"MyStyle.safetensors: none of clip_g"):
        encode(model, "a photo, mystyle", tmp_path)


def test_low_memory_mode_merges_both_encoders_again(tmp_path: Path) -> None:
    from mlx_sd.engine.lora import LoraWeight
    from mlx_sd.engine.pipeline import Pipeline

    root = tmp_path / "models"
    shutil.copytree(FIXTURES / "sdxl_tiny" / "diffusers", root / "stable-diffusion")
    (root / "lora").mkdir()
    shutil.copy(LORAS / "peft.safetensors", root / "lora" / "style.safetensors")

    def image(pipeline: Pipeline, **fields) -> np.ndarray:
        request = GenerationRequest(prompt="a cat", width=64, height=64, steps=2, seed=3, **fields).validated()
        return list(pipeline(request))[-1].images[0].pixels

    styled = [LoraWeight("style", WEIGHT)]
    plain = Pipeline(ModelStore(root, cache_dir=tmp_path / "cache"))
    low = Pipeline(ModelStore(root, cache_dir=tmp_path / "cache", low_memory=True))
    expected = image(plain, loras=styled)
    assert not np.array_equal(expected, image(plain))
    # both text encoders are read back after each request: the LoRA is merged into both again
    assert np.array_equal(image(low, loras=styled), expected)
    assert np.array_equal(image(low, loras=styled), expected)
    assert np.array_equal(image(low), image(plain))
