"""Which GEMM computes bf16 products on this processor, and whether bf16 is then the faster dtype:
one decision per x86 class, made at run time from the CPU flags and what is installed, and logged.

Measured one thread against one thread at SD-1.5's GEMM shapes (benchmarks/gemm_libraries.py,
results in benchmarks/results/2026-12-07-amd-epyc-zen4.md), as time against MKL's fp32 GEMM:

- AMX (Intel Sapphire Rapids and later): MKL's `cblas_gemm_bf16bf16f32` runs on the tiles, 3-5x
  faster than fp32; bf16 is the faster dtype (measured on a Xeon, benchmarks/README.md).
- AVX-512 BF16 without AMX (AMD Zen 4 and later, Intel Cooper Lake): oneDNN's
  `dnnl_gemm_bf16bf16f32` (`vdpbf16ps`) takes 0.30-0.52x the time, and its direct
  convolution (onednn.py) computes the larger bf16 convolutions; MKL's bf16 GEMM takes
  0.94-1.83x (a slow path on AMD), so MKL's is never used here, and without oneDNN bf16 weights
  are computed in fp32 and fp32 is the faster dtype.
- AVX-512 without BF16 (Skylake-X to Ice Lake, Zen 3 is AVX2): oneDNN emulates bf16 (2.1-3.3x),
  MKL's is 0.95-1.30x: bf16 weights are computed in fp32; fp32 is the faster dtype.
- AVX2 only, or less: the same.

Where AMX is needed (MKL's bf16 on AMX, the fused AMX attention) the path is entered only when
the flags say the tiles exist (and amx_attention.c asks the kernel for them), so a processor
without them takes the fallback; tests feed this module fake flag sets.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Set
from dataclasses import dataclass


class CpuClass(enum.Enum):
    AMX = "AMX"
    AVX512_BF16 = "AVX-512 BF16"
    AVX512 = "AVX-512"
    AVX2 = "AVX2"
    BASELINE = "x86-64 baseline"


def cpu_class(flags: Set[str]) -> CpuClass:
    """The class of a processor with these /proc/cpuinfo flags."""
    if {"amx_bf16", "amx_tile"} <= flags:
        return CpuClass.AMX
    if "avx512f" in flags and "avx512_bf16" in flags:
        return CpuClass.AVX512_BF16
    if "avx512f" in flags:
        return CpuClass.AVX512
    if "avx2" in flags and "fma" in flags:
        return CpuClass.AVX2
    return CpuClass.BASELINE


class Bf16Gemm(enum.Enum):
    MKL = "mkl"  # cblas_gemm_bf16bf16f32
    ONEDNN = "onednn"  # dnnl_gemm_bf16bf16f32


# MLX_SD_BF16_GEMM: `auto` (the choice below), a Bf16Gemm value to force one where it is
# installed (for benchmarks: forcing does not make it faster), or `none` (bf16 weights computed in fp32).
ENV_VAR = "MLX_SD_BF16_GEMM"
SETTINGS = ("auto", "none", *(g.value for g in Bf16Gemm))


@dataclass(frozen=True)
class Choice:
    """What computes bf16 products here (None: bf16 weights are widened and computed in fp32),
    the faster dtype for a model here, and why."""

    cpu: CpuClass
    bf16_gemm: Bf16Gemm | None
    reason: str

    @property
    def faster_dtype(self) -> str:
        """bfloat16 where this class's preferred bf16 GEMM computes the products, else float32."""
        return "bfloat16" if self.bf16_gemm in PREFERENCE.get(self.cpu, ()) else "float32"

    def without(self, reason: str) -> Choice:
        """This choice where its bf16 GEMM cannot be used, for `reason`."""
        return Choice(self.cpu, None, reason)

    def describe(self) -> str:
        gemm = f"bf16 products on {self.bf16_gemm.value}" if self.bf16_gemm else "bf16 weights computed in fp32"
        return f"CPU class {self.cpu.value}: {gemm}, faster dtype {self.faster_dtype} ({self.reason})"


# Where each class gets its bf16 products, in order of preference; classes absent have none.
PREFERENCE: dict[CpuClass, tuple[Bf16Gemm, ...]] = {
    CpuClass.AMX: (Bf16Gemm.MKL, Bf16Gemm.ONEDNN),
    CpuClass.AVX512_BF16: (Bf16Gemm.ONEDNN,),
}
WHY = {
    CpuClass.AMX: "AMX tiles: bf16 GEMMs 3-5x faster than fp32",
    CpuClass.AVX512_BF16: "AVX-512 BF16: oneDNN's bf16 GEMM 2-3x faster than fp32; MKL's is not faster here",
    CpuClass.AVX512: "no bf16 units: every bf16 GEMM measured was slower than fp32",
    CpuClass.AVX2: "no bf16 units: every bf16 GEMM measured was slower than fp32",
    CpuClass.BASELINE: "no bf16 units",
}


def choose(flags: Set[str], installed: Iterable[Bf16Gemm], setting: str = "auto") -> Choice:
    """The bf16 GEMM for a processor with `flags`, among the `installed` ones, under an
    MLX_SD_BF16_GEMM `setting`."""
    if setting not in SETTINGS:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(SETTINGS)}, got {setting!r}")
    cpu, installed = cpu_class(flags), list(installed)
    if setting == "none":
        return Choice(cpu, None, f"{ENV_VAR}=none")
    if setting != "auto":
        forced = Bf16Gemm(setting)
        if forced not in installed:
            raise ValueError(f"{ENV_VAR}={setting}: not installed (found: {[g.value for g in installed] or 'none'})")
        return Choice(cpu, forced, f"forced by {ENV_VAR}")
    usable = [g for g in PREFERENCE.get(cpu, ()) if g in installed]
    if usable:
        return Choice(cpu, usable[0], WHY[cpu])
    if cpu in PREFERENCE:
        wanted = " or ".join(g.value for g in PREFERENCE[cpu])
        return Choice(cpu, None, f"{WHY[cpu]}; {wanted} is not installed")
    return Choice(cpu, None, WHY[cpu])
