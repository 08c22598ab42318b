"""A request's LoRAs and embeddings, made ready before its prompts are encoded.

A request names LoRAs in its `loras` field and with `<lora:name:weight>` tags in its prompt (A1111's
syntax; the tags are taken out of the text that is encoded). The model's `LoraMerger` merges the
set, embeddings are read for the prompts that use them, and the images' parameters record each
LoRA and each embedding used with A1111's short hashes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mlx_sd.engine import conditioning, embeddings, lora, lora_merge, prompt_weights
from mlx_sd.engine.lora import LoraWeight

if TYPE_CHECKING:
    from mlx_sd.engine.model_store import LoadedModel


@dataclass(frozen=True)
class Prepared:
    prompt: str  # the prompts without their LoRA tags
    negative_prompt: str
    # text encoder -> embedding name (`embedding:name` where referenced explicitly) -> its vectors
    embeddings: dict[str, dict[str, np.ndarray]]
    lora_hashes: tuple[tuple[str, str], ...]  # (name, short hash) of each LoRA merged
    added_tags: str  # `<lora:name:weight>` of the LoRAs the prompt did not name, for the parameters
    ti_hashes: tuple[tuple[str, str], ...]  # (name, short hash) of each embedding the prompts use


class ExtraNetworks:
    """Prepares requests against the model directory; hashes are remembered per unchanged file."""

    def __init__(self, models_dir: Path) -> None:
        self._models_dir = Path(models_dir)
        self._hashes: dict[tuple, str] = {}

    def prepare(self, model: LoadedModel, prompt: str, negative_prompt: str,
                loras: Sequence[LoraWeight] = ()) -> Prepared:
        """Merge the request's LoRAs into `model` and read its embeddings for each of the model's
        text encoders."""
        prompt, tagged = prompt_weights.extract_loras(prompt)
        negative_prompt, _ = prompt_weights.extract_loras(negative_prompt)
        wanted = lora.validated([*loras, *(LoraWeight(name, weight) for name, weight in tagged)])
        paths = [(lora_merge.lora_path(self._models_dir, w.file), w.weight) for w in wanted]
        prompts = [prompt, negative_prompt]
        found = {encoder: embeddings.referenced(self._models_dir, prompts, width, encoder)
                 for encoder, width in conditioning.text_widths(model.models).items()}
        model.loras.apply(paths)
        hashes = tuple((Path(w.file).stem, self._hash(path, lora_merge.short_hash))
                       for w, (path, _) in zip(wanted, paths))
        added = " ".join(f"<lora:{Path(w.file).stem}:{w.weight:g}>" for w in loras)
        used = prompt_weights.used_embeddings(model.tokenizer, prompts, found.get(conditioning.TEXT_ENCODERS[0], {}))
        files = [embeddings.file_of(self._models_dir, name) for name in used]
        # named as A1111 names them, without the ':' and ',' that would break the parameters' list
        ti_hashes = tuple((path.stem.replace(":", "").replace(",", ""), self._hash(path, embeddings.short_hash))
                          for path in files)
        return Prepared(prompt, negative_prompt, found, hashes, added, ti_hashes)

    def _hash(self, path: Path, short_hash: Callable[[Path], str]) -> str:
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size, short_hash)
        if key not in self._hashes:
            if len(self._hashes) >= 1024:  # files replaced again and again: start over
                self._hashes.clear()
            self._hashes[key] = short_hash(path)
        return self._hashes[key]
