"""CLIP tokenizer against ids recorded from transformers' CLIPTokenizer (tests/fixtures/sd1_tiny)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlx_sd.engine.errors import CheckpointError, ModelNotFound
from mlx_sd.engine.tokenizer import CLIPTokenizer, default_tokenizer, tokenize, tokenize_windows

GOLDEN = json.loads((Path(__file__).parents[1] / "fixtures" / "sd1_tiny" / "golden.json").read_text(encoding="utf-8"))
PROMPTS = GOLDEN["prompts"]
BOS, EOS = 49406, 49407


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_ids_match_reference(name: str) -> None:
    ids = tokenize([PROMPTS[name]])
    assert ids.dtype == np.int32 and ids.shape == (1, 77)
    assert ids[0].tolist() == GOLDEN["token_ids"][name]


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_untruncated_ids_match_reference(name: str) -> None:
    assert [BOS, *default_tokenizer().encode(PROMPTS[name]), EOS] == GOLDEN["token_ids_untruncated"][name]


def test_batch_layout_bos_eos_padding() -> None:
    names = sorted(PROMPTS)
    ids = tokenize([PROMPTS[n] for n in names])
    assert ids.shape == (len(names), 77)
    for row, name in zip(ids, names):
        n_text = min(len(GOLDEN["token_ids_untruncated"][name]) - 2, 75)
        assert row[0] == BOS
        assert row[1 + n_text] == EOS
        assert (row[2 + n_text :] == EOS).all()  # SD-1 pads with <|endoftext|>


def test_empty_prompt_is_bos_then_eos() -> None:
    assert tokenize([""])[0].tolist() == [BOS] + [EOS] * 76


def test_long_prompt_windows_cover_all_tokens() -> None:
    full = GOLDEN["token_ids_untruncated"]["long"]
    text = full[1:-1]
    windows = tokenize_windows([PROMPTS["long"]])
    assert windows.dtype == np.int32
    assert windows.shape == (1, -(-len(text) // 75), 77) == (1, 3, 77)
    assert windows[0, 0].tolist() == GOLDEN["token_ids"]["long"]
    assert (windows[0, :, 0] == BOS).all()
    assert (windows[0, :-1, 76] == EOS).all()  # full windows: BOS + 75 + EOS
    inner = np.concatenate(windows[0, :, 1:76]).tolist()
    assert inner[: len(text)] == text
    assert all(t == EOS for t in inner[len(text) :])


def test_batch_shares_window_count_with_empty_windows() -> None:
    windows = tokenize_windows([PROMPTS["long"], "", PROMPTS["simple"]])
    assert windows.shape == (3, 3, 77)
    assert (windows[1] == tokenize([""])[0]).all()
    assert windows[2, 0].tolist() == GOLDEN["token_ids"]["simple"]
    assert (windows[2, 1:] == tokenize([""])[0]).all()


def test_window_boundaries() -> None:
    exactly_one = " ".join(["a"] * 75)  # "a" is one token
    assert tokenize_windows([exactly_one]).shape == (1, 1, 77)
    assert tokenize_windows([exactly_one + " a"]).shape == (1, 2, 77)
    assert tokenize_windows([""]).shape == (1, 1, 77)
    assert tokenize_windows(["a"], min_windows=2).shape == (1, 2, 77)


def test_bare_string_is_rejected() -> None:
    with pytest.raises(TypeError):
        tokenize("a cat")


def test_folder_in_diffusers_format_matches_shipped(tmp_path: Path) -> None:
    # The tokenizers library writes vocab.json + merges.txt ("#version: 0.2" header)
    # in the same format as a diffusers repository's tokenizer/ folder.
    default_tokenizer()._tokenizer.model.save(str(tmp_path))
    folder_tok = CLIPTokenizer.from_folder(tmp_path)
    names = sorted(PROMPTS)
    ids = folder_tok.tokenize([PROMPTS[n] for n in names])
    assert [row.tolist() for row in ids] == [GOLDEN["token_ids"][n] for n in names]


def _write_toy_folder(folder: Path, pad_token: str | None = None) -> dict[str, int]:
    tokens = ["!", "e", "l", "o", "r", "w", "r</w>", "w</w>", "lo", "low", "low</w>", "er</w>", "lower</w>",
              "<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = ["l o", "lo w</w>", "lo w", "e r</w>", "low er</w>"]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    if pad_token is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad_token}), encoding="utf-8")
    return vocab


def test_toy_folder_vocab_and_merges(tmp_path: Path) -> None:
    v = _write_toy_folder(tmp_path)
    ids = CLIPTokenizer.from_folder(tmp_path).tokenize(["Lower  LOW"])
    start, end = v["<|startoftext|>"], v["<|endoftext|>"]
    assert ids[0].tolist() == [start, v["lower</w>"], v["low</w>"], end] + [end] * 73


def test_toy_folder_pad_token_from_config(tmp_path: Path) -> None:
    v = _write_toy_folder(tmp_path, pad_token="!")
    ids = CLIPTokenizer.from_folder(tmp_path).tokenize(["low"])
    assert ids[0, :3].tolist() == [v["<|startoftext|>"], v["low</w>"], v["<|endoftext|>"]]
    assert (ids[0, 3:] == v["!"]).all()


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound):
        CLIPTokenizer.from_folder(tmp_path)
    _write_toy_folder(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nl o w\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="merges.txt:2"):
        CLIPTokenizer.from_folder(tmp_path)
    _write_toy_folder(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"l": 0}), encoding="utf-8")
    with pytest.raises(CheckpointError, match="special token"):
        CLIPTokenizer.from_folder(tmp_path)
