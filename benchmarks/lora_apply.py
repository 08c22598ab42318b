"""Applying a LoRA: ours (`LoraMerger.apply`) against diffusers' `load_lora_weights` + `fuse_lora`.

A rank-32 kohya LoRA with random fp16 factors on every attention, feed-forward and projection
layer of the UNet and every attention and MLP layer of the text encoder (the layers kohya's
trainers target), written once, then applied to the same fp16 checkpoint (the diffusers folder
that `build_sd15_checkpoint.py` writes, or any SD-1 diffusers folder given with `--model`). Each
side runs in its own subprocess, the sides alternating, so that every peak RSS is its own. Reported:
the time to apply, the memory the process holds afterwards and at its peak while applying, beyond
what it held with the model loaded (RSS; for ours also MLX's active memory), and for ours the time
to take the LoRA out again and to ask for the same set again. Writes `results/<date>-lora-apply.md`.

    nice .venv/bin/python benchmarks/lora_apply.py --repeat 2
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OURS_PY, REF_PY = REPO / ".venv" / "bin" / "python", REPO / ".venv-ref" / "bin" / "python"
MODEL = REPO / ".cache" / "sd15-random" / "diffusers"
RANK, ALPHA, WEIGHT = 32, 16.0, 0.8
UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TE_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def start_peak() -> float:
    """Resets the process's peak RSS (Linux's VmHWM) to now; returns the RSS now."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss_gib()


def peak_rss_gib() -> float:
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 2**20


def write_lora(model: Path, path: Path) -> int:
    """The rank-32 kohya file for the model's layers (shapes read off its safetensors headers)."""
    import numpy as np
    from safetensors.numpy import save_file

    from convert.formats import read_header

    rng = np.random.default_rng(0)
    tensors = {}
    for prefix, file, layers in (("lora_unet_", model / "unet" / "diffusion_pytorch_model.safetensors", UNET_LAYERS),
                                 ("lora_te_", model / "text_encoder" / "model.safetensors", TE_LAYERS)):
        for key, info in read_header(file).tensors.items():
            name = key.removesuffix(".weight")
            if not key.endswith(".weight") or not name.endswith(layers) or len(info.shape) not in (2, 4):
                continue
            out, inputs = info.shape[0], info.shape[1]
            kohya = prefix + name.replace(".", "_")
            tensors[f"{kohya}.lora_down.weight"] = (rng.standard_normal((RANK, inputs, *info.shape[2:])) * 0.01).astype(np.float16)
            tensors[f"{kohya}.lora_up.weight"] = (rng.standard_normal((out, RANK, *[1] * (len(info.shape) - 2))) * 0.01).astype(np.float16)
            tensors[f"{kohya}.alpha"] = np.array(ALPHA, dtype=np.float16)
    save_file(tensors, str(path))
    return len(tensors) // 3


def run_ours(model: Path, lora: Path) -> dict:
    from mlx_sd.cpu.runtime import configure

    configure()  # the BLAS, before mlx.core is imported, as `mlx-sd serve` does
    import mlx.core as mx

    from convert.loader import load_sd1
    from mlx_sd.engine.backends import from_environment
    from mlx_sd.engine.lora_merge import LoraMerger, unet_levels

    backend = from_environment()
    models = backend.prepare_models(load_sd1(model, dtype=mx.float16, reader=backend.reader))
    mx.eval(models.unet.parameters(), models.text_encoder.parameters())
    merger = LoraMerger({"unet": models.unet, "text_encoder": models.text_encoder}, unet_levels(models.unet))
    rss, active = start_peak(), mx.get_active_memory() / 2**30
    start = time.perf_counter()
    merger.apply([(lora, WEIGHT)])
    apply = time.perf_counter() - start
    held, peak = (rss_gib() - rss, mx.get_active_memory() / 2**30 - active), peak_rss_gib() - rss
    start = time.perf_counter()
    merger.apply([(lora, WEIGHT)])
    again = time.perf_counter() - start
    start = time.perf_counter()
    merger.apply([])
    restore = time.perf_counter() - start
    return {"apply_s": apply, "held_rss_gib": held[0], "held_mlx_gib": held[1], "same_set_s": again,
            "restore_s": restore, "peak_rss_gib": peak, "model_rss_gib": rss, "backend": backend.value}


def run_reference(model: Path, lora: Path) -> dict:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.set_num_threads(2)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(model / "vae", torch_dtype=torch.float16),
        text_encoder=CLIPTextModel.from_pretrained(model / "text_encoder", torch_dtype=torch.float16),
        tokenizer=None, unet=UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch.float16),
        scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with torch.no_grad():  # fault in the memory-mapped weights, so RSS counts the model as ours does
        for network in (pipe.unet, pipe.text_encoder):
            for parameter in network.parameters():
                parameter.float().sum()
    rss = start_peak()
    start = time.perf_counter()
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=WEIGHT)
    apply = time.perf_counter() - start
    return {"apply_s": apply, "held_rss_gib": rss_gib() - rss, "peak_rss_gib": peak_rss_gib() - rss,
            "model_rss_gib": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL, help="an SD-1 diffusers folder (unet/, text_encoder/, vae/)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--ref-python", type=Path, default=REF_PY, help="the reference environment's python")
    parser.add_argument("--side", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--lora", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run = run_ours if args.side == "ours" else run_reference
        print(json.dumps(run(args.model, args.lora)))
        return

    with tempfile.TemporaryDirectory(prefix="mlx-sd-lora-") as folder:
        lora = Path(folder) / "rank32.safetensors"
        layers = write_lora(args.model, lora)
        samples: dict[str, list[dict]] = {"ours": [], "reference": []}
        for i in range(args.repeat):
            for side in ("ours", "reference") if i % 2 == 0 else ("reference", "ours"):
                python = OURS_PY if side == "ours" else args.ref_python
                out = subprocess.run([str(python), __file__, "--side", side, "--model", str(args.model),
                                      "--lora", str(lora)], check=True, capture_output=True, text=True).stdout
                samples[side].append(json.loads(out.strip().splitlines()[-1]))
                print(side, samples[side][-1], flush=True)
        size = lora.stat().st_size / 2**20
    report(args, layers, size, samples)


def report(args: argparse.Namespace, layers: int, size_mib: float, samples: dict[str, list[dict]]) -> None:
    def best(side: str, key: str) -> float:
        return min(s[key] for s in samples[side])

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    rows = [("apply (s)", "apply_s"), ("RSS held after applying, beyond the model's (GiB)", "held_rss_gib"),
            ("peak RSS while applying, beyond the model's (GiB)", "peak_rss_gib"),
            ("RSS of the loaded model (GiB)", "model_rss_gib")]
    lines = [
        f"# LoRA apply, {dt.date.today()}", "",
        f"- machine: {cpu}, {platform.machine()}; ours on the {samples['ours'][0]['backend']} backend, "
        "diffusers (torch CPU, 2 threads)",
        f"- model: `{args.model}` in fp16 on both sides; LoRA: kohya, rank {RANK}, alpha {ALPHA:g}, "
        f"{layers} layers, {size_mib:.0f} MiB, weight {WEIGHT}",
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
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
