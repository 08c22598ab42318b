"""CLIP BPE tokenizer of Stable Diffusion 1.x (pure numpy output, no mlx needed).

By default it uses OpenAI CLIP's vocabulary shipped in ``mlx_sd/data/``
(``bpe_simple_vocab_16e6.txt.gz``, MIT, see ``CLIP_LICENSE``), building the
vocabulary the way CLIP does: the 256 byte-level characters, the same with the
end-of-word marker ``</w>``, one token per merge (the file's first 48894 merges),
then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407). A model folder's
``tokenizer/`` (``vocab.json`` + ``merges.txt``, as in diffusers repositories)
can be used instead via :meth:`CLIPTokenizer.from_folder`.

Text handling follows CLIP: NFC normalisation, runs of whitespace collapsed to one
space, lowercase, CLIP's pre-tokenisation regex, byte-level BPE with ``</w>``
ending each word. Curly quotes are straightened first, as the reference
tokenizers do through ``ftfy``; ftfy's other repairs (mojibake, ligatures,
full-width characters) are not reproduced, so such rare inputs may tokenize
differently from transformers' slow ``CLIPTokenizer``.

Two ways to turn prompts into the text encoder's 77-token input:

* :meth:`CLIPTokenizer.tokenize` - ``[B, 77]``: BOS, at most 75 text tokens
  (the rest is dropped), EOS, then padding (EOS for OpenAI's CLIP of SD 1.x and SDXL, "!" for
  OpenCLIP's of SD 2.x and SDXL).
* :meth:`CLIPTokenizer.tokenize_windows` - ``[B, W, 77]`` for prompts longer than
  75 tokens (AUTOMATIC1111's behaviour): each prompt's tokens are cut into
  consecutive 75-token windows, each wrapped as BOS + tokens + EOS + padding. The
  text encoder embeds every window separately and the caller concatenates the
  embeddings along the sequence axis (``[B, W * 77, C]``). All prompts of a call
  get the same ``W`` (the longest prompt's), shorter ones padded with empty
  windows, so a negative prompt tokenized together with its prompt lines up.
  The first window equals :meth:`tokenize`'s row.
"""

from __future__ import annotations

import functools
import gzip
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from mlx_sd.engine.errors import CheckpointError, ModelNotFound

MAX_LENGTH = 77
WINDOW = MAX_LENGTH - 2  # text tokens per window, between BOS and EOS
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
OPEN_CLIP_PAD_TOKEN = "!"  # the padding of OpenCLIP's tokenizers (SD 2.x, SDXL's second encoder)

_BPE_FILE = Path(__file__).parents[1] / "data" / "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48894 merges of the file
# CLIP's regex minus its special-token alternatives: those are added tokens here,
# split off before normalisation.
_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable character table, in vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


