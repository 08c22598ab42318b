"""The generation engine the servicer calls, and the stand-in used until the pipeline lands."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from mlx_sd.errors import ModelNotFound, Unimplemented
from mlx_sd.events import GenerationResult, ProgressEvent
from mlx_sd.request import GenerationRequest

# generate(validated request, is_cancelled) yields ProgressEvents as stages finish, then one
# GenerationResult. It should poll is_cancelled between steps and stop early when it is true.
GenerationEngine = Callable[[GenerationRequest, Callable[[], bool]], Iterator[ProgressEvent | GenerationResult]]

REQUIRED_MODEL_FILES = ("stable-diffusion/model.safetensors",)


class PipelineUnavailable:
    """Checks for the model files the pipeline will need, then reports that it is not built in."""

    def __init__(self, models_dir: Path) -> None:
        self._models_dir = models_dir

    def __call__(
        self, request: GenerationRequest, is_cancelled: Callable[[], bool]
    ) -> Iterator[ProgressEvent | GenerationResult]:
        for name in REQUIRED_MODEL_FILES:
            if not (self._models_dir / name).is_file():
                raise ModelNotFound(name, "model file not found in the model directory")
        raise Unimplemented("the generation pipeline is not available in this build")
