"""Which attention shapes MLX's fused Metal kernel (`mx.fast.scaled_dot_product_attention`) runs,
and the head sizes the networks' attention can be zero-padded to so that it does.

Elsewhere MLX computes the op unfused (matmul, softmax, matmul), which on a GPU writes the whole
queries x keys score matrix to memory. The rule is read from MLX's source,
mlx/backend/metal/scaled_dot_product_attention.cpp (`ScaledDotProductAttention::use_fallback`,
and after 0.32.1 also `has_fused_kernel`), at the tags v0.30.6, v0.31.2, v0.32.0, v0.32.1 and at
commit 846d176 (0.32.1 plus 26 commits): the GPU stream only, no training (gradient) trace, and

- more than 8 queries: the "full" kernel, for query and value heads of one size in
  FULL_HEAD_DIMS, with no mask, an array mask, or a causal one with no more queries than keys.
  From 0.32.1 the kernel also covers 72 and 96; 846d176 builds it for 192 and 256 as well but
  routes those shapes to the unfused path, which it finds faster there, so they are left out;
- at most 8 queries: the "vector" kernel, for heads in VECTOR_HEAD_DIMS, no more queries than
  keys, and queries x (query heads / key heads) at most 32 (always so here: every head has its
  own keys).

SD 1.x attends with heads of 40, 80 and 160 (the UNet's levels) and 512 (the VAE's one head),
SD 2.x and SDXL with 64, CLIP with 64: only 40 has a larger supported size (64) to be padded to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx

MAX_VECTOR_QUERIES = 8
VECTOR_HEAD_DIMS = (64, 96, 128, 256)
# (first MLX version, head sizes of the full kernel), newest first.
FULL_HEAD_DIMS: tuple[tuple[tuple[int, int, int], tuple[int, ...]], ...] = (
    ((0, 32, 1), (64, 72, 80, 96, 128)),
    ((0, 0, 0), (64, 80, 128)),
)
RULE_SOURCE = "MLX's Metal scaled_dot_product_attention.cpp, read at v0.30.6-v0.32.1 and 846d176"


@dataclass(frozen=True)
class AttentionCall:
    """One multi-head attention call: (batch, heads, queries, head_dim) attending to `keys` keys."""

    batch: int
    heads: int
    queries: int
    keys: int
    head_dim: int
    causal: bool = False


def version_tuple(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a version string such as "0.32.4" or "0.33.0.dev20260901"."""
    parts = [int("".join(c for c in part if c.isdigit()) or 0) for part in version.split(".")[:3]]
    return tuple((parts + [0, 0, 0])[:3])  # type: ignore[return-value]


def full_head_dims(version: str = mx.__version__) -> tuple[int, ...]:
    """The head sizes MLX `version`'s full (more than 8 queries) fused kernel runs."""
    number = version_tuple(version)
    return next(dims for first, dims in FULL_HEAD_DIMS if number >= first)


def supported_head_dims(queries: int, version: str = mx.__version__) -> tuple[int, ...]:
    """The head sizes of the fused kernel that attention with `queries` queries would use."""
    return VECTOR_HEAD_DIMS if queries <= MAX_VECTOR_QUERIES else full_head_dims(version)


def fallback_reason(call: AttentionCall, version: str = mx.__version__) -> str | None:
    """Why Metal would compute `call` unfused, or None where the fused kernel runs it."""
    dims = supported_head_dims(call.queries, version)
    kernel = "vector" if call.queries <= MAX_VECTOR_QUERIES else "full"
    if call.head_dim not in dims:
        return f"head size {call.head_dim} (the {kernel} kernel takes {', '.join(map(str, dims))})"
    if kernel == "vector" and call.queries > call.keys:
        return "more queries than keys"
    if kernel == "full" and call.causal and call.queries > call.keys:
        return "a causal mask with more queries than keys"
    return None


def padded_head_dim(call: AttentionCall, version: str = mx.__version__) -> int:
    """The smallest head size at least `call.head_dim` with which the fused kernel runs `call`;
    `call.head_dim` itself where it runs already or no padding makes it run."""
    if fallback_reason(call, version) is None:
        return call.head_dim
    larger = [d for d in supported_head_dims(call.queries, version) if d > call.head_dim]
    fused = [d for d in larger if fallback_reason(dataclasses.replace(call, head_dim=d), version) is None]
    return min(fused, default=call.head_dim)


_recorded: list[AttentionCall] | None = None


@contextmanager
def recording() -> Iterator[list[AttentionCall]]:
    """Collects the AttentionCall of each plain-MLX attention (mlx_sd.models.layers.attention) made
    in the block, from this thread's forward passes; they may stay lazy (never evaluated)."""
    global _recorded
    previous, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = previous


def record(call: AttentionCall) -> None:
    if _recorded is not None:
        _recorded.append(call)