class CLIPTokenizer:
    """Exact CLIP BPE tokenizer built on Hugging Face ``tokenizers``."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS_TOKEN) -> None:
        for token in (BOS_TOKEN, EOS_TOKEN, pad_token):
            if token not in vocab:
                raise CheckpointError(f"tokenizer vocabulary lacks the special token {token!r}")
        self.bos_id = vocab[BOS_TOKEN]
        self.eos_id = vocab[EOS_TOKEN]
        self.pad_id = vocab[pad_token]

        bpe = models.BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            unk_token=EOS_TOKEN,
            fuse_unk=False,
        )
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence([
            normalizers.Replace(Regex("[\u02bc\u2018-\u201b]"), "'"),  # ftfy's uncurl_quotes
            normalizers.Replace(Regex("[\u201c-\u201f]"), '"'),
            normalizers.NFC(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Lowercase(),
        ])
        # CLIP's regex does all the splitting; ByteLevel only maps bytes to characters.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        # Special tokens written in a prompt map to their ids, as in CLIP.
        tok.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
        self._tokenizer = tok

    @classmethod
    def from_bpe_file(cls, path: str | Path = _BPE_FILE, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
        """Tokenizer from OpenAI's ``bpe_simple_vocab_16e6.txt.gz``."""
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
        base = list(_bytes_to_unicode().values())
        tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
        return cls({t: i for i, t in enumerate(tokens)}, merges, pad_token=pad_token)

    @classmethod
    def from_folder(cls, folder: str | Path) -> CLIPTokenizer:
        """Tokenizer from a diffusers-style ``tokenizer/`` folder (vocab.json + merges.txt).

        The padding token comes from ``tokenizer_config.json`` or
        ``special_tokens_map.json`` when the folder has one, else ``<|endoftext|>``.
        """
        folder = Path(folder)
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        for path in (vocab_path, merges_path):
            if not path.is_file():
                raise ModelNotFound(str(path), "tokenizer file not found")
        try:
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
            lines = merges_path.read_text(encoding="utf-8").splitlines()
            pad_token = _folder_pad_token(folder)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"unreadable tokenizer files in {folder}: {e}") from e
        merges = []
        for n, line in enumerate(lines, 1):
            if not line or line.startswith("#version"):
                continue
            pair = tuple(line.split())
            if len(pair) != 2:
                raise CheckpointError(f"{merges_path}:{n}: expected two symbols, got {line!r}")
            merges.append(pair)
        return cls(vocab, merges, pad_token=pad_token)

    def encode(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` without BOS/EOS, untruncated."""
        return self._tokenizer.encode(prompt, add_special_tokens=False).ids

    def _row(self, tokens: Sequence[int]) -> list[int]:
        row = [self.bos_id, *tokens[:WINDOW], self.eos_id]
        return row + [self.pad_id] * (MAX_LENGTH - len(row))

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """``[B, 77]`` int32 ids; text beyond 75 tokens is dropped."""
        return np.array([self._row(self.encode(p)) for p in _as_list(prompts)], dtype=np.int32).reshape(-1, MAX_LENGTH)

    def tokenize_windows(self, prompts: Sequence[str], min_windows: int = 1) -> np.ndarray:
        """``[B, W, 77]`` int32 ids: every prompt cut into 75-token windows.

        ``W`` is the largest window count in ``prompts`` and at least
        ``min_windows`` (to match a batch tokenized in another call).
        """
        encoded = [self.encode(p) for p in _as_list(prompts)]
        windows = max([min_windows, *(-(-len(t) // WINDOW) for t in encoded)])
        rows = [
            [self._row(tokens[w * WINDOW : (w + 1) * WINDOW]) for w in range(windows)]
            for tokens in encoded
        ]
        return np.array(rows, dtype=np.int32).reshape(len(encoded), windows, MAX_LENGTH)


def _as_list(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):  # a bare string would be tokenized character by character
        raise TypeError("prompts must be a sequence of strings, not a single string")
    return list(prompts)


def _folder_pad_token(folder: Path) -> str:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            pad = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
            if isinstance(pad, dict):  # {"content": "...", ...} in newer files
                pad = pad.get("content")
            if isinstance(pad, str):
                return pad
    return EOS_TOKEN


@functools.cache
def default_tokenizer(pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """The tokenizer of the shipped CLIP vocabulary padding with `pad_token`, built once per
    process and padding token."""
    return CLIPTokenizer.from_bpe_file(pad_token=pad_token)


def tokenize(prompts: Sequence[str]) -> np.ndarray:
    """``[B, 77]`` int32 ids with the shipped vocabulary; see :meth:`CLIPTokenizer.tokenize`."""
    return default_tokenizer().tokenize(prompts)


def tokenize_windows(prompts: Sequence[str], min_windows: int = 1) -> np.ndarray:
    """``[B, W, 77]`` int32 ids with the shipped vocabulary; see :meth:`CLIPTokenizer.tokenize_windows`."""
    return default_tokenizer().tokenize_windows(prompts, min_windows)
