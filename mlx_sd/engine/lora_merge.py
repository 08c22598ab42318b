"""LoRAs merged into the resident model's weights for a request, and restored exactly afterwards.

Files are `<models>/lora/<name>.safetensors` in kohya's form (`lora_down`/`lora_up`/`alpha`, LoCon
convolutions included), diffusers'/PEFT's (`lora_A`/`lora_B`), or diffusers' older `lora.down/up`.
Each touched layer's weight becomes W + sum(weight * scale * up @ down) with scale = alpha / rank
(1 without an alpha). The arrays replaced are kept, and put back as they were when the set of LoRAs
changes: restoring is bit-for-bit, and a request with the set already merged costs nothing. The
extra memory is the touched layers' weights (the originals held while the merged ones are in use).

Quantized layers (`--quantize`) are dequantized, merged and quantized again with their group size
and bits, so the merged weight carries one more rounding; their originals are kept the same way.
Everything is checked (keys, shapes) before the first weight changes, and a failure while merging
restores what was merged: the model is never left half-applied.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from convert.formats import read_header
from convert.lora_keys import DOWN, UP, Target, module_table, split_key
from mlx_sd.engine.errors import InvalidRequest, UnsupportedModelFormat
from mlx_sd.engine.model_names import file_in_folder

LORA_DIR = "lora"
_LYCORIS = ("hada_", "lokr_")


def lora_path(models_dir: Path, file: str) -> Path:
    """The file a LoRA name means, inside `<models>/lora/` (ModelNotFound naming it when absent)."""
    return file_in_folder(models_dir, LORA_DIR, file, "loras", "LoRA")


def short_hash(path: Path) -> str:
    """A1111's LoRA hash: the first 12 hex digits of the SHA-256 of a safetensors file's bytes after
    its header (kohya's "addnet" hash), which metadata edits leave unchanged."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:12]


def read_deltas(path: Path, weight: float, layers: Mapping[Target, nn.Module],
                table: Mapping[str, Target]) -> dict[Target, mx.array]:
    """weight * scale * up @ down of every module a LoRA file touches, in the layer's own layout.

    Raises CheckpointError for a file that is not safetensors (pickles are refused unread),
    UnsupportedModelFormat for LyCORIS' LoHa/LoKr, and InvalidRequest naming the file and the first key that matches none
    of the model's layers or does not fit its shape.
    """
    read_header(path)
    tensors = mx.load(str(path))
    modules: dict[str, dict[str, mx.array]] = {}
    for key, value in sorted(tensors.items()):  # the "first" key of an error: the same for every reader
        parts = split_key(key)
        if parts is None:
            raise InvalidRequest("loras", f"{path.name}: key {key!r} is not a LoRA factor this server reads")
        if parts[1].startswith(_LYCORIS):
            raise UnsupportedModelFormat(f"{path.name} is a LyCORIS LoHa/LoKr file ({key!r}); only LoRA and "
                                         "LoCon files (lora_down/lora_up, lora_A/lora_B) are read")
        modules.setdefault(parts[0], {})[parts[1]] = value
    deltas = {}
    for name, factors in modules.items():
        target = table.get(name)
        if target is None:
            raise InvalidRequest("loras", f"{path.name}: {name!r} matches no layer of this model (a LoRA for "
                                          "another model family?)")
        down = next((factors[f] for f in DOWN if f in factors), None)
        up = next((factors[f] for f in UP if f in factors), None)
        if down is None or up is None or "dora_scale" in factors or "lora_mid.weight" in factors:
            raise InvalidRequest("loras", f"{path.name}: {name!r} has factors {sorted(factors)}; expected one "
                                          "down and one up matrix")
        rank = down.shape[0]
        scale = weight * (float(factors["alpha"].item()) / rank if "alpha" in factors else 1.0)
        delta = (up.reshape(up.shape[0], -1).astype(mx.float32) @ down.reshape(rank, -1).astype(mx.float32))
        delta = delta.reshape(up.shape[0], *down.shape[1:]) * scale  # (out, in[, kh, kw]): PyTorch's layout
        layer = layers[target]
        shape = _torch_shape(layer)
        if delta.size != _size(shape) or (delta.ndim == 4 and len(shape) == 4 and delta.shape != shape):
            raise InvalidRequest("loras", f"{path.name}: {name!r} makes a {tuple(delta.shape)} update for a layer "
                                          f"of shape {shape} (a LoRA for another model family?)")
        deltas[target] = _our_layout(delta, shape)
    return deltas


class LoraMerger:
    """Keeps one model's merged set of LoRAs, and the original arrays of the layers it touched.

    `networks` maps a network's name to the network (the engine's `unet`, `text_encoder`, ...).
    Called from the one generation thread.
    """

    def __init__(self, networks: Mapping[str, nn.Module], unet_levels: tuple[int, int] | None = None) -> None:
        self._layers: dict[Target, nn.Module] = {
            Target(network, path): module
            for network, root in networks.items()
            for path, module in root.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.QuantizedLinear))
        }
        paths: dict[str, list[str]] = {}
        for target in self._layers:
            paths.setdefault(target.network, []).append(target.path)
        self._table = module_table(paths, unet_levels)
        self._originals: dict[Target, dict[str, mx.array]] = {}
        self._merged: tuple | None = ()  # what is merged now: () none, None unknown (see `forget`)

    def apply(self, loras: Sequence[tuple[Path, float]],
              read: Callable[..., dict[Target, mx.array]] = read_deltas) -> None:
        """Merge these (file, weight) LoRAs, the previous set taken out first; nothing when the same
        files (unchanged on disk) with the same weights are merged already."""
        key = tuple((str(p), *_stamp(p), w) for p, w in loras)
        if key == self._merged:
            return
        self.restore()
        deltas: dict[Target, mx.array] = {}
        for path, weight in loras:  # all read and checked before any weight changes
            for target, delta in read(path, weight, self._layers, self._table).items():
                deltas[target] = deltas[target] + delta if target in deltas else delta
        try:
            while deltas:  # one layer at a time, each update dropped once merged: one in memory at once
                self._merge(*deltas.popitem())
        except BaseException:
            self.restore()
            raise
        finally:
            mx.clear_cache()  # the updates' buffers go back to the system, not to MLX's cache
        self._merged = key

    def restore(self) -> None:
        """Put back every original array the merged LoRAs replaced."""
        for target, originals in self._originals.items():
            self._layers[target].update(originals)
        self._originals.clear()
        self._merged = ()

    def forget(self, networks: Collection[str]) -> None:
        """These networks' weights were replaced from elsewhere (the low-memory text encoders are read
        back from disk after use): their originals are what they hold now, and the next `apply` merges again."""
        self._originals = {t: o for t, o in self._originals.items() if t.network not in networks}
        self._merged = None

    def _merge(self, target: Target, delta: mx.array) -> None:
        layer = self._layers[target]
        if isinstance(layer, nn.QuantizedLinear):
            originals = {"weight": layer.weight, "scales": layer.scales, "biases": layer.biases}
            dense = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
            merged = (dense.astype(mx.float32) + delta).astype(dense.dtype)
            weight, scales, biases = mx.quantize(merged, layer.group_size, layer.bits)
            update = {"weight": weight, "scales": scales, "biases": biases}
        else:
            originals = {"weight": layer.weight}
            update = {"weight": (layer.weight.astype(mx.float32) + delta).astype(layer.weight.dtype)}
        mx.eval(update)
        self._originals.setdefault(target, originals)
        layer.update(update)


def unet_levels(unet: nn.Module) -> tuple[int, int]:
    """(levels, resnets per level) of a UNet, for its LDM key spellings."""
    return len(unet.config.block_out_channels), unet.config.layers_per_block


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def _torch_shape(layer: nn.Module) -> tuple[int, ...]:
    """A layer's weight shape in PyTorch's layout: (out, in) or (out, in, kh, kw)."""
    if isinstance(layer, nn.QuantizedLinear):
        return layer.scales.shape[0], layer.weight.shape[1] * 32 // layer.bits
    shape = layer.weight.shape
    return (shape[0], shape[3], shape[1], shape[2]) if len(shape) == 4 else tuple(shape)


def _size(shape: tuple[int, ...]) -> int:
    size = 1
    for n in shape:
        size *= n
    return size


def _our_layout(delta: mx.array, torch_shape: tuple[int, ...]) -> mx.array:
    """A PyTorch-layout update in the layer's layout: convolutions (out, kh, kw, in); a 1x1
    convolution's update for a linear layer (and back) reshaped."""
    if len(torch_shape) == 4:
        return delta.reshape(torch_shape).transpose(0, 2, 3, 1)
    return delta.reshape(torch_shape)
