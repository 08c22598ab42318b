"""The bf16 GEMM of each x86 class, forced on this machine where it runs here."""

from __future__ import annotations

import pytest

from mlx_sd.cpu import blas, gemm


@pytest.fixture(params=["auto", "mkl", "onednn"])
def each_bf16_gemm(request, monkeypatch) -> str:
    """A test run with each bf16 GEMM installed here (MKL's: the AMX class's; oneDNN's: the
    AVX-512 BF16 class's; `auto`: this processor's own choice), whatever this processor would
    choose, so each class's products are checked wherever they run."""
    if request.param != "auto" and request.param not in [g.value for g in blas.installed()]:
        pytest.skip(f"{request.param} is not installed")
    functions = blas.bound(request.param)
    if functions is None or functions.bf16 is None:
        pytest.skip(f"no bf16 GEMM from {request.param} here")
    monkeypatch.setattr(gemm, "gemm", lambda: functions)
    return request.param
