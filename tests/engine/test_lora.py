"""LoRAs merged into the tiny SD-1 model against diffusers' `load_lora_weights` + `fuse_lora`
(fixtures: tests/fixtures/make_lora_fixtures.py), restoring, and bad LoRA files; the same parity
for the tiny SD 2.x model (`lora_sd2/`), whose OpenCLIP ViT-H-kind text encoder kohya names in
transformers' CLIP names (`lora_te_text_model_encoder_layers_N_...`)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from convert import load_networks
from mlx_sd.engine import lora, lora_merge
from mlx_sd.engine.backends import Backend
from mlx_sd.engine.errors import CheckpointError, InvalidRequest, ModelNotFound, UnsupportedModelFormat
from mlx_sd.models.quantize import quantize
from tests.conftest import backend_or_skip

FIXTURES = Path(__file__).parents[1] / "fixtures"
LORAS = FIXTURES / "lora"
WEIGHT = json.loads((LORAS / "golden.json").read_text())["weight"]  # what the goldens were fused at
# fp32 weights and activations; the merged weights differ from diffusers' by one rounding of W + dW.
REL_TOL = 2e-5


def relative_error(ours: mx.array, reference: mx.array) -> float:
    ours_np, ref_np = np.array(ours.astype(mx.float32)), np.array(reference)
    return float(np.abs(ours_np - ref_np).max() / np.abs(ref_np).max())


@pytest.fixture(scope="module")
def golden() -> dict[str, mx.array]:
    return mx.load(str(LORAS / "golden.safetensors"))


def load(backend: Backend, bits: int | None = None, model: str = "sd1_tiny"):
    models = load_networks(FIXTURES / model / "diffusers", dtype=mx.float32, reader=backend.reader)
    if bits is not None:
        quantize(models.unet, bits)
    models = backend.prepare_models(models)
    merger = lora_merge.LoraMerger({"unet": models.unet, "text_encoder": models.text_encoder},
                             lora_merge.unet_levels(models.unet))
    return models, merger


def outputs(models, golden) -> tuple[mx.array, mx.array]:
    eps = models.unet(golden["x"].transpose(0, 2, 3, 1), golden["t"], golden["context"]).transpose(0, 3, 1, 2)
    hidden = models.text_encoder(golden["ids"].astype(mx.int32))
    return eps, hidden


def weights(models) -> dict[str, np.ndarray]:
    return {k: np.array(v) for network in (models.unet, models.text_encoder)
            for k, v in tree_flatten(network.parameters())}


@pytest.fixture(params=[b.value for b in Backend])
def backend(request: pytest.FixtureRequest) -> Backend:
    return backend_or_skip(request.param)


@pytest.mark.parametrize(("model", "loras"), [("sd1_tiny", "lora"), ("sd2_tiny", "lora_sd2")])
@pytest.mark.parametrize("form", ["kohya", "peft"])
def test_outputs_match_diffusers_with_the_lora_fused(backend: Backend, model: str, loras: str, form: str) -> None:
    golden = mx.load(str(FIXTURES / loras / "golden.safetensors"))
    weight = json.loads((FIXTURES / loras / "golden.json").read_text())["weight"]
    models, merger = load(backend, model=model)
    eps, hidden = outputs(models, golden)
    assert relative_error(eps, golden["none.unet"]) <= REL_TOL  # the baseline agrees
    assert relative_error(hidden, golden["none.text_encoder"]) <= REL_TOL

    path = FIXTURES / loras / f"{form}.safetensors"
    if form == "kohya":  # the text encoder's layers as kohya names them, and LoCon's 3x3 convolutions
        tensors = mx.load(str(path))
        assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in tensors)
        assert any(k.endswith("conv1.lora_down.weight") and v.shape[-1] == 3 for k, v in tensors.items())
    merger.apply([(path, weight)])
    eps, hidden = outputs(models, golden)
    assert relative_error(eps, golden[f"{form}.unet"]) <= REL_TOL
    assert relative_error(hidden, golden[f"{form}.text_encoder"]) <= REL_TOL
    # the LoRA changes the outputs far beyond the tolerance, so the comparison above means something
    assert relative_error(eps, golden["none.unet"]) > 100 * REL_TOL
    assert relative_error(hidden, golden["none.text_encoder"]) > 100 * REL_TOL


def test_kohya_ldm_layer_names_read_as_diffusers_names(golden: dict, tmp_path: Path) -> None:
    # the kohya file's UNet modules renamed to LDM's numbering by the fixtures' own diffusers -> LDM
    # key map (checked against diffusers' converters), as SDXL-era trainers name them
    from tests.fixtures.sd1_keymap import unet_key

    def ldm(key: str) -> str:
        module, factor = key.split(".", 1)
        if not module.startswith("lora_unet_"):
            return key
        target = merger._table[module]
        renamed = unet_key(target.path + ".weight", 2, {1, 2, 3}).removesuffix(".weight")
        return "lora_unet_" + renamed.replace(".", "_") + "." + factor

    models, merger = load(Backend.MLX)
    tensors = mx.load(str(LORAS / "kohya.safetensors"))
    renamed = {ldm(k): v for k, v in tensors.items()}
    assert any(k.startswith("lora_unet_input_blocks_") for k in renamed)
    merger.apply([(write(tmp_path / "ldm.safetensors", renamed), WEIGHT)])
    eps, _ = outputs(models, golden)
    assert relative_error(eps, golden["kohya.unet"]) <= REL_TOL


def test_diffusers_older_spelling_reads_as_peft(golden: dict, tmp_path: Path) -> None:
    tensors = mx.load(str(LORAS / "peft.safetensors"))
    older = {k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"): v
             for k, v in tensors.items()}
    models, merger = load(Backend.MLX)
    merger.apply([(write(tmp_path / "older.safetensors", older), WEIGHT)])
    eps, hidden = outputs(models, golden)
    assert relative_error(eps, golden["peft.unet"]) <= REL_TOL
    assert relative_error(hidden, golden["peft.text_encoder"]) <= REL_TOL


def test_restoring_is_bit_for_bit_and_the_same_set_costs_nothing(backend: Backend) -> None:
    models, merger = load(backend)
    before = weights(models)
    kohya = [(LORAS / "kohya.safetensors", WEIGHT)]
    merger.apply(kohya)
    merged = models.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    merger.apply(kohya)  # the same set: nothing is read or replaced
    assert models.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight is merged
    merger.apply([(LORAS / "peft.safetensors", 1.0), (LORAS / "kohya.safetensors", -0.5)])
    merger.apply([])
    after = weights(models)
    assert before.keys() == after.keys()
    for key in before:
        assert np.array_equal(before[key], after[key]), key


def test_a_failure_midway_restores_the_model(backend: Backend) -> None:
    models, merger = load(backend)
    before = weights(models)
    real = lora_merge.read_deltas

    def failing(path, weight, layers, table):
        deltas = real(path, weight, layers, table)
        first = next(iter(deltas))
        # a delta that cannot be added fails while merging, after earlier layers were merged
        deltas[list(deltas)[len(deltas) // 2]] = mx.zeros((3, 5, 7))
        return {first: deltas[first], **deltas}

    with pytest.raises(ValueError):
        merger.apply([(LORAS / "kohya.safetensors", WEIGHT)], read=failing)
    after = weights(models)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_quantized_layers_are_merged_and_restored(golden: dict) -> None:
    models, merger = load(Backend.MLX, bits=8)
    before = weights(models)
    merger.apply([(LORAS / "peft.safetensors", WEIGHT)])
    eps, _ = outputs(models, golden)
    # 8-bit weights: the merged model is about as close to diffusers' fused one as the quantized model
    # is to the unquantized one (measured 1.0e-2 and 7.5e-3); the LoRA's own effect is 6e-2
    unmerged_error = relative_error(outputs(load(Backend.MLX, bits=8)[0], golden)[0], golden["none.unet"])
    assert relative_error(eps, golden["peft.unet"]) <= 2 * unmerged_error
    merger.apply([])
    after = weights(models)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def write(path: Path, tensors: dict[str, mx.array]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path), tensors)
    return path


def test_unmatched_and_misfitting_keys_are_named(tmp_path: Path) -> None:
    _, merger = load(Backend.MLX)
    tensors = mx.load(str(LORAS / "kohya.safetensors"))
    sdxl = write(tmp_path / "sdxl.safetensors", {**tensors, "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha":
                                                  mx.array(1.0)})
    with pytest.raises(InvalidRequest, match=r"sdxl.safetensors: 'lora_te2_text_model_encoder_layers_0_mlp_fc1'"):
        merger.apply([(sdxl, 1.0)])
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    wide = write(tmp_path / "wide.safetensors", {f"{key}.lora_down.weight": mx.zeros((4, 768)),
                                                 f"{key}.lora_up.weight": mx.zeros((320, 4))})
    with pytest.raises(InvalidRequest, match=rf"wide.safetensors: '{key}' makes a \(320, 768\) update"):
        merger.apply([(wide, 1.0)])
    loha = write(tmp_path / "loha.safetensors", {f"{key}.hada_w1_a": mx.zeros((32, 4))})
    with pytest.raises(UnsupportedModelFormat, match="LoHa/LoKr"):
        merger.apply([(loha, 1.0)])


def test_pickles_are_refused_unread(tmp_path: Path) -> None:
    _, merger = load(Backend.MLX)
    pickle = tmp_path / "lora" / "evil.ckpt"
    pickle.parent.mkdir()
    pickle.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(CheckpointError, match="pickle"):
        merger.apply([(lora_merge.lora_path(tmp_path, "evil.ckpt"), 1.0)])


def test_request_limits_and_paths(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="at most 16"):
        lora.validated([lora.LoraWeight("a")] * 17)
    for weight in (10.5, -11.0, float("nan")):
        with pytest.raises(InvalidRequest, match="between -10 and 10"):
            lora.validated([lora.LoraWeight("a", weight)])
    with pytest.raises(InvalidRequest, match="'..'"):
        lora.validated([lora.LoraWeight("../secret")])
    (tmp_path / "lora").mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"")
    (tmp_path / "lora" / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(InvalidRequest, match="outside the LoRA folder"):
        lora_merge.lora_path(tmp_path, "link")
    with pytest.raises(ModelNotFound, match="lora/missing.safetensors"):
        lora_merge.lora_path(tmp_path, "missing")


def test_low_memory_mode_merges_again_after_the_text_encoder_is_read_back(tmp_path: Path) -> None:
    from mlx_sd.engine.model_store import ModelStore
    from mlx_sd.engine.pipeline import Pipeline
    from mlx_sd.engine.request import GenerationRequest
    from tests.engine.test_pipeline import tiny_models_dir

    models = tiny_models_dir(tmp_path / "models")
    (models / "lora").mkdir()
    (models / "lora" / "style.safetensors").write_bytes((LORAS / "kohya.safetensors").read_bytes())

    def image(pipeline: Pipeline, **fields) -> np.ndarray:
        request = GenerationRequest(prompt="a cat", width=64, height=64, steps=2, seed=3, **fields).validated()
        return list(pipeline(request))[-1].images[0].pixels

    styled = [lora.LoraWeight("style", 0.8)]
    low = Pipeline(ModelStore(models, cache_dir=tmp_path / "cache", low_memory=True))
    plain = Pipeline(ModelStore(models, cache_dir=tmp_path / "cache"))
    expected = image(plain, loras=styled)
    assert not np.array_equal(expected, image(plain))
    # the text encoder's weights are read back after each request: the LoRA is merged into them again
    assert np.array_equal(image(low, loras=styled), expected)
    assert np.array_equal(image(low, loras=styled), expected)
    assert np.array_equal(image(low), image(plain))
