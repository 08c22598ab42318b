"""A1111's prompt syntax: emphasis, BREAK, `<lora:name:weight>` tags, and its 75-token windows.

Emphasis (A1111's `parse_prompt_attention`): `(text)` multiplies the weight of its text by 1.1,
`[text]` divides it by 1.1, `(text:1.3)` multiplies it by 1.3; they nest and multiply. `\\(`, `\\)`,
`\\[`, `\\]` and `\\\\` are literal characters. A bracket left open applies to the end of the prompt;
a closing one with nothing open is kept as literal text, and so is a weight that is no number
(`(word:1.2.3)`, on which A1111's parser fails): the syntax never fails. `BREAK` (a word of its
own, in capitals) ends the current window.

Windows follow A1111's `tokenize_line`: 75 tokens each between BOS and EOS; a window that fills up
within 20 tokens after a comma moves the words after the comma into the next window (with any
embedding among them, which A1111 leaves behind); a textual inversion embedding is never split
across windows. After the text encoder, each token's output is
multiplied by its weight and the window's mean restored ("Original" emphasis).

Besides A1111's implicit match of an embedding's name, ComfyUI's explicit reference names one on
purpose: a word (text between spaces, within one stretch of the emphasis syntax, so
`(embedding:name:1.2)` weighs it) that starts with `embedding:`; the rest of the word is the name,
and when no file has it, trailing commas are taken off it and stay prompt text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sd.engine.errors import InvalidRequest
from mlx_sd.engine.tokenizer import MAX_LENGTH, WINDOW, CLIPTokenizer

ROUND = 1.1
SQUARE = 1 / 1.1
COMMA_BACKTRACK = 20  # A1111's default "comma padding backtrack"
BREAK = ("BREAK", -1.0)  # a parsed piece that ends a window, as A1111 marks it

# One token of the emphasis syntax per match, in A1111's order of alternatives.
_ATTENTION = re.compile(r"""\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:""")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
# A1111's extra-network tags: <kind:arguments>; only `lora` is ours, others are removed too.
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
REFERENCE = "embedding:"  # ComfyUI's explicit embedding reference; also how `embeddings` maps keep them
_REFERENCE = re.compile(r"(?<!\S)" + REFERENCE + r"(\S+)")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """(text, weight) pieces of a prompt, neighbours of equal weight merged; BREAK is ("BREAK", -1)."""
    pieces: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open and _is_number(weight):
            multiply_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    for start in round_open:
        multiply_from(start, ROUND)
    for start in square_open:
        multiply_from(start, SQUARE)

    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(text, weight) for text, weight in merged]


def _is_number(text: str) -> bool:
    """Whether a weight parses; A1111 fails on `(word:1.2.3)`, which is literal text here."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def extract_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its extra-network tags, and its `<lora:name[:weight]>` tags' (name, weight).

    A weight that is not a number is an InvalidRequest naming the tag; a missing one is 1.0.
    """
    loras = []
    for kind, arguments in _EXTRA_NETWORK.findall(prompt):
        if kind != "lora":
            continue
        name, *rest = arguments.split(":")
        try:
            weight = float(rest[0]) if rest else 1.0
        except ValueError:
            raise InvalidRequest("prompt", f"<lora:{arguments}>: the weight {rest[0]!r} is not a number") from None
        loras.append((name.strip(), weight))
    return _EXTRA_NETWORK.sub("", prompt), loras


def references(prompt: str) -> list[str]:
    """The names of the embeddings a prompt references explicitly (`embedding:name`), as written."""
    return [name for text, weight in parse_attention(prompt) if (text, weight) != BREAK
            for name in _REFERENCE.findall(text)]


def referenced_name(name: str, embeddings: Mapping[str, np.ndarray]) -> tuple[str, str]:
    """(the name an `embedding:name` reference means, the prompt text it leaves): `name` itself, or
    without its trailing commas when only that is in `embeddings` (keyed `embedding:name`)."""
    stripped = name.rstrip(",")
    if REFERENCE + name in embeddings or stripped == name:
        return name, ""
    return stripped, name[len(stripped):]


@dataclass
class Windows:
    """A prompt as the text encoder's input: (W, 77) token ids and weights, and where textual
    inversion vectors replace token embeddings: (window, position, vectors)."""

    ids: np.ndarray
    weights: np.ndarray
    fixes: list[tuple[int, int, np.ndarray]] = field(default_factory=list)


@dataclass
class TokenWindow:
    """One window as it is built: tokens, their weights, and (position, vectors) of embeddings."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, np.ndarray]] = field(default_factory=list)


