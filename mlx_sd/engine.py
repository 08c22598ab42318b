"""The generation engine a front door (server or CLI) drives: the pipeline on its own MLX thread."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from mlx_sd.backend import trim_heap
from mlx_sd.backends import Backend
from mlx_sd.memory_budget import MemoryBudget, default_budget_bytes
from mlx_sd.model_store import ModelStore
from mlx_sd.pipeline import Pipeline
from mlx_sd.worker import GenerationWorker

DEFAULT_MAX_QUEUED = 8


def create_engine(models_dir: Path, *, cache_dir: Path | None = None, dtype: mx.Dtype | str | None = None,
                  quantize_bits: int | None = None, max_queued: int = DEFAULT_MAX_QUEUED,
                  memory_budget: int | None = None, low_memory: bool = False,
                  backend: Backend | str | None = None) -> GenerationWorker:
    """A worker running the pipeline over `models_dir`; calling it yields a request's events.

    Converted weights are cached in `cache_dir` (none when None); `quantize_bits` (4 or 8) quantizes
    the UNet's and text encoder's linear layers after loading. Memory MLX kept for reuse is
    handed back after every job, so an idle server holds only the loaded model. Requests that do not
    fit in `memory_budget` bytes (default: `default_budget_bytes()`) are refused before they start.
    `low_memory` frees the text encoder between prompt encodings (see `ModelStore`). `backend` runs
    the networks (mlx_sd.backends; default: `MLX_SD_BACKEND`).
    """
    store = ModelStore(models_dir, dtype=dtype, cache_dir=cache_dir, quantize_bits=quantize_bits,
                       low_memory=low_memory, backend=backend)
    budget = MemoryBudget(memory_budget or default_budget_bytes())
    # MLX streams belong to the thread that made them; unless that thread destroys them as it ends
    # (after close()), the process aborts at exit with "terminate called without an active exception".
    return GenerationWorker(Pipeline(store, budget), max_queued=max_queued, after_job=_release_memory,
                            on_exit=mx.clear_streams)


def _release_memory() -> None:
    mx.clear_cache()
    trim_heap()
