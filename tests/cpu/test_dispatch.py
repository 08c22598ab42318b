"""The per-class choice of the bf16 GEMM (mlx_sd.cpu.dispatch), fed the flag sets of each x86
class, and the fallbacks that keep a processor out of paths it lacks the instructions for."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from mlx_sd.cpu import apply, blas, gemm, kernels, onednn
from mlx_sd.cpu.dispatch import Bf16Gemm, CpuClass, choose, cpu_class

BASE = {"sse2", "avx", "avx2", "fma"}
SAPPHIRE_RAPIDS = BASE | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}
ZEN4 = BASE | {"avx512f", "avx512_bf16", "avx512_vnni"}
SKYLAKE_X = BASE | {"avx512f", "avx512_vnni"}
HASWELL = BASE
BOTH = [Bf16Gemm.MKL, Bf16Gemm.ONEDNN]


@pytest.mark.parametrize(("flags", "expected"), [
    (SAPPHIRE_RAPIDS, CpuClass.AMX), (ZEN4, CpuClass.AVX512_BF16), (SKYLAKE_X, CpuClass.AVX512),
    (HASWELL, CpuClass.AVX2), ({"sse2", "avx"}, CpuClass.BASELINE),
    # AMX's tiles without its bf16 products are no AMX class
    (ZEN4 | {"amx_tile"}, CpuClass.AVX512_BF16),
])
def test_each_flag_set_is_its_class(flags: set[str], expected: CpuClass) -> None:
    assert cpu_class(flags) is expected


@pytest.mark.parametrize(("flags", "installed", "gemm", "dtype"), [
    (SAPPHIRE_RAPIDS, BOTH, Bf16Gemm.MKL, "bfloat16"),  # today's AMX results
    (SAPPHIRE_RAPIDS, [Bf16Gemm.ONEDNN], Bf16Gemm.ONEDNN, "bfloat16"),
    (ZEN4, BOTH, Bf16Gemm.ONEDNN, "bfloat16"),
    (ZEN4, [Bf16Gemm.MKL], None, "float32"),  # MKL's bf16 is slower than fp32 there
    (SKYLAKE_X, BOTH, None, "float32"),  # no bf16 units: emulated bf16 is slower
    (HASWELL, BOTH, None, "float32"),
    ({"sse2"}, BOTH, None, "float32"),
])
def test_the_bf16_gemm_and_faster_dtype_per_class(flags, installed, gemm, dtype) -> None:
    choice = choose(flags, installed)
    assert choice.bf16_gemm is gemm and choice.faster_dtype == dtype
    assert choice.cpu.value in choice.describe() and choice.reason in choice.describe()


def test_a_missing_library_is_named_in_the_reason() -> None:
    assert "onednn is not installed" in choose(ZEN4, [Bf16Gemm.MKL]).reason


def test_forcing_a_gemm_keeps_the_class_s_faster_dtype() -> None:
    forced = choose(ZEN4, BOTH, "mkl")
    assert forced.bf16_gemm is Bf16Gemm.MKL and forced.faster_dtype == "float32"
    assert choose(SKYLAKE_X, BOTH, "onednn").faster_dtype == "float32"
    assert choose(ZEN4, BOTH, "none").bf16_gemm is None


def test_forcing_a_missing_gemm_or_an_unknown_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="not installed"):
        choose(ZEN4, [Bf16Gemm.MKL], "onednn")
    with pytest.raises(ValueError, match="MLX_SD_BF16_GEMM"):
        choose(ZEN4, BOTH, "fastest")


needs_kernels = pytest.mark.skipif(kernels.kernels() is None, reason="the CPU kernels are not built")


@needs_kernels
def test_the_kernels_report_the_class_the_processor_runs() -> None:
    """CPUID as the kernels see it names one class, and the instructions it implies are there:
    a GEMM on this processor's choice computes."""
    flags = kernels.cpu_flags()
    assert flags is not None and cpu_class(flags) in CpuClass
    assert flags <= {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    if "avx512f" in flags:
        assert "avx2" in flags


@needs_kernels
@pytest.mark.skipif(kernels.amx_ready(), reason="this processor has AMX")
def test_the_amx_attention_refuses_to_run_without_amx() -> None:
    """The kernel checks for the tiles itself, so no caller can fault on a processor without them."""
    q = np.zeros((1, 32, 64), np.float32)
    with pytest.raises(RuntimeError, match="without AMX"):
        kernels.amx_attention(q, q, q, 1, 0.125, False, np.empty_like(q))


@needs_kernels
def test_a_bf16_gemm_that_does_not_run_here_is_not_chosen(monkeypatch) -> None:
    """oneDNN refuses its bf16 GEMM below AVX-512, whatever the flags claimed: the probe catches
    it and bf16 weights are computed in fp32."""
    if Bf16Gemm.ONEDNN not in blas.installed():
        pytest.skip("oneDNN is not installed")
    monkeypatch.setattr(blas, "_runs", lambda bf16: False)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: ZEN4)
    functions = blas.bound("auto")
    assert functions.bf16 is None and "does not run" in functions.choice.reason


