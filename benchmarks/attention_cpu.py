"""Self-attention formulations on MLX's CPU backend, side by side in one run.

    .venv/bin/python benchmarks/attention_cpu.py [--tokens 4096] [--repeat 3]

Shape: SD-1.5's largest attention, batch 2 (CFG) x 8 heads x 4096 tokens (512² image) x 40.
On CPU each MLX op runs on one thread (the BLAS excepted) and its `exp` is scalar, so the
softmax over the 4096x4096 scores dominates. Each variant is checked against float64 numpy.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from mlx_sd.cpu.runtime import configure

configure()

import mlx.core as mx  # noqa: E402  (after the BLAS is chosen)
import numpy as np  # noqa: E402

from mlx_sd.cpu import attention as attn  # noqa: E402
from mlx_sd.cpu import kernels as cpu_kernels  # noqa: E402
from mlx_sd.cpu.blas import gemm  # noqa: E402

Fn = Callable[[mx.array, mx.array, mx.array, float], mx.array]


def softmax_precise(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    return mx.softmax((q * scale) @ k.swapaxes(-1, -2), axis=-1, precise=True) @ v


def deferred_normalisation(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    scores = (q * scale) @ k.swapaxes(-1, -2)
    weights = mx.exp(scores - scores.max(axis=-1, keepdims=True))
    return (weights @ v) / weights.sum(axis=-1, keepdims=True)


VARIANTS: dict[str, Fn] = {
    "mx.fast.sdpa (reference)": lambda q, k, v, s: mx.fast.scaled_dot_product_attention(q, k, v, scale=s),
    "matmul-softmax(precise)-matmul": softmax_precise,
    "deferred normalisation (MLX)": deferred_normalisation,
    "sdpa, one head at a time": lambda q, k, v, s: mx.concatenate(
        [mx.fast.scaled_dot_product_attention(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], scale=s)
         for i in range(q.shape[1])], axis=1),
}


def ours(bf16_products: bool, amx: bool = False) -> Fn:
    """mlx_sd's CPU form. It takes and gives the models' token-major projections (batch, tokens,
    heads * dim); the conversions from and to the layout above are views until the timed
    evaluation, which copies the three inputs (as the models never need to). `amx` selects the
    fused AMX kernel that bf16 models get where the processor has it; otherwise the BLAS form."""

    def run(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        b, h, n, d = q.shape
        tokens = [t.transpose(0, 2, 1, 3).reshape(b, t.shape[2], h * d) for t in (q, k, v)]
        if amx:
            mx.eval(tokens)
            out = attn._amx_attention(*(np.asarray(t) for t in tokens), h, scale, causal=False)
        else:
            available, cpu_kernels.amx_ready = cpu_kernels.amx_ready, lambda: False
            try:
                out = attn.attention(*tokens, h, scale, bf16_products=bf16_products)
            finally:
                cpu_kernels.amx_ready = available
        return out.reshape(b, n, h, d).transpose(0, 2, 1, 3)

    return run


VARIANTS["blocks of query rows, fused softmax (ours)"] = ours(False)
if gemm() is not None and gemm().bf16 is not None:
    VARIANTS["the same, bf16 products (bf16 models)"] = ours(True)
if cpu_kernels.amx_ready():
    VARIANTS["fused AMX kernel, bf16 products (bf16 models)"] = ours(True, amx=True)


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k.astype(np.float64)) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), v.astype(np.float64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--context", type=int, help="key/value tokens (default: self-attention)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (2, 8, args.tokens, 40)
    kv_shape = (2, 8, args.context or args.tokens, 40)
    # Activations with SD-like spread: logits of a few tens, so the max subtraction matters.
    q_np, k_np, v_np = (rng.standard_normal(s, dtype=np.float32) * 2 for s in (shape, kv_shape, kv_shape))
    q, k, v = mx.array(q_np), mx.array(k_np), mx.array(v_np)
    scale = 40**-0.5
    expected = reference(q_np[:1, :2], k_np[:1, :2], v_np[:1, :2], scale)
    base = None
    for name, fn in VARIANTS.items():
        out = fn(q, k, v, scale)
        mx.eval(out)
        err = float(np.abs(np.array(out[:1, :2]) - expected).max())
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            mx.eval(fn(q, k, v, scale))
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        base = base or median
        print(f"{name:>44}: {median:6.3f} s  ({median / base:.2f}x ref; runs {', '.join(f'{t:.2f}' for t in times)})"
              f"  max|err| {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