def windows(tokenizer: CLIPTokenizer, prompt: str,
            embeddings: Mapping[str, np.ndarray] | None = None) -> list[TokenWindow]:
    """A1111's `tokenize_line`: the prompt's 77-token windows, BOS and EOS included. `embeddings`
    maps an embedding's name (as written in prompts) to its (vectors, width) array."""
    comma = tokenizer.encode(",")[0]
    by_first = _embeddings_by_first_token(tokenizer, embeddings or {})
    done: list[TokenWindow] = []
    current = TokenWindow()
    last_comma = -1

    def close() -> None:
        nonlocal current, last_comma
        padding = WINDOW - len(current.tokens)
        current.tokens = [tokenizer.bos_id, *current.tokens, *[tokenizer.eos_id] * max(padding, 0), tokenizer.eos_id]
        current.weights = [1.0, *current.weights, *[1.0] * max(padding, 0), 1.0]
        current.fixes = [(offset + 1, vectors) for offset, vectors in current.fixes]
        done.append(current)
        current, last_comma = TokenWindow(), -1

    for text, weight in parse_attention(prompt):
        if (text, weight) == BREAK:
            close()
            continue
        for item in _items(tokenizer, text, by_first, embeddings or {}):
            if isinstance(item, int) and item == comma:
                last_comma = len(current.tokens)
            elif len(current.tokens) == WINDOW and last_comma != -1 and WINDOW - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved = TokenWindow(current.tokens[cut:], current.weights[cut:],
                                    [(offset - cut, v) for offset, v in current.fixes if offset >= cut])
                current = TokenWindow(current.tokens[:cut], current.weights[:cut],
                                      [(offset, v) for offset, v in current.fixes if offset < cut])
                close()
                current = moved
            if len(current.tokens) == WINDOW:
                close()
            if isinstance(item, int):
                current.tokens.append(item)
                current.weights.append(weight)
                continue
            if len(current.tokens) + len(item) > WINDOW:
                close()
            current.fixes.append((len(current.tokens), item))
            current.tokens += [0] * len(item)
            current.weights += [weight] * len(item)
    if current.tokens or not done:
        close()
    return done


def used_embeddings(tokenizer: CLIPTokenizer, prompts: list[str], embeddings: Mapping[str, np.ndarray]) -> list[str]:
    """The names (keys of `embeddings`) of the embeddings that `prompts` use, in the order they occur."""
    if not embeddings:
        return []
    names = {id(vectors): name for name, vectors in embeddings.items()}
    return list(dict.fromkeys(names[id(vectors)] for prompt in prompts
                              for window in windows(tokenizer, prompt, embeddings) for _, vectors in window.fixes))


def weighted_windows(tokenizer: CLIPTokenizer, prompts: list[str],
                     embeddings: Mapping[str, np.ndarray] | None = None, min_windows: int = 1) -> list[Windows]:
    """Each prompt's windows, all with the same count (the longest's, at least `min_windows`; the
    others padded with empty windows, as A1111 pads the shorter of a prompt and its negative).
    Padding after EOS is the tokenizer's padding token."""
    per_prompt = [windows(tokenizer, prompt, embeddings) for prompt in prompts]
    count = max(min_windows, *(len(w) for w in per_prompt))
    empty = [tokenizer.bos_id] + [tokenizer.eos_id] * (MAX_LENGTH - 1)
    result = []
    for prompt_windows in per_prompt:
        ids = np.array([w.tokens for w in prompt_windows] + [empty] * (count - len(prompt_windows)), dtype=np.int32)
        weights = np.ones(ids.shape, dtype=np.float32)
        weights[: len(prompt_windows)] = [w.weights for w in prompt_windows]
        for row in ids:  # after the first EOS: the padding token (SD 2 and SDXL's OpenCLIP pad with 0)
            row[int(np.argmax(row == tokenizer.eos_id)) + 1 :] = tokenizer.pad_id
        fixes = [(i, offset, vectors) for i, w in enumerate(prompt_windows) for offset, vectors in w.fixes]
        result.append(Windows(ids, weights, fixes))
    return result


