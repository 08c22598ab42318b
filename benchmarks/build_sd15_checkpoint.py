"""Build a random-weight checkpoint of the real SD-1.5 size for benchmarks and slow tests.

Run once with the reference venv (about a minute on 2 CPU cores; RAM peaks around
the fp32 UNet being initialised, ~3.5 GB, plus the fp16 copies, ~2 GB; 4.3 GB disk):

    .venv-ref/bin/python benchmarks/build_sd15_checkpoint.py

Writes, under the git-ignored ``.cache/sd15-random/``:

* ``stable-diffusion/model.safetensors`` - original single-file form, fp16, with
  the key names and shapes of ``v1-5-pruned-emaonly.safetensors`` (plus the same
  scheduler/EMA extras real files carry);
* ``diffusers/{unet,vae,text_encoder}/`` - the same weights in the diffusers
  folder form (fp16 safetensors + config.json).

The configs are SD-1.5's (``runwayml/stable-diffusion-v1-5``), written out here;
nothing is downloaded. The key mapping is the one the tiny fixtures use
(``tests/fixtures/sd1_keymap.py``) and is checked again at full size against
diffusers' own converters.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fixtures"))
import make_sd1_fixtures as fixtures  # noqa: E402  (shared mapping, extras and checks)

SD15_UNET = dict(
    fixtures.UNET_CONFIG,
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
)
SD15_VAE = dict(fixtures.VAE_CONFIG, block_out_channels=(128, 256, 512, 512), sample_size=512)
SD15_CLIP = dict(
    fixtures.CLIP_CONFIG,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    projection_dim=768,
)
# Parameter counts of the real SD-1.5 components, to catch a config typo.
EXPECTED_PARAMS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
SEEDS = {"unet": 11, "vae": 12, "text_encoder": 13}


def build(name: str, factory) -> torch.nn.Module:
    """Random-init a component in fp32 (torch's init), then keep it in fp16."""
    torch.manual_seed(SEEDS[name])
    model = factory().eval().requires_grad_(False)
    n = sum(p.numel() for p in model.parameters())
    if n != EXPECTED_PARAMS[name]:
        raise SystemExit(f"{name}: {n} parameters, expected {EXPECTED_PARAMS[name]}")
    print(f"{name}: {n / 1e6:.1f}M parameters", flush=True)
    return model.half()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "sd15-random")
    parser.add_argument("--force", action="store_true", help="rebuild even if the checkpoint exists")
    args = parser.parse_args()
    single_path = args.out / "stable-diffusion" / "model.safetensors"
    if single_path.exists() and not args.force:
        print(f"{single_path} exists; pass --force to rebuild")
        return

    def clip_factory() -> CLIPTextModel:
        config = CLIPTextConfig(**SD15_CLIP)
        return CLIPTextModel(config)

    unet = build("unet", lambda: UNet2DConditionModel(**SD15_UNET))
    vae = build("vae", lambda: AutoencoderKL(**SD15_VAE))
    text = build("text_encoder", clip_factory)
    gc.collect()

    for sub, model in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        model.save_pretrained(args.out / "diffusers" / sub, safe_serialization=True)

    single = fixtures.build_single_file(unet, vae, text)  # shares storage with the models
    fixtures.check_roundtrip(single, unet, vae, text)
    fixtures.save(single, single_path)
    print(f"{single_path}: {single_path.stat().st_size / 1e9:.2f} GB, {len(single)} tensors")
    del single, unet, vae, text
    gc.collect()


if __name__ == "__main__":
    main()
