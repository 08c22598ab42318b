"""Build a random-weight checkpoint of the real SDXL base 1.0 size for benchmarks and slow tests.

Run once with the reference venv (about two minutes on 2 CPU cores; RAM stays under 1 GB, 6.9 GB disk):

    .venv-ref/bin/python benchmarks/build_sdxl_checkpoint.py

Writes, under the git-ignored ``.cache/sdxl-random/``:

* ``stable-diffusion/model.safetensors`` - the original single-file form, fp16, with the 2515 key
  names and shapes of ``sd_xl_base_1.0.safetensors`` (Stability's SGM layout: the UNet under
  ``model.diffusion_model.``, CLIP ViT-L under ``conditioner.embedders.0.transformer.``, OpenCLIP
  ViT-bigG with fused attention projections under ``conditioner.embedders.1.model.``, the VAE under
  ``first_stage_model.``; plus the CLIP ``position_ids`` and bigG ``logit_scale`` real files carry);
* ``diffusers/{unet,vae,text_encoder,text_encoder_2}/config.json`` - SDXL base's configs
  (``stabilityai/stable-diffusion-xl-base-1.0``), written out here, which diffusers' single-file
  loaders need offline.

Fully materialised in fp32 the UNet alone is 10 GB, so nothing is: the networks are built on torch's
meta device (names and shapes only), the diffusers->SGM mapping (``tests/fixtures/family_keymap.py``)
is checked on those shapes against diffusers' own SGM->diffusers converters, and then each tensor
is drawn (seeded by its name: the file is the same on every run) and streamed to disk alone.
Weights are uniform in +-1/sqrt(fan_in) (torch's default scale), embeddings normal with std 0.02,
norms ones, biases small: random, yet finite through every network in fp16.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.fixtures import family_keymap, sd1_keymap  # noqa: E402  (the diffusers -> SGM key mapping)
from tests.fixtures import make_sd1_fixtures as fixtures  # noqa: E402  (the SD-1 configs SDXL's widen)

SDXL_UNET = dict(
    fixtures.UNET_CONFIG,
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = dict(fixtures.VAE_CONFIG, block_out_channels=(128, 256, 512, 512), sample_size=1024,
                scaling_factor=0.13025, force_upcast=True)
CLIP_L = dict(fixtures.CLIP_CONFIG, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, projection_dim=768)
# OpenCLIP bigG as transformers writes it (text_encoder_2/config.json of SDXL base).
CLIP_BIGG = dict(fixtures.CLIP_CONFIG, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, projection_dim=1280, hidden_act="gelu")
# Parameter counts of the real SDXL base 1.0 components and the real file's key count.
EXPECTED_PARAMS = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                   "text_encoder_2": 694_659_840}
EXPECTED_KEYS = 2515
CLIP_L_PREFIX, _ = family_keymap.SECTIONS["sdxl"]["text_encoder"]
OPEN_CLIP_PREFIX, _ = family_keymap.SECTIONS["sdxl"]["text_encoder_2"]
# The non-weight tensors sd_xl_base_1.0.safetensors carries (loaders ignore them).
EXTRAS = {
    CLIP_L_PREFIX + "text_model.embeddings.position_ids": lambda: torch.arange(77).unsqueeze(0),
    OPEN_CLIP_PREFIX + "logit_scale": lambda: torch.tensor(math.log(100.0), dtype=torch.float16),
}
DTYPES = {torch.float16: "F16", torch.int64: "I64"}


def meta_models() -> dict[str, torch.nn.Module]:
    """SDXL base's four networks on the meta device (shapes, no storage), their sizes checked."""
    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel(**SDXL_UNET),
            "vae": AutoencoderKL(**SDXL_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)),
        }
    for name, model in models.items():
        n = sum(p.numel() for p in model.parameters())
        if n != EXPECTED_PARAMS[name]:
            raise SystemExit(f"{name}: {n} parameters, expected {EXPECTED_PARAMS[name]}")
        print(f"{name}: {n / 1e6:.1f}M parameters", flush=True)
    return models


