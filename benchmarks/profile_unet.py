"""Where a full-size UNet forward (or VAE decode) spends its time on MLX's CPU device, by kind
of operation: on the CPU kernels, or on MLX's own ops with MLX_SD_BACKEND=mlx.

    nice .venv/bin/python benchmarks/profile_unet.py [--size 512] [--batch 2] [--vae] [--dtype float32] [--family sdxl]

Each profiled operation evaluates its inputs first and its output after, so its time is its
own; the sum is a little above an unprofiled forward (no overlap between ops). Needs the random
SD-1.5 or SDXL checkpoint (benchmarks/build_sd15_checkpoint.py, build_sdxl_checkpoint.py) and writes
its converted cache.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from mlx_sd.cpu.runtime import configure

configure()

import mlx.core as mx  # noqa: E402  (after the BLAS is chosen)
import mlx.nn as nn  # noqa: E402

from convert import load_networks  # noqa: E402
from mlx_sd.engine.backends import Backend, from_environment  # noqa: E402
from mlx_sd.cpu import activations as cpu_activations  # noqa: E402
from mlx_sd.cpu import layers as cpu_layers  # noqa: E402
from mlx_sd.cpu.norms import GroupNorm, LayerNorm  # noqa: E402
from mlx_sd.models import layers, unet, vae  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = {family: REPO / ".cache" / f"{family}-random" / "stable-diffusion" / "model.safetensors"
               for family in ("sd15", "sdxl")}


def timed(totals: dict[str, float], name: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        mx.eval([a for a in args if isinstance(a, mx.array)])
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        mx.eval(out)
        totals[name] += time.perf_counter() - start
        return out

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--vae", action="store_true", help="profile a VAE decode instead")
    parser.add_argument("--dtype", default="float32", help="weights: float32, float16 or bfloat16")
    parser.add_argument("--family", choices=sorted(CHECKPOINTS), default="sd15", help="which built checkpoint")
    args = parser.parse_args()
    backend = from_environment()
    models = backend.prepare_models(load_networks(CHECKPOINTS[args.family], dtype=args.dtype,
                                                  cache_dir=REPO / ".cache" / "converted",
                                                  reader=backend.reader))
    dtype = backend.activation_dtype(models.unet.conv_in.weight.dtype)
    config = models.unet.config
    key = mx.random.key(0)
    x = mx.random.normal((args.batch, args.size // 8, args.size // 8, 4), key=key).astype(dtype)
    context = mx.random.normal((args.batch, 77, config.cross_attention_dim), key=key).astype(dtype)
    t = mx.array([500] * args.batch)
    added = {}
    if config.addition_embed_type == "text_time":  # SDXL: pooled text and size micro-conditioning
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": mx.random.normal((args.batch, pooled), key=key).astype(dtype),
                 "time_ids": mx.array([[args.size, args.size, 0, 0, args.size, args.size]] * args.batch, dtype=dtype)}
    forward = (lambda: models.vae.decode(x)) if args.vae else (lambda: models.unet(x, t, context, **added))
    mx.eval(forward())  # warm-up

    start = time.perf_counter()
    mx.eval(forward())
    plain = time.perf_counter() - start

    totals: dict[str, float] = defaultdict(float)
    if backend is Backend.CPU:
        patches = {
            (cpu_layers.Conv2d, "__call__"): "conv",
            (cpu_layers.Linear, "__call__"): "linear",
            (GroupNorm, "__call__"): "group norm",
            (GroupNorm, "with_silu"): "group norm + silu",
            (LayerNorm, "__call__"): "layer norm",
            (cpu_layers.FeedForward, "__call__"): "feed-forward",
        }
        fn_patches = {(cpu_layers, "attention"): "attention core", (cpu_activations, "geglu"): "geglu",
                      (cpu_activations, "silu"): "silu"}
    else:
        patches = {(nn.Conv2d, "__call__"): "conv", (nn.Linear, "__call__"): "linear",
                   (nn.GroupNorm, "__call__"): "group norm", (nn.LayerNorm, "__call__"): "layer norm",
                   (unet.FeedForward, "__call__"): "feed-forward", (nn.SiLU, "__call__"): "silu"}
        fn_patches = {(layers, "attention"): "attention core"}
    fn_patches |= {(unet, "upsample_nearest"): "upsample", (vae, "upsample_nearest"): "upsample"}
    originals = {k: getattr(*k) for k in patches}
    for (cls, attr), name in patches.items():
        setattr(cls, attr, timed(totals, name, originals[(cls, attr)]))
    fn_originals = {k: getattr(*k) for k in fn_patches}
    for (mod, attr), name in fn_patches.items():
        setattr(mod, attr, timed(totals, name, fn_originals[(mod, attr)]))
    try:
        start = time.perf_counter()
        mx.eval(forward())
        profiled = time.perf_counter() - start
    finally:
        for (cls, attr), fn in {**originals, **fn_originals}.items():
            setattr(cls, attr, fn)
    what = "VAE decode" if args.vae else "UNet forward"
    print(f"{what}, batch {args.batch}, {args.size}²: {plain:.2f} s (profiled run {profiled:.2f} s)")
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {name:>15}: {seconds:6.2f} s  {100 * seconds / profiled:5.1f}%")
    print(f"  {'other':>15}: {profiled - sum(totals.values()):6.2f} s")


if __name__ == "__main__":
    main()
