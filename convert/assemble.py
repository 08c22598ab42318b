"""Checkpoint files -> MLX modules: rename, check strictly, then convert tensor by tensor.

Every problem of a checkpoint (missing, unexpected or mis-shaped weights, in any network) is
collected first and reported in one `CheckpointError`, before any tensor data is read.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from convert import keymaps
from convert.families import SD1, Family, detect_diffusers, detect_single_file, single_file_sections
from convert.formats import CheckpointLayout, SafetensorsHeader, TensorInfo, read_config, read_header
from convert.infer_config import INFER
from convert.reader import ReaderFactory, Request, TensorReader
from convert.transforms import mlx_shape
from mlx_sd.cpu.threads import cores, least_loaded
from mlx_sd.engine.errors import CheckpointError
from mlx_sd.models.clip import CLIPTextConfig, CLIPTextModel
from mlx_sd.models.unet import UNet2DConditionModel, UNetConfig
from mlx_sd.models.vae import AutoencoderKL, VAEConfig

NETWORKS = ("text_encoder", "text_encoder_2", "unet", "vae")  # a family has some of them (Family.networks)
MODEL_TYPES: dict[str, type[nn.Module]] = {
    "text_encoder": CLIPTextModel,
    "text_encoder_2": CLIPTextModel,
    "unet": UNet2DConditionModel,
    "vae": AutoencoderKL,
}
CONFIG_TYPES = {"text_encoder": CLIPTextConfig, "text_encoder_2": CLIPTextConfig, "unet": UNetConfig,
                "vae": VAEConfig}
_SHOWN = 10  # names listed per category in an error; the rest are counted
EVAL_GROUP_BYTES = 64 << 20  # converted tensors evaluated together (see assemble)


@dataclass(frozen=True)
class NetworkConfigs:
    """Per-network configs of a model of any family; a None entry is read from the checkpoint
    (config.json or shapes)."""

    text_encoder: CLIPTextConfig | None = None
    unet: UNetConfig | None = None
    vae: VAEConfig | None = None
    text_encoder_2: CLIPTextConfig | None = None  # SDXL's OpenCLIP bigG

    def to_dict(self) -> dict[str, dict[str, Any] | None]:
        # An absent second text encoder is left out, so SD 1.x's cache names stay as they were.
        configs = {n: getattr(self, n) for n in NETWORKS}
        return {n: dataclasses.asdict(c) if c else None for n, c in configs.items()
                if n != "text_encoder_2" or c is not None}

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, Any] | None]) -> NetworkConfigs:
        return cls(**{n: CONFIG_TYPES[n].from_dict(data[n]) if data.get(n) else None for n in NETWORKS})


@dataclass
class ModelNetworks:
    """The networks of a model of any family: those its family lacks are None (SDXL's refiner has
    no `text_encoder`; only SDXL has `text_encoder_2`)."""

    text_encoder: CLIPTextModel | None
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder_2: CLIPTextModel | None = None
    family: Family = SD1

    @property
    def configs(self) -> NetworkConfigs:
        return NetworkConfigs(**{n: network.config for n in NETWORKS if (network := getattr(self, n)) is not None})

    def networks(self) -> dict[str, nn.Module]:
        """The family's networks by name."""
        return {n: getattr(self, n) for n in self.family.networks}


@dataclass
class NetworkSource:
    """One network's tensors in the checkpoint files, under our names."""

    keys: dict[str, tuple[Path, str]] = field(default_factory=dict)  # our name -> (file, key there)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)  # our name -> its checkpoint tensor
    unexpected: list[str] = field(default_factory=list)
    config_json: dict[str, Any] | None = None
    transposed: set[str] = field(default_factory=set)  # our names of tensors stored transposed

    def add_file(self, header: SafetensorsHeader, keys: dict[str, str], keymap: keymaps.KeyMap) -> None:
        """`keys` maps each key as the tables see it (section prefix removed) to its key in the file."""
        for key, file_key in keys.items():
            name = keymap.rename(key)
            parts = keymap.parts(name) if name is not None else []
            if not parts or any(part in self.keys for part in parts):
                self.unexpected.append(file_key)
                continue
            info = header.tensors[file_key]
            for index, part in enumerate(parts):
                self.keys[part] = (header.path, file_key)
                self.tensors[part] = info if len(parts) == 1 else info.rows(index, len(parts))
            self.transposed |= keymap.transposed & set(parts)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's checkpoint shape the way round our network holds it."""
        shape = self.tensors[name].shape
        return shape[::-1] if name in self.transposed else shape