def layout(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every original key with a meta tensor of its shape and dtype.

    The key mapping works on numpy arrays: it gets zero-stride placeholders of the right shapes
    (only the fused and transposed OpenCLIP tensors it builds take memory, ~0.3 GB)."""
    def placeholders(name: str) -> dict[str, np.ndarray]:
        return {k: np.broadcast_to(np.float16(0), tuple(v.shape)) for k, v in models[name].state_dict().items()}

    unet, vae = models["unet"], models["vae"]
    state = sd1_keymap.unet_to_original(placeholders("unet"), unet.config)
    state.update(sd1_keymap.vae_to_original(placeholders("vae"), vae.config))
    for network, (prefix, kind) in family_keymap.SECTIONS["sdxl"].items():
        weights = placeholders(network)
        state.update(family_keymap.open_clip_to_original(weights, prefix) if kind == "open_clip"
                     else {prefix + k: v for k, v in weights.items()})
    state = {k: torch.empty(v.shape, dtype=torch.float16, device="meta") for k, v in state.items()}
    return state | {name: make().to("meta") for name, make in EXTRAS.items()}


def check_layout(state: dict[str, torch.Tensor], models: dict[str, torch.nn.Module]) -> None:
    """diffusers' SGM->diffusers converters must give back every diffusers key with its shape."""
    def same(got: dict, want: dict, what: str) -> None:
        want = {k: tuple(v.shape) for k, v in want.items()}
        got = {k: tuple(v.shape) for k, v in got.items()}
        if got != want:
            bad = sorted(set(got) ^ set(want)) or [k for k in want if got[k] != want[k]]
            raise SystemExit(f"{what}: the SGM layout does not convert back, first differences {bad[:5]}")

    if len(state) != EXPECTED_KEYS:
        raise SystemExit(f"{len(state)} keys, expected {EXPECTED_KEYS} (sd_xl_base_1.0.safetensors)")
    if (kind := infer_diffusers_model_type(state)) != "xl_base":
        raise SystemExit(f"diffusers reads this layout as {kind!r}, not 'xl_base'")
    unet, vae = models["unet"], models["vae"]
    same(convert_ldm_unet_checkpoint(state, unet.config), unet.state_dict(), "unet")
    same(convert_ldm_vae_checkpoint(state, vae.config), vae.state_dict(), "vae")
    clip = convert_ldm_clip_checkpoint(state)
    clip.pop("text_model.embeddings.position_ids")  # a non-persistent buffer in transformers
    same(clip, models["text_encoder"].state_dict(), "text_encoder")
    big = models["text_encoder_2"]
    same(convert_open_clip_checkpoint(big, state, prefix=OPEN_CLIP_PREFIX), big.state_dict(),
         "text_encoder_2")


def draw(name: str, like: torch.Tensor) -> torch.Tensor:
    """The tensor `name` holds: random (seeded by the name) at the scale its kind has."""
    if name in EXTRAS:
        return EXTRAS[name]()
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    shape = tuple(like.shape)
    if name.endswith(("embedding.weight", "positional_embedding")):
        values = torch.randn(shape, generator=gen) * 0.02
    elif len(shape) == 1:
        is_norm_weight = name.endswith("weight")
        values = torch.ones(shape) if is_norm_weight else (torch.rand(shape, generator=gen) - 0.5) * 0.04
    else:
        fan_in = shape[0] if name.endswith("text_projection") else math.prod(shape[1:])
        values = (torch.rand(shape, generator=gen) * 2 - 1) / math.sqrt(fan_in)
    return values.to(like.dtype)


def write_streaming(path: Path, layout: dict[str, torch.Tensor], make: Callable[[str, torch.Tensor], torch.Tensor]
                    ) -> None:
    """A safetensors file written one tensor at a time (its header needs only the shapes)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, like in layout.items():
        size = like.numel() * like.element_size()
        header[name] = {"dtype": DTYPES[like.dtype], "shape": list(like.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for i, tensor in enumerate(_drawn(layout, make)):
            out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            if i % 250 == 0:
                print(f"  {i}/{len(layout)} tensors", flush=True)
    partial.replace(path)


def _drawn(layout: dict[str, torch.Tensor], make: Callable[[str, torch.Tensor], torch.Tensor]
           ) -> Iterator[torch.Tensor]:
    for name, like in layout.items():
        tensor = make(name, like)
        assert tensor.shape == like.shape and tensor.dtype == like.dtype, name
        yield tensor


def write_configs(folder: Path, models: dict[str, torch.nn.Module]) -> None:
    for name, model in models.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        if hasattr(model, "save_config"):
            model.save_config(folder / name)  # diffusers
        else:
            model.config.save_pretrained(folder / name)  # transformers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "sdxl-random")
    parser.add_argument("--force", action="store_true", help="rebuild even if the checkpoint exists")
    args = parser.parse_args()
    single_path = args.out / "stable-diffusion" / "model.safetensors"
    if single_path.exists() and not args.force:
        print(f"{single_path} exists; pass --force to rebuild")
        return
    torch.set_num_threads(1)
    models = meta_models()
    state = layout(models)
    check_layout(state, models)
    write_configs(args.out / "diffusers", models)
    write_streaming(single_path, state, draw)
    print(f"{single_path}: {single_path.stat().st_size / 1e9:.2f} GB, {len(state)} tensors")


if __name__ == "__main__":
    main()
