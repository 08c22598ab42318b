"""The UNet step and the VAE decode on MLX's own ops, plain against `mx.compile`d, in one run.

    .venv/bin/python benchmarks/compile_models.py [--checkpoint FILE] [--size 512] [--repeat 3]

MLX's own ops are the path generation takes on Metal. On the CPU the C kernels (mlx_sd.cpu)
replace many of them, and since they evaluate their inputs they cannot be traced by
`mx.compile`; this benchmark leaves the networks plain (MLX_SD_BACKEND=mlx's path) so that the
CPU times the same ops the GPU runs.
The checkpoint defaults to the full-size random SD-1.5 one (benchmarks/build_sd15_checkpoint.py);
any SD-1 single file works. Weights in the default dtype (float16 on Metal, float32 on the CPU).

Per stage: the first call of each form (the compiled one traces the graph and builds its
kernels then), the median of --repeat further calls, interleaved, the ratio compiled / plain,
and the largest difference between the two outputs. A benchmark, not a test: CI does not run it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from harness import REPO, write_report

from mlx_sd.cpu.runtime import configure

configure()

import mlx.core as mx  # noqa: E402  (after the BLAS is chosen)

from convert import load_networks  # noqa: E402

CHECKPOINT = REPO / ".cache" / "sd15-random" / "stable-diffusion" / "model.safetensors"


def call_time(fn: Callable[[], mx.array]) -> tuple[float, mx.array]:
    start = time.perf_counter()
    out = fn()
    mx.eval(out)
    return time.perf_counter() - start, out


def compare(name: str, fn: Callable[..., mx.array], inputs: tuple[mx.array, ...], repeat: int) -> str:
    forms = {"plain": fn, "compiled": mx.compile(fn)}
    first, outputs, times = {}, {}, {form: [] for form in forms}
    for form, f in forms.items():
        first[form], outputs[form] = call_time(lambda: f(*inputs))
    for _ in range(repeat):
        for form, f in forms.items():
            times[form].append(call_time(lambda: f(*inputs))[0])
    plain, compiled = statistics.median(times["plain"]), statistics.median(times["compiled"])
    difference = float(mx.abs(outputs["plain"].astype(mx.float32) - outputs["compiled"].astype(mx.float32)).max())
    return (f"| {name} | {first['plain']:.2f} s | {first['compiled']:.2f} s | {plain:.2f} s | {compiled:.2f} s "
            f"| **{compiled / plain:.2f}x** | {difference:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    models = load_networks(args.checkpoint)  # plain networks: MLX's own ops everywhere, as on the GPU
    dtype = models.unet.conv_in.weight.dtype
    key = mx.random.key(0)
    side = args.size // 8
    latents = mx.random.normal((2, side, side, 4), key=key).astype(dtype)
    context = mx.random.normal((2, 77, 768), key=key).astype(dtype)
    timesteps = mx.array([500, 500])
    rows = [
        compare(f"UNet step {args.size}², CFG batch 2", lambda x, t, c: models.unet(x, t, c),
                (latents, timesteps, context), args.repeat),
        compare(f"VAE decode {args.size}²", lambda z: models.vae.decode(z), (latents[:1],), args.repeat),
    ]
    write_report(f"compile-models-{mx.default_device().type.name}", "mx.compile on MLX's own ops",
                 f"- checkpoint: {args.checkpoint.name}, weights {dtype}\n- medians of {args.repeat}, interleaved\n\n"
                 "| stage | first plain | first compiled | plain | compiled | compiled / plain | max abs diff |\n"
                 "|---|---|---|---|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
