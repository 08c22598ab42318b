"""The CPU backend: fused C kernels (kernels.c and its neighbours, loaded with ctypes by kernels.py)
and the fast BLAS's GEMMs (gemm.py) for MLX's CPU device, where MLX's own ops are slow.

The networks in mlx_sd.models are plain MLX; `accelerate(model)` (apply.py) swaps a loaded
network's layers and blocks for their forms here, and `ParallelTensorReader` (reader.py) reads
checkpoints on every core. mlx_sd.backends decides whether they are used.
"""

from mlx_sd.cpu.apply import accelerate, available

__all__ = ["accelerate", "available"]
