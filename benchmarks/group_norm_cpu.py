"""`nn.GroupNorm` against mlx_sd's CPU GroupNorm, per SD-1.5 shape, interleaved in one run.

    .venv/bin/python benchmarks/group_norm_cpu.py [--repeat 7]

Shapes (NHWC, 32 groups): the VAE decoder's at 512² and the UNet's at 512² (batch 2 for CFG).
Each line gives both medians, old / new, and each one's max|difference| from a float64 reference.
"""

from __future__ import annotations

import argparse
import statistics
import time

from mlx_sd.cpu.runtime import configure

configure()

import mlx.core as mx  # noqa: E402  (after the BLAS is chosen)
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from mlx_sd.cpu.norms import GroupNorm  # noqa: E402

SHAPES = [
    (1, 512, 512, 128), (1, 256, 256, 256), (1, 128, 128, 512), (1, 64, 64, 512),
    (2, 64, 64, 320), (2, 32, 32, 640), (2, 16, 16, 1280), (2, 8, 8, 1280),
]
GROUPS = 32


def reference(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    b, c = x.shape[0], x.shape[-1]
    g = x.astype(np.float64).reshape(b, -1, GROUPS, c // GROUPS)
    g = (g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(g.var(axis=(1, 3), keepdims=True) + 1e-6)
    return g.reshape(x.shape) * weight + bias


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    mx.random.seed(0)
    for shape in SHAPES:
        old = nn.GroupNorm(GROUPS, shape[-1], eps=1e-6, pytorch_compatible=True)
        old.update({"weight": mx.random.normal((shape[-1],)), "bias": mx.random.normal((shape[-1],))})
        new = GroupNorm(GROUPS, shape[-1], eps=1e-6, pytorch_compatible=True)
        new.update(old.parameters())
        x = mx.random.normal(shape) * 2 + 0.5
        mx.eval(x, old.parameters())
        times: dict[str, list[float]] = {"old": [], "new": []}
        outputs = {}
        for _ in range(args.repeat):
            for name, module in (("old", old), ("new", new)):
                start = time.perf_counter()
                outputs[name] = module(x)
                mx.eval(outputs[name])
                times[name].append(time.perf_counter() - start)
        expected = reference(np.array(x), np.array(old.weight), np.array(old.bias))
        err = {name: float(np.abs(np.array(y) - expected).max()) for name, y in outputs.items()}
        t_old, t_new = statistics.median(times["old"]), statistics.median(times["new"])
        print(f"{str(shape):>20}: old {t_old * 1e3:8.2f} ms  new {t_new * 1e3:7.2f} ms  "
              f"old/new {t_old / t_new:5.2f}x  ({t_old / x.size * 1e9:5.2f} -> {t_new / x.size * 1e9:5.2f} ns/elem)"
              f"  max|err| old {err['old']:.1e} new {err['new']:.1e}", flush=True)


if __name__ == "__main__":
    main()
