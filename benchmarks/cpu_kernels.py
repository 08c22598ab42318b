"""The fused C kernels (mlx_sd.cpu.kernels) against what they replaced, in one run.

    .venv/bin/python benchmarks/cpu_kernels.py [--repeat 20]

Each line runs one block of a kernel's typical SD-1.5 work on one thread (the process is pinned
to one core, so the kernels' pool has no other thread), interleaving the baseline (the numpy
formula, or MLX's own op, that the kernel replaced) with the kernel, and prints both medians,
the speed-up and the largest difference between their results.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

from mlx_sd.cpu.runtime import configure

configure()

import mlx.core as mx  # noqa: E402  (after the BLAS is chosen)
import numpy as np  # noqa: E402

from mlx_sd.cpu import kernels as cpu_kernels  # noqa: E402
from mlx_sd.cpu.blas import gemm  # noqa: E402

RNG = np.random.default_rng(0)


def normal(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def numpy_softmax_numerators(scores: np.ndarray) -> np.ndarray:
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    return scores.sum(axis=-1)


def numpy_gelu(x: np.ndarray) -> np.ndarray:
    """x Φ(x) with erf from Abramowitz & Stegun 7.1.26, in numpy passes (the previous CPU form)."""
    z = np.abs(x) * np.float32(1 / math.sqrt(2))
    t = 1 / (1 + np.float32(0.3275911) * z)
    poly = np.float32(1.061405429)
    for a in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        poly = poly * t + np.float32(a)
    q = np.float32(0.5) * poly * t * np.exp(-z * z)
    return np.where(x >= 0, x - x * q, x * q)


def numpy_silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x / (1 + np.exp(-x))


def numpy_moments(x: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dev = x - shift
    return np.einsum("nc->c", dev).astype(np.float64), np.einsum("nc,nc->c", dev, dev).astype(np.float64)


def kernel(fn: Callable[..., None], *args) -> Callable[[], np.ndarray]:
    """A call of a kernel that writes its last argument, returning that."""
    return lambda: fn(*args) or args[-1]


def cases() -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    scores = normal(128, 4096, scale=4)  # one attention block at 512²: 128 query rows, 4096 keys
    gates = normal(1024, 2 * 1280, scale=2)  # GEGLU input rows at 1280 channels
    x = normal(4096, 320, scale=2)  # UNet activations at 64², 320 channels
    scale, offset = normal(320), normal(320)
    image = normal(512 * 8, 128, scale=2) + 1  # a block of the VAE's 512² x 128 GroupNorm input
    shift = image[::512].mean(axis=0)
    weight, bias = normal(320), normal(320)
    tokens = mx.array(x)
    bits = np.empty(x.shape, np.uint16)
    return {
        "softmax numerators 128x4096 (numpy passes)": (
            lambda: numpy_softmax_numerators(scores.copy()),
            lambda: cpu_kernels.softmax_numerators(scores.copy())),
        "GEGLU 1024x1280 (numpy passes)": (
            lambda: gates[:, :1280] * numpy_gelu(gates[:, 1280:]),
            kernel(cpu_kernels.geglu, gates, np.empty((1024, 1280), np.float32))),
        "SiLU 4096x320 (numpy passes)": (
            lambda: numpy_silu(x),
            kernel(cpu_kernels.sigmoid_gate, x, 1.0, np.empty_like(x))),
        "GroupNorm apply + SiLU 4096x320 (numpy passes)": (
            lambda: numpy_silu(x * scale + offset),
            kernel(cpu_kernels.scale_shift, x[None], scale[None], offset[None], True, np.empty_like(x)[None])),
        "GroupNorm moments 4096x128 (numpy einsum)": (
            lambda: numpy_moments(image, shift),
            lambda: tuple(sums[0] for sums in cpu_kernels.channel_moments(image[None], shift[None]))),
        "LayerNorm 4096x320 (mx.fast.layer_norm)": (
            lambda: np.array(mx.fast.layer_norm(tokens, mx.array(weight), mx.array(bias), 1e-5)),
            kernel(cpu_kernels.layer_norm, x, weight, bias, 1e-5, np.empty_like(x))),
        "fp32 to bf16 4096x320 (MLX astype)": (
            lambda: np.array(tokens.astype(mx.bfloat16).view(mx.uint16)),
            kernel(cpu_kernels.to_bf16, x, bits)),
    }


def largest_difference(a: object, b: object) -> float:
    pairs = zip(a, b) if isinstance(a, tuple) else [(a, b)]
    return max(float(np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).max()) for p, q in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):  # before the kernels load and size their pool
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    if cpu_kernels.kernels() is None:
        raise SystemExit("the CPU kernels are not built here")
    if gemm() is not None:
        gemm().one_thread()  # one thread, as each pool thread runs them
    print(f"{'kernel (baseline)':<50} {'baseline':>10} {'kernel':>10} {'speed-up':>9}  max|diff|")
    for name, (baseline, fused) in cases().items():
        times: dict[str, list[float]] = {"baseline": [], "kernel": []}
        results = {}
        for _ in range(args.repeat):
            for side, fn in (("baseline", baseline), ("kernel", fused)):
                start = time.perf_counter()
                results[side] = fn()
                times[side].append(time.perf_counter() - start)
        old, new = (statistics.median(times[side]) for side in ("baseline", "kernel"))
        diff = largest_difference(results["baseline"], results["kernel"])
        print(f"{name:<50} {old * 1e3:8.3f}ms {new * 1e3:8.3f}ms {old / new:8.1f}x  {diff:.1e}")


if __name__ == "__main__":
    main()
