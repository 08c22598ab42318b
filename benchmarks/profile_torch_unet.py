"""Where diffusers' UNet forward spends its time on torch's CPU backend, by operator: the
reference side of profile_unet.py.

    .venv-ref/bin/python benchmarks/profile_torch_unet.py [--size 512] [--dtype bfloat16] [--threads 2]

Needs the random SD-1.5 checkpoint's diffusers folder (benchmarks/build_sd15_checkpoint.py) and
the reference environment (benchmarks/reference-env.sh).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

FOLDER = Path(__file__).resolve().parents[1] / ".cache" / "sd15-random" / "diffusers" / "unet"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    unet = UNet2DConditionModel.from_pretrained(FOLDER, torch_dtype=dtype).eval()
    x = torch.randn(2, 4, args.size // 8, args.size // 8, dtype=dtype)
    t, context = torch.tensor([500]), torch.randn(2, 77, 768, dtype=dtype)
    with torch.no_grad():
        unet(x, t, context)  # warm-up
        start = time.perf_counter()
        unet(x, t, context)
        plain = time.perf_counter() - start
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            unet(x, t, context)
    print(f"UNet forward, batch 2, {args.size}², {args.dtype}: {plain:.2f} s")
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
