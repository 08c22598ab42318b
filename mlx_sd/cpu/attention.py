"""Multi-head scaled dot-product attention over token-major projections on the CPU kernels.

On the GPU MLX's fused `mx.fast.scaled_dot_product_attention` is best. On the CPU that op
becomes matmul-softmax-matmul, and MLX's CPU `exp` is scalar (~12 ns per element here), so at
512² the softmax over 2x8 4096x4096 scores dominates the UNet. The CPU form therefore
evaluates its inputs and runs each (batch, head) slice in fp32, straight from and to the
projections' token-major layout, in blocks of query rows: the scores from the fast BLAS, their
exponentials and row sums from one fused kernel (kernels.py), and the normalisation moved
after the value product (a tokens x head_dim division instead of tokens x tokens). About
8 MiB of scores are alive per thread, against 1 GiB for the whole batch at 512². The blocks
are spread over the cores, each thread's two GEMMs going to the fast BLAS on one thread
(threads.py). See benchmarks/attention_cpu.py.

bf16 models on processors with AMX (Intel Sapphire Rapids and later) take a fused kernel instead
(amx_attention.c): each head's 32-row blocks of scores, weights and values stay in the L2 cache,
both products run on the AMX tiles in bf16 with fp32 sums, as torch's bf16 attention computes
them. 2x8x4096x40 (benchmarks/attention_cpu.py): 0.08-0.09 s against 0.18-0.20 s for the BLAS
form with a bf16 value product (scores then fp32), and 0.087 s for torch's bf16 flash attention on the
same two cores.

The CPU form leaves MLX's lazy graph (it evaluates q, k and v), so it cannot be traced by
`mx.compile` or differentiated.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_sd.cpu import gemm, kernels, threads
from mlx_sd.cpu.buffers import as_fp32, new_array

# The CPU path computes scores in blocks of query rows of about BLOCK_SCORES floats (8 MiB: 512
# rows of 4096 keys), which bounds the scratch per thread. Smaller blocks kept the scores in the
# L2 cache but paid more per-block call overhead: at 2x8x4096x40, 128 rows took 0.20 s, 512
# rows 0.16 s (bf16 value product). Blocks under MIN_ROWS rows were slower again.
BLOCK_SCORES = 1 << 21
MIN_ROWS = 128
# What a causal mask puts in place of a later key's score: finite (the kernels assume finite
# math), and its weight e^-87 ~ 1.6e-38 is far below any sum it joins.
MASKED = np.float32(-1e30)


def _slices(batch: int, heads: int, n: int, rows: int) -> list[tuple[int, int, int]]:
    """(batch index, head, first query) of each run of `rows` query rows of each head."""
    return [(i, head, start) for i in range(batch) for head in range(heads) for start in range(0, n, rows)]


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, scores: np.ndarray,
            bf16_scores: np.ndarray | None, values: np.ndarray, out: np.ndarray,
            first_query: int | None) -> None:
    """out = softmax(q kᵀ scale) v for one block of query rows, using `scores` and `values`
    (rows, head_dim) as scratch; with `bf16_scores` (scratch of uint16 bits), both products are
    bf16 and q, k and v hold bf16 bits. With `first_query`, the block's row r is query first_query + r and
    sees only the keys up to that one (a causal mask). q, k and v are contiguous: the BLAS reads
    strided heads about 30% slower, more than the copies cost."""
    gemm.matmul(q, k, scores, transpose_b=True, alpha=scale)
    if first_query is not None:
        queries = np.arange(first_query, first_query + len(scores))
        np.copyto(scores, MASKED, where=np.arange(scores.shape[1]) > queries[:, None])
    sums = kernels.softmax_numerators(scores, bf16_scores)
    gemm.matmul(scores if bf16_scores is None else bf16_scores, v, values)
    np.divide(values, sums[:, None], out=out)


def attention(q: mx.array, k: mx.array, v: mx.array, heads: int, scale: float, rows: int | None = None,
              bf16_products: bool = False, causal: bool = False) -> mx.array:
    """Multi-head softmax(q kᵀ scale) v on the CPU kernels, for token-major projections q
    (batch, tokens, heads * head_dim) and k, v (batch, keys, heads * head_dim); the result has
    q's layout, the one the output projection reads (no head transposes: each block copies its
    head's columns to and from small scratch arrays), in blocks of `rows` query rows (query rows are
    independent; by default about BLOCK_SCORES scores), spread over the cores. fp32
    throughout, except that with `bf16_products` (which needs a bf16 GEMM: `gemm().bf16`) both
    products are bf16 with fp32 sums, as in torch's bf16 attention and the AMX kernel: q and k are
    rounded to bf16 for the scores, the softmax weights and v for the value product (sums and
    the normalisation stay fp32). Where AMX is, `bf16_products` instead selects the fused AMX
    kernel, with the same roundings. `causal` lets query i see keys 0..i only (CLIP's text encoder)."""
    batch, n, width = q.shape
    d = width // heads
    qs, ks, vs = (as_fp32(t) for t in (q, k, v))
    if bf16_products and kernels.amx_ready():
        result = _amx_attention(qs, ks, vs, heads, scale, causal)
        return result if q.dtype == mx.float32 else result.astype(q.dtype)
    if bf16_products:
        # oneDNN's bf16 GEMM takes the scores (512x4096x40) in 0.41x the time of MKL's fp32.
        qs, ks, vs = (gemm.bf16_bits(t) for t in (qs, ks, vs))
    keys = ks.shape[1]
    rows = rows or max(MIN_ROWS, BLOCK_SCORES // keys)
    result, out = new_array(qs.shape)
    blocks = _slices(batch, heads, n, rows)

    def attend_blocks(first: int, last: int) -> None:
        scores = np.empty((rows, keys), np.float32)
        bf16_scores = np.empty((rows, keys), np.uint16) if bf16_products else None
        values = np.empty((rows, d), np.float32)
        head_keys, head_values, current = np.empty((keys, d), ks.dtype), np.empty((keys, d), vs.dtype), None
        for i, head, start in blocks[first:last]:
            count, columns = min(start + rows, n) - start, slice(head * d, (head + 1) * d)
            if current != (i, head):
                current = (i, head)
                head_keys[...], head_values[...] = ks[i, :, columns], vs[i, :, columns]
            _attend(np.ascontiguousarray(qs[i, start:start + count, columns]), head_keys, head_values, scale,
                    scores[:count], None if bf16_scores is None else bf16_scores[:count], values[:count],
                    out[i, start:start + count, columns], start if causal else None)

    threads.for_each_chunk(attend_blocks, len(blocks))
    return result if q.dtype == mx.float32 else result.astype(q.dtype)


def _amx_attention(qs: np.ndarray, ks: np.ndarray, vs: np.ndarray, heads: int, scale: float,
                   causal: bool) -> mx.array:
    """attention's form on AMX: one kernel call, each head (or run of a head's query rows,
    where there are fewer heads than cores: the VAE's single head) a job on the kernels' pool."""
    result, out = new_array(qs.shape)
    kernels.amx_attention(qs, ks, vs, heads, scale, causal, out)
    return result

