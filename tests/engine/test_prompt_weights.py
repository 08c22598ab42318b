"""A1111's prompt syntax: the emphasis parser against A1111's own (fixture made by running it:
tests/fixtures/make_prompt_weight_fixtures.py), its windows and mean-restoring emphasis, LoRA tags,
and textual inversion embeddings in the text encoder's input."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from convert import load_networks
from mlx_sd.engine import embeddings, prompt_weights
from mlx_sd.engine.backends import Backend
from mlx_sd.engine.errors import CheckpointError, InvalidRequest, ModelNotFound
from mlx_sd.engine.tokenizer import default_tokenizer
from tests.conftest import backend_or_skip

FIXTURES = Path(__file__).parents[1] / "fixtures"
CASES = json.loads((FIXTURES / "prompt_weights.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=[c["prompt"] or "<empty>" for c in CASES])
def test_parser_matches_a1111(case: dict) -> None:
    parsed = prompt_weights.parse_attention(case["prompt"])
    if "error" in case:  # A1111 fails on a weight that is no number; here it stays text
        assert parsed == [("word:1.2.3)", pytest.approx(1.1))]
        return
    assert [text for text, _ in parsed] == [text for text, _ in case["parsed"]]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in case["parsed"]], rel=1e-12)


def test_lora_tags_are_taken_out() -> None:
    text, loras = prompt_weights.extract_loras("a <lora:Film Grain:0.6> cat <hypernet:x:1> <lora:b>")
    assert text == "a  cat  "
    assert loras == [("Film Grain", 0.6), ("b", 1.0)]
    with pytest.raises(InvalidRequest, match="<lora:a:much>"):
        prompt_weights.extract_loras("<lora:a:much>")


TOKENIZER = default_tokenizer()
BOS, EOS = TOKENIZER.bos_id, TOKENIZER.eos_id
CAT = TOKENIZER.encode("cat")[0]
DOG = TOKENIZER.encode("dog")[0]
COMMA = TOKENIZER.encode(",")[0]


def rows(prompt: str, emb: dict | None = None) -> list[prompt_weights.TokenWindow]:
    return prompt_weights.windows(TOKENIZER, prompt, emb)


def test_a_window_holds_75_tokens_then_the_next_begins() -> None:
    windows = rows("cat " * 75 + "dog " * 5)
    assert [len(w.tokens) for w in windows] == [77, 77]
    assert windows[0].tokens == [BOS, *[CAT] * 75, EOS]
    assert windows[1].tokens == [BOS, *[DOG] * 5, *[EOS] * 71]
    assert rows("cat " * 75)[0].tokens == [BOS, *[CAT] * 75, EOS]  # exactly 75: one window


def test_a_full_window_moves_the_words_after_its_last_comma() -> None:
    # 70 words, a comma (token 71), 10 more: at 75 tokens the 4 after the comma (within 20) move on
    windows = rows("cat " * 70 + ", " + "dog " * 10)
    assert windows[0].tokens == [BOS, *[CAT] * 70, COMMA, *[EOS] * 4, EOS]
    assert windows[1].tokens == [BOS, *[DOG] * 10, *[EOS] * 65, EOS]
    # a comma further back than 20 tokens is not used
    windows = rows("cat " * 50 + ", " + "dog " * 30)
    assert windows[0].tokens == [BOS, *[CAT] * 50, COMMA, *[DOG] * 24, EOS]


def test_break_ends_a_window_and_weights_follow_their_tokens() -> None:
    windows = rows("(cat:1.5) [dog] BREAK cat")
    assert windows[0].tokens[:4] == [BOS, CAT, DOG, EOS]
    assert windows[0].weights[:4] == pytest.approx([1.0, 1.5, 1 / 1.1, 1.0])
    assert windows[1].tokens[:3] == [BOS, CAT, EOS]
    # as A1111: BREAK closes the window so far, even an empty one; nothing after it opens no other
    assert [len(rows(p)) for p in ("BREAK", "cat BREAK", "BREAK cat", "cat BREAK BREAK cat")] == [1, 1, 2, 3]


def test_prompt_and_negative_get_the_same_window_count() -> None:
    prompt, negative = prompt_weights.weighted_windows(TOKENIZER, ["cat " * 100, ""])
    assert prompt.ids.shape == negative.ids.shape == (2, 77)
    assert negative.ids[1].tolist() == [BOS] + [EOS] * 76


def test_emphasis_scales_tokens_and_restores_each_windows_mean() -> None:
    hidden = mx.random.normal((2, 77, 8), key=mx.random.key(0)) + 0.3
    weights = np.ones((2, 77), dtype=np.float32)
    weights[0, 3] = 1.5
    out = prompt_weights.emphasised(hidden, weights)
    for w in range(2):
        assert float(mx.mean(out[w])) == pytest.approx(float(mx.mean(hidden[w])), rel=1e-5)
    ratio = np.array(out[0] / hidden[0])
    assert ratio[3] / ratio[4] == pytest.approx(np.full(8, 1.5), rel=1e-5)
    assert np.array_equal(np.array(out[1]), np.array(hidden[1]))  # all weights 1: unchanged


@pytest.fixture(scope="module", params=[b.value for b in Backend])
def text_encoder(request: pytest.FixtureRequest):
    backend = backend_or_skip(request.param)
    models = load_networks(FIXTURES / "sd1_tiny" / "diffusers", dtype=mx.float32, reader=backend.reader)
    return backend.prepare_models(models).text_encoder


def test_an_embedding_stands_in_for_its_vectors(text_encoder, tmp_path: Path) -> None:
    # an embedding holding the token embeddings of "red dog" encodes as "red dog" does
    ids = TOKENIZER.encode("red dog")
    vectors = text_encoder.embeddings.token_embedding.weight[mx.array(ids)]
    folder = tmp_path / embeddings.EMBEDDINGS_DIR
    folder.mkdir()
    mx.save_safetensors(str(folder / "MyStyle.safetensors"), {"emb_params": vectors})
    found = embeddings.referenced(tmp_path, ["a photo, mystyle"], 32)
    assert list(found) == ["MyStyle"]
    with_embedding = prompt_weights.encode(text_encoder, TOKENIZER, ["a photo, mystyle"], embeddings=found)
    plain = prompt_weights.encode(text_encoder, TOKENIZER, ["a photo, red dog"])
    unrelated = prompt_weights.encode(text_encoder, TOKENIZER, ["a photo, mystyle"])
    assert np.allclose(np.array(with_embedding), np.array(plain), atol=1e-5)
    assert not np.allclose(np.array(unrelated), np.array(plain), atol=1e-2)


def test_an_embedding_for_another_family_is_refused_by_name(tmp_path: Path) -> None:
    folder = tmp_path / embeddings.EMBEDDINGS_DIR
    folder.mkdir()
    mx.save_safetensors(str(folder / "xl.safetensors"), {"clip_g": mx.zeros((2, 1280))})
    mx.save_safetensors(str(folder / "wide.safetensors"), {"emb_params": mx.zeros((2, 768))})
    with pytest.raises(InvalidRequest, match="embeddings/xl.safetensors: none of emb_params, clip_l"):
        embeddings.referenced(tmp_path, ["xl"], 32)
    with pytest.raises(InvalidRequest, match="embeddings/wide.safetensors: 'emb_params' has vectors of width 768"):
        embeddings.referenced(tmp_path, ["wide"], 32)
    assert embeddings.referenced(tmp_path, ["neither"], 32) == {}


def test_an_explicit_reference_reads_its_embedding_with_the_weight_around_it(text_encoder, tmp_path: Path) -> None:
    # ComfyUI's `embedding:name`: the name (with or without its suffix) up to a space, in a stretch
    # of emphasis; trailing commas are prompt text when no file has them
    ids = TOKENIZER.encode("red dog")
    folder = tmp_path / embeddings.EMBEDDINGS_DIR
    (folder / "sub").mkdir(parents=True)
    vectors = text_encoder.embeddings.token_embedding.weight[mx.array(ids)]
    mx.save_safetensors(str(folder / "sub" / "My.Style.safetensors"), {"emb_params": vectors})
    prompts = ["a photo, (embedding:sub/My.Style:1.3) cat", "embedding:sub/My.Style.safetensors,, cat"]
    assert [prompt_weights.references(p) for p in prompts] == [["sub/My.Style"], ["sub/My.Style.safetensors,,"]]
    found = embeddings.referenced(tmp_path, prompts, 32)
    assert sorted(found) == ["embedding:sub/My.Style", "embedding:sub/My.Style.safetensors"]
    referenced = prompt_weights.encode(text_encoder, TOKENIZER, prompts, embeddings=found)
    plain = prompt_weights.encode(text_encoder, TOKENIZER, ["a photo, (red dog:1.3) cat", "red dog,, cat"])
    assert np.allclose(np.array(referenced), np.array(plain), atol=1e-5)
    # unread (no models folder given), a reference is its text
    assert rows("embedding:x")[0].tokens == rows("embedding : x")[0].tokens


def test_a_missing_explicit_reference_is_not_found_naming_it(tmp_path: Path) -> None:
    # an unknown word is a word (A1111's implicit rule); a reference names a file on purpose
    assert embeddings.referenced(tmp_path, ["missing"], 32) == {}
    for prompts in (["a embedding:missing, cat"], ["a cat", "(embedding:missing:0.5)"]):
        with pytest.raises(ModelNotFound, match=r"embedding file not found: embeddings/missing\.safetensors"):
            embeddings.referenced(tmp_path, prompts, 32)
    with pytest.raises(InvalidRequest, match="prompt: '../up' contains '..'"):
        embeddings.referenced(tmp_path, ["embedding:../up"], 32)
    (tmp_path / embeddings.EMBEDDINGS_DIR).mkdir()
    (tmp_path / embeddings.EMBEDDINGS_DIR / "old.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(CheckpointError, match="pickle"):
        embeddings.referenced(tmp_path, ["embedding:old.pt"], 32)
    # escaped, it is not a reference: `\(` is text, the word starts with '('
    assert prompt_weights.references("\\(embedding:missing\\)") == []
