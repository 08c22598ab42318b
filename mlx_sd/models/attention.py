"""Scaled dot-product attention over (batch, heads, tokens, head_dim), in the fastest correct
form for the device.

On the GPU MLX's fused `mx.fast.scaled_dot_product_attention` is best. On the CPU that op
becomes matmul-softmax-matmul, and MLX's CPU `exp` is scalar (~12 ns per element here, 8x
numpy's vectorised one), so at 512² the softmax over 2x8 4096x4096 scores dominates the UNet.
The CPU form therefore evaluates its inputs and runs each (batch, head) slice through numpy,
in fp32, in cache-sized blocks of query rows, with the normalisation moved after the value
product (a tokens x head_dim division instead of tokens x tokens). About 2 MiB of scores are
alive per block, against 1 GiB for the whole batch at 512². The blocks are spread over the
cores, each thread's two GEMMs going to the fast BLAS on one thread (cpu_threads): 2x the
single-threaded form at 2x8x4096x40 (0.30 s against 0.60 s here). See benchmarks/attention_cpu.py.

The CPU form leaves MLX's lazy graph (it evaluates q, k and v), so it cannot be traced by
`mx.compile` or differentiated.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_sd.models import cpu_gemm, cpu_threads
from mlx_sd.models.cpu_buffers import new_array

# The CPU path computes scores in blocks of query rows of about BLOCK_SCORES floats (2 MiB),
# so that its max/subtract/exp/sum passes run in the L2 cache: 4x faster than whole 4096x4096
# slices here. Blocks under MIN_ROWS rows were slower again (per-call and BLAS overheads).
BLOCK_SCORES = 1 << 19
MIN_ROWS = 128


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, scores: np.ndarray, out: np.ndarray) -> None:
    """out = softmax(q kᵀ scale) v for one block of query rows, using `scores` as scratch."""
    cpu_gemm.matmul(q, k, scores, transpose_b=True, alpha=scale)
    scores -= scores.max(axis=-1, keepdims=True)  # weights <= 1: exp cannot overflow
    np.exp(scores, out=scores)
    cpu_gemm.matmul(scores, v, out)
    out /= scores.sum(axis=-1, keepdims=True)


def cpu_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, rows: int | None = None) -> mx.array:
    """softmax(q kᵀ scale) v in fp32 with numpy, in blocks of `rows` query rows of one (batch, head)
    slice (query rows are independent; by default about BLOCK_SCORES scores), spread over the cores."""
    b, h, n, d = q.shape
    qs, ks, vs = (np.ascontiguousarray(t.astype(mx.float32)).reshape(b * h, t.shape[2], d) for t in (q, k, v))
    keys = ks.shape[1]
    rows = rows or max(MIN_ROWS, BLOCK_SCORES // keys)
    result, out = new_array(qs.shape)
    blocks = [(i, start) for i in range(b * h) for start in range(0, n, rows)]

    def attend_blocks(first: int, last: int) -> None:
        scores = np.empty((rows, keys), np.float32)
        for i, start in blocks[first:last]:
            stop = min(start + rows, n)
            _attend(qs[i, start:stop], ks[i], vs[i], scale, scores[:stop - start], out[i, start:stop])

    cpu_threads.for_each_chunk(attend_blocks, len(blocks))
    return result.reshape(b, h, n, d).astype(q.dtype)


def scaled_dot_product_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    if mx.default_device() == mx.gpu:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    return cpu_attention(q, k, v, scale)