@pytest.mark.parametrize(("flags", "warned"), [(SKYLAKE_X, True), (ZEN4, False)])
def test_a_bf16_model_says_where_bf16_is_slower(flags: set[str], warned: bool, monkeypatch, caplog) -> None:
    monkeypatch.setattr(apply, "gemm", lambda: SimpleNamespace(choice=choose(flags, BOTH)))
    apply._bf16_note.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            apply._bf16_note()
    finally:
        apply._bf16_note.cache_clear()
    assert ("bfloat16 is slower than float32" in caplog.text) is warned


needs_onednn = pytest.mark.skipif(Bf16Gemm.ONEDNN not in blas.installed(), reason="oneDNN is not installed")


@needs_kernels
@needs_onednn
@pytest.mark.parametrize(("flags", "direct"), [(SAPPHIRE_RAPIDS, False), (ZEN4, True), (SKYLAKE_X, False),
                                               (HASWELL, False)])
def test_only_the_class_on_onednn_takes_its_direct_convolutions(flags: set[str], direct: bool, monkeypatch) -> None:
    """The AVX-512 BF16 class's convolutions are oneDNN's; the AMX class keeps MKL's GEMMs and the
    classes without bf16 units compute bf16 weights in fp32, so none of them can enter it."""
    monkeypatch.setattr(blas, "_runs", lambda bf16: True)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags)
    monkeypatch.setattr(blas, "_convolutions", lambda library: SimpleNamespace())
    assert (blas.bound("auto").conv is not None) is direct


@needs_kernels
@needs_onednn
def test_direct_convolutions_that_fail_their_probe_are_not_used(monkeypatch, caplog) -> None:
    """Where oneDNN's convolution errs or computes wrong (an emulator's CPU model, say), bf16
    convolutions stay on the bf16 GEMM."""
    monkeypatch.setattr(blas, "_runs", lambda bf16: True)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: ZEN4)

    def wrong(self, image, weight, bias, residual, out) -> bool:
        out[...] = 0
        return True

    def failing(self, *args) -> bool:
        raise onednn.ConvolutionError("oneDNN dnnl_primitive_create failed with status 5")

    for conv2d in (wrong, failing, lambda self, *args: False):
        monkeypatch.setattr(onednn.Convolutions, "conv2d", conv2d)
        with caplog.at_level(logging.WARNING, logger=blas.__name__):
            functions = blas.bound("auto")
        assert functions.bf16 is not None and functions.conv is None
        assert "convolutions run as GEMMs" in caplog.text
        caplog.clear()


@needs_kernels
@needs_onednn
def test_a_shape_oneDNN_has_only_its_reference_form_for_runs_on_the_gemm(monkeypatch) -> None:
    functions = blas.bound("onednn")
    if functions.conv is None:
        pytest.skip("oneDNN's convolutions do not run here")
    monkeypatch.setattr(gemm, "gemm", lambda: functions)
    monkeypatch.setattr(onednn.Convolutions, "_implementation", lambda self, desc: "ref:any")
    shifted = []
    real = gemm._conv_shifted
    monkeypatch.setattr(gemm, "_conv_shifted", lambda *args: shifted.append(1) or real(*args))
    x = mx.random.normal((1, 40, 40, 8), key=mx.random.key(0))
    w = (mx.random.normal((8, 3, 3, 8), key=mx.random.key(1)) * 0.1).astype(mx.bfloat16)
    y = gemm.conv2d(x, w, None, 1)
    monkeypatch.setattr(gemm, "DIRECT", False)
    assert shifted == [1] and mx.array_equal(y, gemm.conv2d(x, w, None, 1)).item()
