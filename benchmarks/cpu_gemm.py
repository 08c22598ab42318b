"""MLX's CPU convolution and matmul against mlx_sd.cpu.gemm, side by side in one run.

    .venv/bin/python benchmarks/cpu_gemm.py [--repeat 5]
    .venv/bin/python benchmarks/cpu_gemm.py --vae-decode [--repeat 3]

Shapes are SD-1.5's at 512²: the VAE decoder's 3x3 convolutions (batch 1) and the UNet's 3x3
convolutions, linear layers and feed-forward blocks (CFG batch 2). Reports GFLOP/s, peak MLX memory and the time
ratio new / MLX (lower is better). The bf16 rows need a bf16 GEMM for this processor's class
(MKL's on AMX, oneDNN's with AVX-512 BF16: mlx_sd/cpu/dispatch.py). Where the class has
oneDNN's direct convolution, it is timed beside the GEMM forms ("bf16": the GEMMs);
`--vae-decode` times a whole bf16 VAE decode at 512² both ways instead, in turns (needs the random
SD-1.5 checkpoint: benchmarks/build_sd15_checkpoint.py).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from mlx_sd.cpu.runtime import configure

configure()

import mlx.core as mx  # noqa: E402  (after the BLAS is chosen)

from mlx_sd.cpu import gemm as cpu_gemm  # noqa: E402
from mlx_sd.cpu.activations import geglu  # noqa: E402

CONVS = [  # (batch, height, width, in, out)
    ("vae 512² 128", (1, 512, 512, 128, 128)),
    ("vae 256² 256", (1, 256, 256, 256, 256)),
    ("vae 128² 512", (1, 128, 128, 512, 512)),
    ("unet 64² 320", (2, 64, 64, 320, 320)),
    ("unet 32² 640", (2, 32, 32, 640, 640)),
    ("unet 16² 1280", (2, 16, 16, 1280, 1280)),
    ("unet 8² 1280", (2, 8, 8, 1280, 1280)),
]
# Shapes around cpu_gemm.IM2COL_ROWS, where conv2d switches from shifted GEMMs to one GEMM over
# the unfolded input: both forms, forced, and oneDNN's direct convolution (bf16, where the class
# has it); then the VAE decoder's first and last convolutions, whose channel counts (4 in, 3
# out) leave the GEMMs narrow.
FORMS = [
    ("unet 4² 1280", (2, 4, 4, 1280, 1280)),
    ("unet 8² 1280", (2, 8, 8, 1280, 1280)),
    ("unet 16² 640", (2, 16, 16, 640, 640)),
    ("unet 32² 320", (2, 32, 32, 320, 320)),
    ("unet 32² 640", (2, 32, 32, 640, 640)),
    ("vae conv_in 64² 4", (1, 64, 64, 4, 512)),
    ("vae conv_out 512² 3", (1, 512, 512, 128, 3)),
]
LINEARS = [  # (rows, in, out)
    ("unet proj 64² 320", (8192, 320, 320)),
    ("unet geglu 64² 320", (8192, 320, 2560)),
    ("unet ff out 64² 1280", (8192, 1280, 320)),
    ("unet proj 16² 1280", (512, 1280, 1280)),
]
FEED_FORWARDS = [  # (rows, dim, inner): projection to 2 x inner, GEGLU, projection back to dim
    ("unet ff 64² 320", (8192, 320, 1280)),
    ("unet ff 32² 640", (2048, 640, 2560)),
    ("unet ff 16² 1280", (512, 1280, 5120)),
]


def median_time(fn: Callable[[], mx.array], repeat: int) -> tuple[float, float]:
    """Median seconds of `repeat` runs after a warm-up, and the peak MLX memory of one run (MiB)."""
    mx.eval(fn())
    mx.reset_peak_memory()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), mx.get_peak_memory() / 2**20


def report(name: str, flops: float, variants: dict[str, Callable[[], mx.array]], repeat: int) -> None:
    results = {label: median_time(fn, repeat) for label, fn in variants.items()}
    base = next(iter(results.values()))[0]
    cells = [f"{label} {flops / t / 1e9:5.0f} GF/s {t * 1e3:7.1f} ms {peak:6.0f} MiB ({t / base:.2f}x)"
             for label, (t, peak) in results.items()]
    print(f"{name:22s} " + " | ".join(cells), flush=True)


def forced(im2col_rows: int, fn: Callable[[], mx.array], direct: bool = False) -> Callable[[], mx.array]:
    def run() -> mx.array:
        chosen = cpu_gemm.IM2COL_ROWS, cpu_gemm.DIRECT
        cpu_gemm.IM2COL_ROWS, cpu_gemm.DIRECT = im2col_rows, direct
        try:
            return fn()
        finally:
            cpu_gemm.IM2COL_ROWS, cpu_gemm.DIRECT = chosen

    return run


def vae_decode(repeat: int) -> None:
    """A bf16 VAE decode at 512², its convolutions by oneDNN and as GEMMs, in turns."""
    from convert import load_networks
    from mlx_sd.engine.backends import from_environment

    repo = Path(__file__).resolve().parents[1]
    backend = from_environment()
    checkpoint = repo / ".cache" / "sd15-random" / "stable-diffusion" / "model.safetensors"
    models = backend.prepare_models(load_networks(checkpoint, dtype="bfloat16", reader=backend.reader))
    latents = mx.random.normal((1, 64, 64, 4), key=mx.random.key(0))
    decode = {"direct": forced(cpu_gemm.IM2COL_ROWS, lambda: models.vae.decode(latents), direct=True),
              "gemms": forced(cpu_gemm.IM2COL_ROWS, lambda: models.vae.decode(latents))}
    times: dict[str, list[float]] = {label: [] for label in decode}
    for round_ in range(repeat + 1):  # the first round warms up
        for label, fn in decode.items():
            start = time.perf_counter()
            mx.eval(fn())
            if round_:
                times[label].append(time.perf_counter() - start)
    for label, samples in times.items():
        print(f"VAE decode 512² bf16, {label}: median {statistics.median(samples):.2f} s, samples "
              + ", ".join(f"{t:.2f}" for t in samples))
    print(f"direct / gemms: {statistics.median(times['direct']) / statistics.median(times['gemms']):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--vae-decode", action="store_true", help="time a whole VAE decode both ways")
    args = parser.parse_args()
    gemm = cpu_gemm.gemm()
    if gemm is None:
        raise SystemExit("no fast BLAS loaded; cpu_gemm is not used here")
    if args.vae_decode:
        if gemm.conv is None:
            raise SystemExit("no direct convolution on this processor's class")
        return vae_decode(args.repeat)
    bf16 = gemm.bf16 is not None
    print(f"BLAS {configure().name}; bf16 GEMM {'available' if bf16 else 'unavailable'}")
    key = mx.random.key(0)
    for name, (b, h, w, cin, cout) in CONVS:
        x = mx.random.normal((b, h, w, cin), key=key)
        weight = mx.random.normal((cout, 3, 3, cin), key=key) * 0.05
        weight16 = weight.astype(mx.bfloat16)
        mx.eval(x, weight, weight16)
        variants = {
            "mlx": lambda: mx.conv2d(x, weight, padding=1),
            "fp32": lambda: cpu_gemm.conv2d(x, weight, None, 1),
        }
        if bf16:
            variants["bf16"] = forced(cpu_gemm.IM2COL_ROWS, lambda: cpu_gemm.conv2d(x, weight16, None, 1))
        if gemm.conv is not None:
            variants["bf16 direct"] = forced(0, lambda: cpu_gemm.conv2d(x, weight16, None, 1), direct=True)
        report(name, 2 * b * h * w * cin * cout * 9, variants, args.repeat)
    print(f"shifted against unfolded (im2col) convolutions; conv2d unfolds up to {cpu_gemm.IM2COL_ROWS} pixels"
          + ("; direct: oneDNN's convolution" if gemm.conv is not None else ""))
    for name, (b, h, w, cin, cout) in FORMS:
        x = mx.random.normal((b, h, w, cin), key=key)
        weight = (mx.random.normal((cout, 3, 3, cin), key=key) * 0.05).astype(mx.bfloat16 if bf16 else mx.float32)
        mx.eval(x, weight)
        variants = {
            "shifted": forced(0, lambda: cpu_gemm.conv2d(x, weight, None, 1)),
            "unfolded": forced(1 << 30, lambda: cpu_gemm.conv2d(x, weight, None, 1)),
        }
        if gemm.conv is not None:
            variants["direct"] = forced(0, lambda: cpu_gemm.conv2d(x, weight, None, 1), direct=True)
        report(name, 2 * b * h * w * cin * cout * 9, variants, args.repeat)
    if bf16:
        for name, (rows, k, n) in LINEARS:
            x = mx.random.normal((rows, k), key=key)
            weight = mx.random.normal((n, k), key=key) * 0.05
            weight16 = weight.astype(mx.bfloat16)
            mx.eval(x, weight, weight16)
            report(name, 2 * rows * k * n, {
                "mlx fp32": lambda: x @ weight.T,
                "mlx bf16 weights": lambda: x @ weight16.T,
                "bf16": lambda: cpu_gemm.linear(x, weight16, None),
            }, args.repeat)
        print(f"feed-forward (projection, GEGLU, projection): separate, or fused in blocks of {cpu_gemm.FF_ROWS} "
              "rows (bf16 weights)")
        for name, (rows, k, inner) in FEED_FORWARDS:
            x = mx.random.normal((rows, k), key=key)
            w1 = (mx.random.normal((2 * inner, k), key=key) * 0.05).astype(mx.bfloat16)
            b1 = mx.random.normal((2 * inner,), key=key).astype(mx.bfloat16)
            w2 = (mx.random.normal((k, inner), key=key) * 0.05).astype(mx.bfloat16)
            b2 = mx.random.normal((k,), key=key).astype(mx.bfloat16)
            mx.eval(x, w1, b1, w2, b2)
            report(name, 2 * rows * k * 3 * inner, {
                "separate": lambda: cpu_gemm.linear(geglu(cpu_gemm.linear(x, w1, b1)), w2, b2),
                "fused": lambda: cpu_gemm.feed_forward(x, w1, b1, w2, b2),
            }, args.repeat)

if __name__ == "__main__":
    main()
