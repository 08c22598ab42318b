"""The one build step pyproject.toml cannot declare stably: the fused CPU kernels.

mlx_sd/models/cpu_kernels.c is a plain C library, loaded with ctypes (mlx_sd/models/cpu_kernels.py).
It is built like an extension module so that installing compiles it, and it is optional: without
a C compiler the install still succeeds and the CPU path uses MLX's slower ops.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "mlx_sd.models._cpu_kernels",
    sources=["mlx_sd/models/cpu_kernels.c", "mlx_sd/models/amx_attention.c"],
    depends=["mlx_sd/models/cpu_math.h"],
    # Finite math without signed zeros lets the exp clamps become min/max instructions; without
    # them GCC splits the clamped case into a speculative branch whose subnormal results cost
    # microcode assists (SiLU 9x slower). ISO C mode turns off fused multiply-adds, which the
    # polynomials need (softmax 1.6x slower). No reassociation: the exp's rounding trick needs it off.
    extra_compile_args=["-O3", "-std=c11", "-ffp-contract=fast", "-fopenmp-simd", "-fno-trapping-math",
                        "-ffinite-math-only", "-fno-signed-zeros"],
    optional=True,
)])
