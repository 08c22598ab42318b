"""The generation engine's contract, and the real engine: the pipeline on its own MLX thread.

The servers and the CLI depend on `Engine` alone; this module imports MLX only when
`create_engine` runs, so that importing the contract stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mlx_sd.engine.events import GenerationResult, ProgressEvent
from mlx_sd.engine.request import GenerationRequest

if TYPE_CHECKING:
    import mlx.core as mx

    from mlx_sd.engine.backends import Backend

DEFAULT_MAX_QUEUED = 8


class Engine(Protocol):
    """What the servers and the CLI need of the engine."""

    def __call__(self, request: GenerationRequest,
                 is_cancelled: Callable[[], bool] = ...) -> Iterator[ProgressEvent | GenerationResult]:
        """Queues a validated request; iterating yields its ProgressEvents as stages finish, then one
        GenerationResult. The run stops within a sampling step once `is_cancelled()` is true or the
        iterator is closed. Raises QueueFull when too many requests wait, ShuttingDown after shutdown."""
        ...

    def shutdown(self, grace: float, timeout: float | None = None) -> bool:
        """Stops taking work: queued requests end at once with ShuttingDown, the running one gets
        `grace` seconds before it is cancelled too. Waits up to `timeout` more seconds for the engine
        to stop; returns whether it did."""
        ...


def create_engine(models_dir: Path, *, cache_dir: Path | None = None, dtype: mx.Dtype | str | None = None,
                  quantize_bits: int | None = None, max_queued: int = DEFAULT_MAX_QUEUED,
                  memory_budget: int | None = None, low_memory: bool = False,
                  backend: Backend | str | None = None, pad_attention_heads: bool = False,
                  prediction_type: str = "auto") -> Engine:
    """A worker running the pipeline over `models_dir`.

    Converted weights are cached in `cache_dir` (none when None); `quantize_bits` (4 or 8) quantizes
    the UNet's and text encoder's linear layers after loading. Memory MLX kept for reuse is
    handed back after every job, so an idle server holds only the loaded model. Requests that do not
    fit in `memory_budget` bytes (default: `default_budget()`) are refused before they start.
    `low_memory` frees the text encoder between prompt encodings (see `ModelStore`). `backend` runs
    the networks (mlx_sd.engine.backends; default: `MLX_SD_BACKEND`). `pad_attention_heads`: see `ModelStore`.
    `prediction_type` is what the UNets predict ("auto": decided per model, mlx_sd.engine.prediction).
    """
    import mlx.core as mx

    from mlx_sd.cpu.runtime import release_memory
    from mlx_sd.engine.memory_budget import MemoryBudget, default_budget
    from mlx_sd.engine.model_store import ModelStore
    from mlx_sd.engine.pipeline import Pipeline
    from mlx_sd.engine.worker import GenerationWorker

    store = ModelStore(models_dir, dtype=dtype, cache_dir=cache_dir, quantize_bits=quantize_bits,
                       low_memory=low_memory, backend=backend, pad_attention_heads=pad_attention_heads,
                       prediction_type=prediction_type)
    budget = MemoryBudget(memory_budget) if memory_budget else default_budget()
    # MLX streams belong to the thread that made them; unless that thread destroys them as it ends
    # (after shutdown), the process aborts at exit with "terminate called without an active exception".
    return GenerationWorker(Pipeline(store, budget), max_queued=max_queued, after_job=release_memory,
                            on_exit=mx.clear_streams)