def _weight_keys(header: SafetensorsHeader) -> list[str]:
    return [k for k in header.tensors if not keymaps.IGNORED_KEYS.fullmatch(k)]


def _vae_keymap(keys: list[str]) -> keymaps.KeyMap:
    return keymaps.vae_original_for(keys) if keymaps.is_original_vae(keys) else keymaps.VAE_DIFFUSERS


def _text_encoder_keymap(kind: str, keys: list[str], family: Family) -> keymaps.KeyMap:
    if kind == "clip":
        return keymaps.CLIP
    layers = keymaps.open_clip_layers(keys)
    return keymaps.open_clip(layers - 1 if family.drops_last_text_layer else layers)


def _dropped(key: str, keymap: keymaps.KeyMap, family: Family) -> bool:
    """Whether `key` is of what SD 2.x's files carry of OpenCLIP but the model never runs: its last
    layer and the projection of its pooled output (only SDXL reads a pooled output)."""
    if not family.drops_last_text_layer:
        return False
    return key == "text_projection" or (key.startswith("transformer.resblocks.") and keymap.rename(key) is None)


def plan_sources(layout: CheckpointLayout) -> tuple[dict[str, NetworkSource], list[str], Family]:
    """Rename every tensor of the layout's files; also returns keys that belong to no network, and
    the model's family."""
    sources = {n: NetworkSource() for n in NETWORKS}
    stray: list[str] = []
    if layout.single_file is not None:
        header = read_header(layout.single_file)
        weight_keys = _weight_keys(header)
        family = detect_single_file(weight_keys, layout.single_file)
        prefixes = single_file_sections(family)
        sections: dict[str, dict[str, str]] = {n: {} for n in NETWORKS}
        for key in weight_keys:
            prefix = next((p for p in prefixes if key.startswith(p)), None)
            if prefix is None:
                stray.append(key)
            else:
                sections[prefixes[prefix]][key[len(prefix) :]] = key
        section_maps = {
            "unet": keymaps.unet_original_for(sections["unet"]),
            "vae": keymaps.vae_original_for(sections["vae"]),
        }
        for prefix, (network, kind) in family.text_encoders.items():
            keymap = section_maps[network] = _text_encoder_keymap(kind, list(sections[network]), family)
            sections[network] = {k: v for k, v in sections[network].items() if not _dropped(k, keymap, family)}
        for network in family.networks:
            if not (network == "vae" and layout.vae_override):  # an override replaces that section
                sources[network].add_file(header, sections[network], section_maps[network])
    else:
        folder = layout.diffusers["unet"].parent.parent
        text_encoders = {n: read_config(path) for n, path in layout.diffusers.items() if n.startswith("text_encoder")}
        family = detect_diffusers(read_config(layout.diffusers["unet"]), text_encoders, folder)
    for network, path in (layout.diffusers or {}).items():
        header = read_header(path)
        keys = _weight_keys(header)
        keymap = {"unet": keymaps.UNET_DIFFUSERS, "vae": _vae_keymap(keys)}.get(network, keymaps.CLIP)
        sources[network].add_file(header, {k: k for k in keys}, keymap)
        sources[network].config_json = read_config(path)
    if layout.vae_override is not None:
        header = read_header(layout.vae_override)
        keys = _weight_keys(header)
        sources["vae"].add_file(header, {k: k for k in keys}, _vae_keymap(keys))
        # A config.json beside a standalone VAE describes it (the SDXL fp16-fix VAE's says force_upcast: false).
        has_config = (layout.vae_override.parent / "config.json").is_file()
        sources["vae"].config_json = read_config(layout.vae_override) if has_config else None
    return sources, stray, family


def _resolve_config(network: str, source: NetworkSource, override: Any, family: Family) -> Any:
    if override is not None:
        return override
    if source.config_json is not None:
        try:
            config = CONFIG_TYPES[network].from_dict(source.config_json)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{network} config.json: {e}") from None
        # A standalone or older VAE config may not state it; the family decides.
        return dataclasses.replace(config, scaling_factor=family.vae_scaling_factor) if (
            network == "vae" and "scaling_factor" not in source.config_json) else config
    return INFER[network]({name: source.shape(name) for name in source.tensors}, family)


