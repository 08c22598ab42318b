"""Compare the BLAS libraries MLX can use on Linux, side by side in one run.

    .venv/bin/python benchmarks/blas_candidates.py [--unet] [CHOICE ...]

Each CHOICE (an `MLX_SD_BLAS` value: `reference`, `mkl`, `openblas` or a library path) runs in
its own subprocess, because the BLAS must be loaded before `mlx.core` is imported. Measured:
a 2048² fp32 matmul, a 320-channel 3x3 convolution at 64x64 (batch 2, as in the UNet's first
block) and, with --unet, a full-size fp32 UNet forward at 256² (batch 2), from the random
SD-1.5 checkpoint (`benchmarks/build_sd15_checkpoint.py`). Medians of --repeat runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / ".cache" / "sd15-random" / "stable-diffusion" / "model.safetensors"
CACHE_DIR = REPO / ".cache" / "converted"


def median_seconds(fn, repeat: int) -> float:
    fn()  # warm-up: first-call allocations and thread start-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(repeat: int, unet: bool) -> dict:
    from mlx_sd.cpu.runtime import configure

    blas = configure()
    import mlx.core as mx

    key = mx.random.key(0)
    a, b = mx.random.normal((2048, 2048), key=key), mx.random.normal((2048, 2048), key=key)
    x = mx.random.normal((2, 64, 64, 320), key=key)
    w = mx.random.normal((320, 3, 3, 320), key=key) * 0.02
    result = {
        "blas": blas.name,
        "path": str(blas.path),
        "matmul_2048_s": median_seconds(lambda: mx.eval(a @ b), repeat),
        "conv_320_64x64_s": median_seconds(lambda: mx.eval(mx.conv2d(x, w, padding=1)), repeat),
    }
    if unet:
        from convert import load_networks
        from mlx_sd.engine.backends import from_environment

        backend = from_environment()
        networks = load_networks(CHECKPOINT, dtype="float32", cache_dir=CACHE_DIR, reader=backend.reader)
        model = backend.prepare(networks.unet)
        latents = mx.random.normal((2, 32, 32, 4), key=key)
        context = mx.random.normal((2, 77, 768), key=key)
        result["unet_256_b2_s"] = median_seconds(lambda: mx.eval(model(latents, mx.array([500, 500]), context)), repeat)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("choices", nargs="*", default=["reference", "mkl", "openblas"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--unet", action="store_true", help="also time a full-size UNet forward at 256²")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.repeat, args.unet)))
        return
    rows = []
    for choice in args.choices:
        command = [sys.executable, __file__, "--child", "--repeat", str(args.repeat)]
        command += ["--unet"] if args.unet else []
        env = dict(os.environ, MLX_SD_BLAS=choice)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{choice}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append((choice, json.loads(done.stdout.strip().splitlines()[-1])))
    base = next((r for c, r in rows if r["blas"] == "reference"), None)
    for choice, r in rows:
        cells = []
        for key in ("matmul_2048_s", "conv_320_64x64_s", "unet_256_b2_s"):
            if key in r:
                ratio = f" ({r[key] / base[key]:.3f}x ref)" if base and key in base else ""
                cells.append(f"{key}={r[key]:.3f}{ratio}")
        print(f"{choice:>10} -> {r['blas']:<9} {'  '.join(cells)}  [{r['path']}]", flush=True)


if __name__ == "__main__":
    main()
