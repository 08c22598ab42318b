"""Load a full-size (SD-1.5) random checkpoint and run one UNet step; report time and peak memory.

Needs the checkpoint that `benchmarks/build_sd15_checkpoint.py` writes (about 2 GB fp16):

    .venv/bin/python benchmarks/load_full_size.py [--dtype float32] [--size 256]

Each phase runs in a fresh subprocess so that its peak RSS (`ru_maxrss`) is its own:
  cold     convert the original single file on load (no cache)
  convert  write the converted-weights cache (`mlx-sd convert`)
  cached   load from that cache
  step     load from the cache, then one UNet step (batch 1, CFG-less) at --size pixels
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / ".cache" / "sd15-random" / "stable-diffusion" / "model.safetensors"
PHASES = ("cold", "convert", "cached", "step")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def run_phase(phase: str, checkpoint: Path, cache_dir: Path, dtype: str, size: int) -> dict:
    import mlx.core as mx

    from convert import convert_checkpoint, load_sd1
    from mlx_sd.engine.backends import from_environment

    backend = from_environment()
    start = time.perf_counter()
    if phase == "convert":
        convert_checkpoint(checkpoint, cache_dir, dtype, reader=backend.reader)
        return {"seconds": time.perf_counter() - start, "peak_rss_gib": peak_rss_gib()}
    models = backend.prepare_models(load_sd1(checkpoint, dtype=dtype, cache_dir=cache_dir if phase != "cold" else None,
                                             reader=backend.reader))
    result = {"seconds": time.perf_counter() - start, "peak_rss_gib": peak_rss_gib()}
    if phase == "step":
        weight_dtype = backend.activation_dtype(models.unet.conv_in.weight.dtype)
        latents = mx.random.normal((1, size // 8, size // 8, 4), key=mx.random.key(0)).astype(weight_dtype)
        context = mx.zeros((1, 77, models.unet.config.cross_attention_dim), dtype=weight_dtype)
        start = time.perf_counter()
        eps = models.unet(latents, mx.array(500), context)
        mx.eval(eps)
        seconds = time.perf_counter() - start
        result = {"seconds": seconds, "peak_rss_gib": peak_rss_gib(), "finite": bool(mx.isfinite(eps).all())}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels for the UNet step")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ", ".join(PHASES))
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase, print JSON
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        print(json.dumps(run_phase(args.phase, args.checkpoint, args.cache_dir, args.dtype, args.size)))
        return
    if not args.checkpoint.is_file():
        sys.exit(f"{args.checkpoint} not found; build it: .venv-ref/bin/python benchmarks/build_sd15_checkpoint.py")

    size_gib = args.checkpoint.stat().st_size / 2**30
    print(f"checkpoint {args.checkpoint} ({size_gib:.2f} GiB), target dtype {args.dtype}")
    with tempfile.TemporaryDirectory(prefix="mlx-sd-bench-") as cache_dir:
        for phase in args.phases.split(","):
            command = [sys.executable, __file__, "--phase", phase, "--checkpoint", str(args.checkpoint),
                       "--cache-dir", cache_dir, "--dtype", args.dtype, "--size", str(args.size)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = json.loads(output.strip().splitlines()[-1])
            label = {"step": f"unet step {args.size}px", "convert": "convert"}.get(phase, f"{phase} load")
            extra = "" if "finite" not in result else f"  finite={result['finite']}"
            print(f"{label:>18}: {result['seconds']:7.1f} s   peak RSS {result['peak_rss_gib']:5.2f} GiB{extra}")


if __name__ == "__main__":
    main()