def emphasised(hidden: mx.array, weights: np.ndarray) -> mx.array:
    """(W, 77, C) text-encoder outputs with each token's output times its weight, each window's mean
    restored as A1111 does. Windows whose weights are all 1 are returned as they are."""
    if np.all(weights == 1.0):
        return hidden
    hidden = hidden.astype(mx.float32)
    original = mx.mean(hidden, axis=(1, 2), keepdims=True)
    weighted = hidden * mx.array(weights)[..., None]
    return weighted * (original / mx.mean(weighted, axis=(1, 2), keepdims=True))


def _items(tokenizer: CLIPTokenizer, text: str, by_first: dict[int, list[tuple[list[int], np.ndarray]]],
           embeddings: Mapping[str, np.ndarray]) -> list[int | np.ndarray]:
    """A stretch of prompt text as token ids, with an embedding's vectors where it is named, implicitly
    (by its name's tokens) or explicitly (`embedding:name`; one left unread stays text)."""
    items: list[int | np.ndarray] = []
    parts = _REFERENCE.split(text)  # text, name, text, name, ..., text
    for i, part in enumerate(parts):
        if i % 2:
            name, rest = referenced_name(part, embeddings)
            if REFERENCE + name in embeddings:
                items.append(embeddings[REFERENCE + name])
                part = rest
            else:
                part = REFERENCE + part
        tokens = tokenizer.encode(part)
        position = 0
        while position < len(tokens):
            ids, vectors = _embedding_at(tokens, position, by_first)
            items.append(tokens[position] if vectors is None else vectors)
            position += len(ids) or 1
    return items


def _embeddings_by_first_token(tokenizer: CLIPTokenizer, embeddings: Mapping[str, np.ndarray],
                               ) -> dict[int, list[tuple[list[int], np.ndarray]]]:
    """Embeddings by the first token of their name, longest name first (A1111's lookup); those
    referenced explicitly are not matched by their tokens."""
    table: dict[int, list[tuple[list[int], np.ndarray]]] = {}
    for name, vectors in embeddings.items():
        if name.startswith(REFERENCE):
            continue
        ids = tokenizer.encode(name)
        if ids:
            table.setdefault(ids[0], []).append((ids, vectors))
    for candidates in table.values():
        candidates.sort(key=lambda c: len(c[0]), reverse=True)
    return table


def _embedding_at(tokens: list[int], position: int, by_first: dict[int, list[tuple[list[int], np.ndarray]]],
                  ) -> tuple[list[int], np.ndarray | None]:
    for ids, vectors in by_first.get(tokens[position], ()):
        if tokens[position : position + len(ids)] == ids:
            return ids, vectors
    return [], None


def encoder_inputs(text_encoder: nn.Module, encoded: list[Windows]) -> tuple[mx.array, mx.array | None]:
    """The text encoder's (P*W, 77) token ids for prompts' windows and, where embeddings stand for
    tokens, its token embeddings with their vectors in place (None when no prompt uses one)."""
    ids = np.concatenate([e.ids for e in encoded])
    if not any(e.fixes for e in encoded):
        return mx.array(ids), None
    count = encoded[0].ids.shape[0]
    token_embeddings = text_encoder.embeddings.token_embedding(mx.array(ids))
    for p, e in enumerate(encoded):
        for window, offset, vectors in e.fixes:
            row = p * count + window
            token_embeddings[row, offset : offset + len(vectors)] = mx.array(vectors).astype(token_embeddings.dtype)
    return mx.array(ids), token_embeddings


def weighted(hidden: mx.array, encoded: list[Windows]) -> mx.array:
    """(P, W*77, C) fp32: the encoder's (P*W, 77, C) outputs with emphasis applied per window, each
    prompt's windows concatenated along the sequence."""
    hidden = emphasised(hidden.astype(mx.float32), np.concatenate([e.weights for e in encoded]))
    return hidden.reshape(len(encoded), -1, hidden.shape[-1])


def encode(text_encoder: nn.Module, tokenizer: CLIPTokenizer, prompts: list[str], skip_last_layers: int = 0,
           embeddings: Mapping[str, np.ndarray] | None = None) -> mx.array:
    """(P, W*77, C) fp32 embeddings of prompts with A1111's syntax through one text encoder's
    final-normed output (SD 1.x and SD 2.x): every prompt's windows encoded together."""
    encoded = weighted_windows(tokenizer, prompts, embeddings)
    ids, token_embeddings = encoder_inputs(text_encoder, encoded)
    hidden = weighted(text_encoder(ids, skip_last_layers=skip_last_layers, token_embeddings=token_embeddings),
                      encoded)
    mx.eval(hidden)
    return hidden
