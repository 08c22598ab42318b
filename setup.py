"""The build steps pyproject.toml cannot declare stably: the CPU path's compiled helpers.

- mlx_sd/cpu/kernels.c (with amx_attention.c, pool.c and layers.c) is a plain C library, loaded
  with ctypes (mlx_sd/cpu/kernels.py).
- mlx_sd/cpu/uninitialized.cpp is a C++ extension module built against MLX's headers and
  nanobind (both build requirements on Linux), which makes MLX arrays without filling them
  (mlx_sd/cpu/buffers.py).

Both are optional: without a compiler, or without MLX's headers, the install still succeeds and
the networks run on MLX's slower ops (mlx_sd.engine.backends) or the CPU kernels fill zeroed arrays.
"""

import importlib.util
from pathlib import Path

from setuptools import Extension, setup


def _uninitialized_arrays() -> list[Extension]:
    """The C++ extension, where the build environment has MLX (with its headers) and nanobind."""
    try:
        import nanobind
        core = importlib.util.find_spec("mlx.core")
    except ImportError:
        return []
    mlx_root = Path(core.origin).parent if core and core.origin else None
    if mlx_root is None or not (mlx_root / "include" / "mlx" / "array.h").exists():
        return []
    nanobind_root = Path(nanobind.include_dir()).parent
    return [Extension(
        "mlx_sd.cpu._uninitialized",
        sources=["mlx_sd/cpu/uninitialized.cpp", str(nanobind_root / "src" / "nb_combined.cpp")],
        include_dirs=[nanobind.include_dir(), str(nanobind_root / "ext" / "robin_map" / "include"),
                      str(mlx_root / "include")],
        # MLX's Python module registers its types in nanobind's "mlx" domain; sharing it is what
        # lets this module return `mlx.core.array`s.
        define_macros=[("NB_DOMAIN", "mlx"), ("NDEBUG", None)],
        extra_compile_args=["-O2", "-std=c++20", "-fvisibility=hidden"],
        # No rpath: libmlx.so (its soname) is already loaded by `import mlx.core` when this is imported.
        library_dirs=[str(mlx_root / "lib")],
        libraries=["mlx"],
        language="c++",
        optional=True,
    )]


setup(ext_modules=[Extension(
    "mlx_sd.cpu._kernels",
    sources=["mlx_sd/cpu/kernels.c", "mlx_sd/cpu/amx_attention.c", "mlx_sd/cpu/pool.c", "mlx_sd/cpu/layers.c"],
    depends=["mlx_sd/cpu/vector_math.h", "mlx_sd/cpu/pool.h", "mlx_sd/cpu/kernels.h"],
    # Finite math without signed zeros lets the exp clamps become min/max instructions; without
    # them GCC splits the clamped case into a speculative branch whose subnormal results cost
    # microcode assists (SiLU 9x slower). ISO C mode turns off fused multiply-adds, which the
    # polynomials need (softmax 1.6x slower). No reassociation: the exp's rounding trick needs it off.
    extra_compile_args=["-O3", "-std=c11", "-ffp-contract=fast", "-fopenmp-simd", "-fno-trapping-math",
                        "-ffinite-math-only", "-fno-signed-zeros"],
    optional=True,
), *_uninitialized_arrays()])
