"""The shape of the generation engine the servicer calls (`mlx_sd.engine.create_engine` builds one)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from mlx_sd.events import GenerationResult, ProgressEvent
from mlx_sd.request import GenerationRequest

# generate(validated request, is_cancelled) yields ProgressEvents as stages finish, then one
# GenerationResult. It should poll is_cancelled between steps and stop early when it is true.
GenerationEngine = Callable[[GenerationRequest, Callable[[], bool]], Iterator[ProgressEvent | GenerationResult]]
