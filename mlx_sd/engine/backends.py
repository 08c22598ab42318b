"""Which implementation runs the networks, chosen once per process and passed down.

- `Backend.MLX`: the plain networks on MLX's own ops, in their weights' dtype: what Metal runs.
- `Backend.CPU`: MLX's CPU device with the CPU kernels (mlx_sd.cpu): each loaded network goes
  through `mlx_sd.cpu.apply.accelerate`, activations are fp32 whatever the weights' dtype (MLX's fp16
  and bf16 CPU ops are slow; bf16 layers still take bf16 products), and checkpoints are read on
  every core.

The switch is the environment variable `MLX_SD_BACKEND`, read by `from_environment` where an
entry point or a model store starts: `auto` (the default: the CPU kernels where MLX computes on
the CPU and they were built, else MLX ops), `mlx` (MLX ops for the whole process, as on Metal:
how the tests check that path on Linux), or `cpu` (the kernels; an error where they cannot run).
mlx_sd.cpu.runtime, apart from this, picks the BLAS that MLX's CPU ops call on either backend.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Mapping
from typing import TypeVar

import mlx.core as mx
import mlx.nn as nn

from convert.assemble import ModelNetworks
from convert.reader import ReaderFactory, TensorReader
from mlx_sd.cpu.apply import accelerate, available
from mlx_sd.cpu.reader import ParallelTensorReader

ENV_VAR = "MLX_SD_BACKEND"
SETTINGS = ("auto", "mlx", "cpu")

M = TypeVar("M", bound=nn.Module)


class Backend(enum.Enum):
    MLX = "mlx"
    CPU = "cpu"

    def prepare(self, model: M) -> M:
        """A loaded (and quantized) network made ready to run here."""
        return accelerate(model) if self is Backend.CPU else model

    def prepare_models(self, models: ModelNetworks) -> ModelNetworks:
        """`prepare` for each network of a model."""
        return dataclasses.replace(models, **{n: self.prepare(network) for n, network in models.networks().items()})

    def activation_dtype(self, weights: mx.Dtype) -> mx.Dtype:
        """The dtype a network whose weights are `weights` is fed and computes in."""
        return mx.float32 if self is Backend.CPU else weights

    @property
    def reader(self) -> ReaderFactory:
        """The tensor reader that loads checkpoints here."""
        return ParallelTensorReader if self is Backend.CPU else TensorReader


def kernels_usable() -> bool:
    """Whether MLX computes on the CPU here and the CPU kernels were built."""
    return mx.default_device() == mx.cpu and available()


def choose(setting: str | Backend = "auto") -> Backend:
    """The backend for a setting: `auto`, `mlx`, `cpu` (or a Backend, returned as it is)."""
    if isinstance(setting, Backend):
        return setting
    if setting not in SETTINGS:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if setting == "mlx":
        return Backend.MLX
    usable = kernels_usable()
    if setting == "cpu" and not usable:
        raise ValueError("the CPU backend needs MLX's CPU device and the CPU kernels, built when mlx-sd is "
                         "installed with a C compiler")
    return Backend.CPU if usable else Backend.MLX


def from_environment(env: Mapping[str, str] = os.environ) -> Backend:
    """The backend `MLX_SD_BACKEND` asks for (`auto` when unset)."""
    return choose(env.get(ENV_VAR, "auto").strip().lower() or "auto")