def _abridged(label: str, names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    more = f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return f"{len(names)} {label}: {shown}{more}"


def _problems(source: NetworkSource, expected: dict[str, mx.array]) -> list[str]:
    missing = [n for n in expected if n not in source.keys]
    unexpected = source.unexpected + [source.keys[n][1] for n in source.keys if n not in expected]
    mis_shaped = [
        f"{source.keys[n][1]} {source.tensors[n].shape} (model wants {tuple(p.shape)} in MLX layout)"
        for n, p in expected.items()
        if n in source.keys and mlx_shape(source.shape(n), p.ndim) != tuple(p.shape)
    ]
    return [
        _abridged(label, names)
        for label, names in (("missing", missing), ("unexpected", unexpected), ("with a wrong shape", mis_shaped))
        if names
    ]


_streams = threading.local()  # MLX streams belong to the thread that made them


def _conversion_streams() -> list[mx.Stream]:
    """Where the weights are converted: on the CPU one stream per core (made once per thread;
    MLX keeps a thread per stream), on the GPU its default stream."""
    if mx.default_device() != mx.cpu:
        return [mx.default_stream(mx.default_device())]
    if not hasattr(_streams, "cpu"):
        _streams.cpu = [mx.new_stream(mx.cpu) for _ in range(cores())]
    return _streams.cpu


def _groups(source: NetworkSource, expected: dict[str, mx.array]) -> list[list[tuple[str, mx.array]]]:
    """The network's parameters in runs of about EVAL_GROUP_BYTES of checkpoint data."""
    groups: list[list[tuple[str, mx.array]]] = [[]]
    size = 0
    for name, param in expected.items():
        if size >= EVAL_GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, param))
        info = source.tensors[name]
        size += info.stop - info.start
    return groups


def assemble(layout: CheckpointLayout, dtype: mx.Dtype, configs: NetworkConfigs | None = None,
             reader: ReaderFactory = TensorReader) -> ModelNetworks:
    """Build the three networks from a checkpoint layout, reading the tensors with a `reader()`;
    raises `CheckpointError` on any mismatch."""
    configs = configs or NetworkConfigs()
    sources, stray, family = plan_sources(layout)
    networks = family.networks
    # Parameters start as unevaluated random-init graphs, so building costs no memory until loaded.
    models = {n: MODEL_TYPES[n](_resolve_config(n, sources[n], getattr(configs, n), family)) for n in networks}
    expected = {n: dict(tree_flatten(models[n].parameters())) for n in networks}

    report = [f"  {n}: {'; '.join(p)}" for n in networks if (p := _problems(sources[n], expected[n]))]
    if stray:
        report.append(f"  (no network): {_abridged('unexpected', stray)}")
    if report:
        files = ", ".join(str(p) for p in layout.files)
        raise CheckpointError(f"{files} does not match the {family.title} architecture:\n" + "\n".join(report))

    streams, tensor_reader = _conversion_streams(), reader()
    for network in networks:
        weights, previous = [], []
        for group in _groups(sources[network], expected[network]):
            # Each group is read in MLX's layout (the CPU backend's reader reads on every core
            # and casts as it reads where it can, see mlx_sd.cpu.reader), then cast (or, already
            # cast, made contiguous: nothing to do) tensor by tensor on the least loaded of one CPU stream
            # per core, which MLX runs on threads of their own, while the next group is read.
            # Groups of about EVAL_GROUP_BYTES bound the sources held.
            infos = [sources[network].tensors[name] for name, _ in group]
            lanes = least_loaded((info.stop - info.start for info in infos), len(streams))
            tensors = tensor_reader.read([Request(*sources[network].keys[name], info, param.ndim, streams[lane], dtype)
                                   for (name, param), info, lane in zip(group, infos, lanes)])
            converted = []
            for lane, tensor, (name, _) in zip(lanes, tensors, group):
                with mx.stream(streams[lane]):
                    if name in sources[network].transposed:
                        tensor = tensor.T
                    converted.append(mx.contiguous(tensor.astype(dtype)))
            mx.async_eval(converted)
            mx.eval(previous)
            previous = converted
            weights += [(name, tensor) for (name, _), tensor in zip(group, converted)]
        mx.eval(previous)
        models[network].load_weights(weights, strict=True)
    return ModelNetworks(models.get("text_encoder"), models["unet"], models["vae"], models.get("text_encoder_2"),
                         family)
