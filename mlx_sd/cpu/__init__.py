"""The CPU backend: fused C kernels (kernels.c and its neighbours, loaded with ctypes by kernels.py)
and the fast BLAS's GEMMs (gemm.py) for MLX's CPU device, where MLX's own ops are slow.

The networks in mlx_sd.models are plain MLX; `accelerate(model)` (apply.py) swaps a loaded
network's layers and blocks for their forms here, and `ParallelTensorReader` (reader.py) reads
checkpoints on every core; mlx_sd.engine.backends decides whether they are used. runtime.py sets
up the process's native libraries (the BLAS MLX's CPU ops call, glibc's heap) before MLX loads,
which is why importing this package imports nothing.
"""
