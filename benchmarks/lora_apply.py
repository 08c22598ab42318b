"""Applying a LoRA: ours (`LoraMerger.apply`) against diffusers' `load_lora_weights` + `fuse_lora`.

A rank-32 kohya LoRA with random fp16 factors on every attention, feed-forward and projection
layer of the UNet and every attention and MLP layer of the text encoders (the layers kohya's
trainers target), written once, then applied to the same checkpoint on both sides:
  - `--family sd1` (default): SD 1.5 in fp16, the diffusers folder that `build_sd15_checkpoint.py`
    writes (or any SD-1 diffusers folder given with `--model`);
  - `--family sdxl`: SDXL base in bf16, the single file that `build_sdxl_checkpoint.py` writes
    (diffusers reads it one network at a time, as `run_sdxl.py` does); the LoRA is named as SDXL
    trainers write it (`lora_unet_` in LDM's numbering, `lora_te1_`, `lora_te2_`). Each side holds
    about 7 GiB with the model loaded, ours 13 GiB at its peak: run nothing else large beside it.
Each side runs in its own subprocess, the sides alternating, so that every peak RSS is its own.
Reported: the time to apply, the memory the process holds afterwards and at its peak while
applying, beyond what it held with the model loaded (RSS; for ours also MLX's active memory), and
for ours the time to take the LoRA out again and to ask for the same set again. Writes the
family's section of `results/<date>-lora-apply.md`.

    nice .venv/bin/python benchmarks/lora_apply.py --repeat 2
    nice .venv/bin/python benchmarks/lora_apply.py --family sdxl --repeat 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import run_sd15 as sd15  # the benchmarks' shared paths and peak-RSS reset (stdlib only)

REPO = sd15.REPO
sys.path.insert(0, str(REPO))
OURS_PY, REF_PY = sd15.OURS_PY, sd15.REF_PY
MODEL = REPO / ".cache" / "sd15-random" / "diffusers"
SDXL_MODEL = REPO / ".cache" / "sdxl-random" / "stable-diffusion" / "model.safetensors"
# family -> (default model, dtype on both sides, what the results call it)
FAMILIES = {"sd1": (MODEL, "float16", "SD 1.5"), "sdxl": (SDXL_MODEL, "bfloat16", "SDXL base")}
RANK, ALPHA, WEIGHT = 32, 16.0, 0.8
UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TE_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def start_peak() -> float:
    """Resets the process's peak RSS (Linux's VmHWM) to now; returns the RSS now."""
    return sd15.reset_peak_rss()["held_rss_gib"]


def _sd1_layers(model: Path):
    """(kohya module name, PyTorch weight shape) of the targeted layers of an SD-1 diffusers folder."""
    from convert.formats import read_header

    for prefix, file, layers in (("lora_unet_", model / "unet" / "diffusion_pytorch_model.safetensors", UNET_LAYERS),
                                 ("lora_te_", model / "text_encoder" / "model.safetensors", TE_LAYERS)):
        for key, info in read_header(file).tensors.items():
            name = key.removesuffix(".weight")
            if key.endswith(".weight") and name.endswith(layers) and len(info.shape) in (2, 4):
                yield prefix + name.replace(".", "_"), tuple(info.shape)


# SDXL's single file: (prefix there, kohya prefix); OpenCLIP bigG's layers in transformers' names,
# its fused q/k/v projection split in three.
SDXL_SECTIONS = (("model.diffusion_model.", "lora_unet_"), ("conditioner.embedders.0.transformer.", "lora_te1_"))
BIGG = "conditioner.embedders.1.model.transformer.resblocks."
BIGG_LAYERS = {"attn.in_proj_weight": ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj"),
               "attn.out_proj.weight": ("self_attn_out_proj",), "mlp.c_fc.weight": ("mlp_fc1",),
               "mlp.c_proj.weight": ("mlp_fc2",)}


def _sdxl_layers(model: Path):
    """(kohya module name, PyTorch weight shape) of the targeted layers of SDXL's single file."""
    from convert.formats import read_header

    for key, info in read_header(model).tensors.items():
        shape = tuple(info.shape)
        if key.startswith(BIGG):
            block, rest = key[len(BIGG):].split(".", 1)
            for part in BIGG_LAYERS.get(rest, ()):
                parts = len(BIGG_LAYERS[rest])
                yield f"lora_te2_text_model_encoder_layers_{block}_{part}", (shape[0] // parts, *shape[1:])
            continue
        for theirs, prefix in SDXL_SECTIONS:
            name = key.removeprefix(theirs).removesuffix(".weight")
            if (key.startswith(theirs) and key.endswith(".weight") and name.endswith((*UNET_LAYERS, *TE_LAYERS))
                    and len(shape) in (2, 4)):
                yield prefix + name.replace(".", "_"), shape


def write_lora(family: str, model: Path, path: Path) -> int:
    """The rank-32 kohya file for the model's layers (shapes read off its safetensors headers)."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {}
    for kohya, shape in (_sd1_layers if family == "sd1" else _sdxl_layers)(model):
        out, inputs = shape[0], shape[1]
        down, up = (RANK, inputs, *shape[2:]), (out, RANK, *[1] * (len(shape) - 2))
        tensors[f"{kohya}.lora_down.weight"] = (rng.standard_normal(down) * 0.01).astype(np.float16)
        tensors[f"{kohya}.lora_up.weight"] = (rng.standard_normal(up) * 0.01).astype(np.float16)
        tensors[f"{kohya}.alpha"] = np.array(ALPHA, dtype=np.float16)
    save_file(tensors, str(path))
    return len(tensors) // 3


def run_ours(family: str, model: Path, lora: Path) -> dict:
    from mlx_sd.cpu.runtime import configure

    configure()  # the BLAS, before mlx.core is imported, as `mlx-sd serve` does
    import mlx.core as mx

    from convert.loader import load_networks
    from mlx_sd.engine.backends import from_environment
    from mlx_sd.engine.lora_merge import LoraMerger, unet_levels

    backend = from_environment()
    models = backend.prepare_models(load_networks(model, dtype=FAMILIES[family][1], reader=backend.reader))
    networks = {name: getattr(models, name) for name in ("unet", "text_encoder", "text_encoder_2")}
    networks = {name: network for name, network in networks.items() if network is not None}
    mx.eval([network.parameters() for network in networks.values()])
    merger = LoraMerger(networks, unet_levels(models.unet))
    rss, active = start_peak(), mx.get_active_memory() / 2**30
    start = time.perf_counter()
    merger.apply([(lora, WEIGHT)])
    apply = time.perf_counter() - start
    held, peak = (sd15.rss_gib() - rss, mx.get_active_memory() / 2**30 - active), sd15.rss_gib("VmHWM") - rss
    start = time.perf_counter()
    merger.apply([(lora, WEIGHT)])
    again = time.perf_counter() - start
    start = time.perf_counter()
    merger.apply([])
    restore = time.perf_counter() - start
    return {"apply_s": apply, "held_rss_gib": held[0], "held_mlx_gib": held[1], "same_set_s": again,
            "restore_s": restore, "peak_rss_gib": peak, "model_rss_gib": rss, "backend": backend.value}


def run_reference(family: str, model: Path, lora: Path) -> dict:
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel

    torch.set_num_threads(2)
    dtype = getattr(torch, FAMILIES[family][1])
    if family == "sd1":
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL.from_pretrained(model / "vae", torch_dtype=dtype),
            text_encoder=CLIPTextModel.from_pretrained(model / "text_encoder", torch_dtype=dtype),
            tokenizer=None, unet=UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=dtype),
            scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        import run_sdxl

        nets = run_sdxl._diffusers_networks(("unet", "text_encoder", "text_encoder_2"), dtype, model)
        pipe = StableDiffusionXLPipeline(vae=None, tokenizer=None, tokenizer_2=None, scheduler=DDIMScheduler(),
                                         add_watermarker=False, **nets)
    networks = [pipe.unet, pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    with torch.no_grad():  # fault in the memory-mapped weights, so RSS counts the model as ours does
        for network in networks:
            for parameter in network.parameters():
                parameter.float().sum()
    rss = start_peak()
    start = time.perf_counter()
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=WEIGHT)
    apply = time.perf_counter() - start
    return {"apply_s": apply, "held_rss_gib": sd15.rss_gib() - rss, "peak_rss_gib": sd15.rss_gib("VmHWM") - rss,
            "model_rss_gib": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=FAMILIES, default="sd1")
    parser.add_argument("--model", type=Path, help="sd1: a diffusers folder (unet/, text_encoder/, vae/); "
                                                   "sdxl: a single file (default: the .cache/ checkpoint)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--ref-python", type=Path, default=REF_PY, help="the reference environment's python")
    parser.add_argument("--side", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--lora", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = args.model or FAMILIES[args.family][0]
    if args.side:
        run = run_ours if args.side == "ours" else run_reference
        print(json.dumps(run(args.family, args.model, args.lora)))
        return

    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="mlx-sd-lora-") as folder:
        lora = Path(folder) / "rank32.safetensors"
        layers = write_lora(args.family, args.model, lora)
        samples: dict[str, list[dict]] = {"ours": [], "reference": []}
        for i in range(args.repeat):
            for side in ("ours", "reference") if i % 2 == 0 else ("reference", "ours"):
                python = OURS_PY if side == "ours" else args.ref_python
                out = subprocess.run([str(python), __file__, "--side", side, "--family", args.family,
                                      "--model", str(args.model), "--lora", str(lora)],
                                     check=True, capture_output=True, text=True).stdout
                samples[side].append(json.loads(out.strip().splitlines()[-1]))
                print(side, samples[side][-1], flush=True)
        size = lora.stat().st_size / 2**20
    load.append(os.getloadavg()[0])
    report(args, layers, size, samples, load)


def report(args: argparse.Namespace, layers: int, size_mib: float, samples: dict[str, list[dict]],
           load: list[float]) -> None:
    def best(side: str, key: str) -> float:
        return min(s[key] for s in samples[side])

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    rows = [("apply (s)", "apply_s"), ("RSS held after applying, beyond the model's (GiB)", "held_rss_gib"),
            ("peak RSS while applying, beyond the model's (GiB)", "peak_rss_gib"),
            ("RSS of the loaded model (GiB)", "model_rss_gib")]
    _, dtype, label = FAMILIES[args.family]
    heading = f"## {label}"
    lines = [
        heading, "",
        f"- machine: {cpu}, {platform.machine()}, {os.cpu_count()} cores, 1-minute load {load[0]:.2f} at the start "
        f"and {load[1]:.2f} at the end; ours on the {samples['ours'][0]['backend']} backend, diffusers (torch CPU, "
        "2 threads)",
        f"- model: `{os.path.relpath(args.model, REPO)}` in {dtype} on both sides; LoRA: kohya, rank {RANK}, "
        f"alpha {ALPHA:g}, {layers} layers, {size_mib:.0f} MiB, weight {WEIGHT}",
        f"- command: `{' '.join(['benchmarks/lora_apply.py', *sys.argv[1:]])}`; best of {args.repeat} alternating runs",
        "",
        "| | ours | diffusers load_lora_weights + fuse_lora | ours / diffusers |", "| --- | --- | --- | --- |",
    ]
    for label, key in rows:
        ours, ref = best("ours", key), best("reference", key)
        lines.append(f"| {label} | {ours:.3f} | {ref:.3f} | {ours / ref:.2f} |" if ref > 0 else
                     f"| {label} | {ours:.3f} | {ref:.3f} | |")
    lines += ["", f"Ours also: MLX active memory held after applying {best('ours', 'held_mlx_gib'):.3f} GiB "
              f"(the replaced weights, kept to restore); the same set again {best('ours', 'same_set_s') * 1e3:.2f} ms; "
              f"taking it out again {best('ours', 'restore_s') * 1e3:.1f} ms.", "", "Raw samples:", "",
              "```", json.dumps(samples, indent=1), "```", ""]
    out = REPO / "benchmarks" / "results" / f"{dt.date.today()}-lora-apply.md"
    out.write_text(with_section(out.read_text() if out.exists() else f"# LoRA apply, {dt.date.today()}\n",
                                heading, "\n".join(lines)))
    print("\n".join(lines))


def with_section(text: str, heading: str, section: str) -> str:
    """`text` with its `heading` section (up to the next `## `) replaced by `section`, or `section` appended."""
    start = text.find(heading + "\n")
    if start == -1:
        return text.rstrip("\n") + "\n\n" + section
    end = text.find("\n## ", start + len(heading))
    return text[:start] + section + (text[end + 1:] if end != -1 else "")


if __name__ == "__main__":
    main()
