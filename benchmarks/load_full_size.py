"""Load a full-size random checkpoint (SD-1.5 or SDXL) and run it; report time and peak memory.

Needs the checkpoint that `benchmarks/build_sd15_checkpoint.py` (about 2 GB fp16) or
`benchmarks/build_sdxl_checkpoint.py` (--family sdxl, 6.9 GB) writes:

    .venv/bin/python benchmarks/load_full_size.py [--family sdxl] [--dtype float32] [--size 256]

Each phase runs in a fresh subprocess so that its peak RSS (`ru_maxrss`) is its own:
  cold     convert the original single file on load (no cache)
  convert  write the converted-weights cache (`mlx-sd convert`)
  cached   load from that cache
  step     load from the cache, then one UNet step (batch 1, CFG-less) at --size pixels
  serve    a server (TLS, 127.0.0.1) with the checkpoint as its default model generates one
           --size image in --steps steps through the documented API (not in the default phases)
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
CHECKPOINTS = {family: REPO / ".cache" / f"{family}-random" / "stable-diffusion" / "model.safetensors"
               for family in ("sd15", "sdxl")}
PHASES = ("cold", "convert", "cached", "step")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def serve(checkpoint: Path, cache_dir: Path, dtype: str, size: int, steps: int) -> dict:
    """One image through a server's documented API: its size, and the seconds from the request to
    each stage's signpost (the first, text encoded, includes loading and caching the model)."""
    import io

    from PIL import Image

    import harness  # this folder's: the script's own directory is on sys.path

    start = time.perf_counter()
    with harness.tiny_server(checkpoint, cache_dir=cache_dir, dtype=dtype) as server:
        requested = time.time()
        responses = list(server.stub().GenerateImage(harness.generation(size, steps)))
    seconds = time.perf_counter() - start
    stages, last = {}, requested
    for event in (event for response in responses for event in response.events):
        name = harness.pb.SignpostEvent.EventType.Name(event.type).lower()
        label = f"{name} {event.step}/{event.total}" if event.total else name
        stages[label] = event.timestamp / 1000 - last
        last = event.timestamp / 1000
    image = Image.open(io.BytesIO(responses[-1].images[0]))
    return {"seconds": seconds, "peak_rss_gib": peak_rss_gib(), "image": list(image.size),
            "parameters": responses[-1].info[0].splitlines()[-1], "stages": stages}


def run_phase(phase: str, checkpoint: Path, cache_dir: Path, dtype: str, size: int, steps: int) -> dict:
    from mlx_sd.cpu.runtime import configure

    configure()  # the BLAS, before anything imports mlx.core, as the entry points do
    import mlx.core as mx

    from convert import convert_checkpoint, load_networks
    from mlx_sd.engine.backends import from_environment

    if phase == "serve":
        return serve(checkpoint, cache_dir, dtype, size, steps)
    backend = from_environment()
    start = time.perf_counter()
    if phase == "convert":
        convert_checkpoint(checkpoint, cache_dir, dtype, reader=backend.reader)
        return {"seconds": time.perf_counter() - start, "peak_rss_gib": peak_rss_gib()}
    cache = cache_dir if phase != "cold" else None
    models = backend.prepare_models(load_networks(checkpoint, dtype=dtype, cache_dir=cache, reader=backend.reader))
    result = {"seconds": time.perf_counter() - start, "peak_rss_gib": peak_rss_gib()}
    if phase == "step":
        weight_dtype = backend.activation_dtype(models.unet.conv_in.weight.dtype)
        latents = mx.random.normal((1, size // 8, size // 8, 4), key=mx.random.key(0)).astype(weight_dtype)
        context = mx.zeros((1, 77, models.unet.config.cross_attention_dim), dtype=weight_dtype)
        added = {}
        if models.unet.config.addition_embed_type == "text_time":  # SDXL: pooled text and size micro-conditioning
            pooled = models.unet.config.projection_class_embeddings_input_dim - 6 * models.unet.config.addition_time_embed_dim
            added = {"text_embeds": mx.zeros((1, pooled), dtype=weight_dtype),
                     "time_ids": mx.array([[size, size, 0, 0, size, size]], dtype=weight_dtype)}
        start = time.perf_counter()
        eps = models.unet(latents, mx.array(500), context, **added)
        mx.eval(eps)
        seconds = time.perf_counter() - start
        result = {"seconds": seconds, "peak_rss_gib": peak_rss_gib(), "finite": bool(mx.isfinite(eps).all())}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(CHECKPOINTS), default="sd15", help="which built checkpoint")
    parser.add_argument("--checkpoint", type=Path, help="a single file or diffusers folder; default: the --family's")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps of the serve phase")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels for the UNet step")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ", ".join(PHASES))
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase, print JSON
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.checkpoint = args.checkpoint or CHECKPOINTS[args.family]

    if args.phase:
        print(json.dumps(run_phase(args.phase, args.checkpoint, args.cache_dir, args.dtype, args.size, args.steps)))
        return
    if not args.checkpoint.exists():
        sys.exit(f"{args.checkpoint} not found; build it: "
                 f".venv-ref/bin/python benchmarks/build_{args.family}_checkpoint.py")

    files = [args.checkpoint] if args.checkpoint.is_file() else [p for p in args.checkpoint.rglob("*") if p.is_file()]
    size_gib = sum(p.stat().st_size for p in files) / 2**30
    print(f"checkpoint {args.checkpoint} ({size_gib:.2f} GiB), target dtype {args.dtype}")
    with tempfile.TemporaryDirectory(prefix="mlx-sd-bench-") as cache_dir:
        for phase in args.phases.split(","):
            command = [sys.executable, __file__, "--phase", phase, "--checkpoint", str(args.checkpoint),
                       "--cache-dir", cache_dir, "--dtype", args.dtype, "--size", str(args.size),
                       "--steps", str(args.steps)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = json.loads(output.strip().splitlines()[-1])
            label = {"step": f"unet step {args.size}px", "convert": "convert",
                     "serve": f"served {args.size}px"}.get(phase, f"{phase} load")
            extra = "" if "finite" not in result else f"  finite={result['finite']}"
            extra += "" if "image" not in result else f"  image {result['image']}: {result['parameters']}"
            print(f"{label:>18}: {result['seconds']:7.1f} s   peak RSS {result['peak_rss_gib']:5.2f} GiB{extra}")
            for stage, seconds in result.get("stages", {}).items():
                print(f"{stage:>26}: {seconds:7.1f} s after the previous")


if __name__ == "__main__":
    main()
