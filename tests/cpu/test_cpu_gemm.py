"""The CPU convolution and bf16 GEMM paths against float64 references, and when layers use them."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_sd.cpu import gemm, kernels
from mlx_sd.cpu.apply import accelerate
from mlx_sd.cpu.activations import geglu
from mlx_sd.cpu.layers import Conv2d, Linear, output_plus
from mlx_sd.models.layers import ResnetBlock2D
from mlx_sd.models.unet import FeedForward, Upsample2D
from mlx_sd.models.vae import DecoderUpsample

pytestmark = pytest.mark.skipif(gemm.gemm() is None, reason="no fast BLAS loaded (reference BLAS)")
needs_bf16 = pytest.mark.skipif(
    gemm.gemm() is None or gemm.gemm().bf16 is None, reason="no bf16 GEMM on this CPU/BLAS"
)


def bf16_rounded(x: np.ndarray) -> np.ndarray:
    """`x` rounded to bf16 (via MLX), as float64."""
    return np.array(mx.array(x).astype(mx.bfloat16).astype(mx.float32)).astype(np.float64)


def conv_reference(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, padding: int) -> np.ndarray:
    """NHWC correlation in float64 by summing the kernel's shifted taps."""
    batch, height, width, _ = x.shape
    out_channels, kernel = weight.shape[0], weight.shape[1]
    padded = np.pad(x, [(0, 0), (padding, padding), (padding, padding), (0, 0)])
    out = np.zeros((batch, height, width, out_channels))
    for dy in range(kernel):
        for dx in range(kernel):
            out += padded[:, dy:dy + height, dx:dx + width] @ weight[:, dy, dx].T
    return out + bias


def relative_error(ours: mx.array, reference: np.ndarray) -> float:
    return float(np.abs(np.array(ours, dtype=np.float64) - reference).max() / np.abs(reference).max())


def random(*shape: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# Odd sizes on purpose: width != height, channel counts that fit no SIMD width, and images taller
# than one block of GEMM rows.
CONV_CASES = [((2, 5, 7, 3), 4, 3), ((1, 9, 6, 13), 8, 3), ((1, 4, 4, 6), 5, 5), ((1, 70, 66, 8), 16, 3)]


@pytest.fixture(params=["shifted", "shifted in row blocks", "unfolded", "direct"])
def conv_form(request, monkeypatch) -> str:
    """Every case through each form of the convolution, whatever its size would pick: the GEMM
    forms, or (bf16, where this class has it) oneDNN's direct convolution."""
    monkeypatch.setattr(gemm, "DIRECT", request.param == "direct")
    monkeypatch.setattr(gemm, "IM2COL_ROWS", 1 << 30 if request.param == "unfolded" else 0)
    monkeypatch.setattr(gemm, "SUMS_BYTES", 0 if request.param == "shifted in row blocks" else 1 << 40)
    monkeypatch.setattr(gemm, "BLOCK_ROWS", 512)  # several blocks of shifted GEMMs in the largest case
    return request.param


def addend(kind: str, shape: tuple, out_channels: int) -> np.ndarray | None:
    """What a convolution adds to its result: nothing, one vector per image, or a residual."""
    if kind == "none":
        return None
    return random(shape[0], 1, 1, out_channels, seed=30) if kind == "per-image" else random(*shape[:3], out_channels,
                                                                                          seed=31)


@pytest.mark.parametrize("add", ["none", "per-image", "residual"])
@pytest.mark.parametrize(("shape", "out_channels", "kernel"), CONV_CASES)
def test_fp32_conv_matches_float64(shape: tuple, out_channels: int, kernel: int, add: str, conv_form: str) -> None:
    if conv_form == "direct":
        pytest.skip("the direct convolution is bf16's")
    x, w, b = random(*shape, seed=0), random(out_channels, kernel, kernel, shape[-1], seed=1), random(out_channels, seed=2)
    extra = addend(add, shape, out_channels)
    ours = gemm.conv2d(mx.array(x), mx.array(w), mx.array(b), kernel // 2, None if extra is None else mx.array(extra))
    reference = conv_reference(x.astype(np.float64), w.astype(np.float64), b, kernel // 2) + (0 if extra is None else extra)
    assert ours.dtype == mx.float32 and ours.shape == (*shape[:3], out_channels)
    assert relative_error(ours, reference) < 1e-6


@pytest.mark.usefixtures("each_bf16_gemm")
@pytest.mark.parametrize("add", ["none", "per-image", "residual"])
@pytest.mark.parametrize(("shape", "out_channels", "kernel"), CONV_CASES)
@pytest.mark.parametrize("input_dtype", [mx.float32, mx.bfloat16], ids=["fp32 input", "bf16 input"])
def test_bf16_conv_is_exact_on_bf16_operands(shape: tuple, out_channels: int, kernel: int, add: str,
                                              conv_form: str, input_dtype: mx.Dtype, monkeypatch) -> None:
    """Products of bf16 values are exact in fp32, so only fp32 accumulation error remains. An
    input already in bf16 (a GroupNorm's for a convolution that reads bf16) is read as it is by
    the direct form, widened by the others."""
    if conv_form == "direct" and gemm.gemm().conv is None:
        pytest.skip("no direct bf16 convolution with this bf16 GEMM here")
    x, w, b = random(*shape, seed=3), random(out_channels, kernel, kernel, shape[-1], seed=4), random(out_channels, seed=5)
    extra = addend(add, shape, out_channels)
    weight = mx.array(w).astype(mx.bfloat16)
    forms = []
    for name in ("_conv_direct", "_conv_unfolded", "_conv_shifted"):
        real = getattr(gemm, name)
        monkeypatch.setattr(gemm, name, lambda *args, real=real, name=name: forms.append(name) or real(*args))
    ours = gemm.conv2d(mx.array(x).astype(input_dtype), weight, mx.array(b).astype(mx.bfloat16), kernel // 2,
                       None if extra is None else mx.array(extra))
    reference = conv_reference(bf16_rounded(x), bf16_rounded(w), bf16_rounded(b), kernel // 2)
    assert ours.dtype == mx.float32
    assert relative_error(ours, reference + (0 if extra is None else extra)) < 1e-6
    assert (forms[0] == "_conv_direct") == (conv_form == "direct") == gemm.reads_bf16(weight, shape)


def _rounded_inputs_are_taken(block: nn.Module, x: mx.array, monkeypatch, *args: object) -> None:
    """`block` (a CPU form, bf16 weights) hands its convolutions bf16 inputs where they read bf16,
    and its result is bit for bit the one it gives handing them fp32."""
    seen = []
    real = gemm.conv2d
    with monkeypatch.context() as patch:
        patch.setattr(gemm, "conv2d", lambda x, *rest: seen.append(x.dtype) or real(x, *rest))
        rounded = block(x, *args)
        assert seen and set(seen) == {mx.bfloat16}
        patch.setattr(Conv2d, "reads_bf16", lambda self, shape: False)
        seen.clear()
        assert mx.array_equal(block(x, *args), rounded)
        assert set(seen) == {mx.float32}


@pytest.mark.usefixtures("each_bf16_gemm")
def test_blocks_hand_convolutions_that_read_bf16_their_input_rounded(monkeypatch) -> None:
    if gemm.gemm().conv is None:
        pytest.skip("no direct bf16 convolution with this bf16 GEMM here")
    mx.random.seed(3)
    resnet = accelerate(ResnetBlock2D(32, 64, 16, 8, 1e-6))
    for upsampler, args in ((accelerate(DecoderUpsample(32)), ()), (accelerate(Upsample2D(32)), ((48, 40),))):
        upsampler.set_dtype(mx.bfloat16)
        _rounded_inputs_are_taken(upsampler, mx.random.normal((1, 24, 20, 32)), monkeypatch, *args)
    resnet.set_dtype(mx.bfloat16)
    _rounded_inputs_are_taken(resnet, mx.random.normal((2, 40, 30, 32)), monkeypatch, mx.random.normal((2, 16)))


@pytest.mark.usefixtures("each_bf16_gemm")
# On two or more cores, under 16 rows per core split the output's columns (400: pieces of 208 and
# 192) over the pool, more split the rows (165: 83 and 82); one row is the time embedding's case.
# Every case reads more than the pool's 32Ki values (the weights alone are 38400). 19 outputs,
# under 16 rows of 33 inputs, stay on the calling thread.
@pytest.mark.parametrize(("lead", "n", "k"), [((2, 7), 400, 96), ((1, 1), 400, 96), ((1,), 400, 96),
                                             ((3, 1), 400, 96), ((5, 33), 400, 96), ((2, 7), 19, 33)])
@pytest.mark.parametrize("with_add", [False, True], ids=["plain", "residual"])
def test_bf16_linear_is_exact_on_bf16_operands(lead: tuple, n: int, k: int, with_add: bool) -> None:
    x, w, b = random(*lead, k, seed=6), random(n, k, seed=7), random(n, seed=8)
    extra = random(*lead, n, seed=9) if with_add else None
    bias, residual = mx.array(b).astype(mx.bfloat16), None if extra is None else mx.array(extra)
    ours = gemm.linear(mx.array(x), mx.array(w).astype(mx.bfloat16), bias, residual)
    reference = bf16_rounded(x) @ bf16_rounded(w).T + bf16_rounded(b) + (0 if extra is None else extra)
    assert ours.shape == (*lead, n) and ours.dtype == mx.float32
    assert relative_error(ours, reference) < 1e-6
    # The bias and the residual are read, never written (a bias broadcast to the result's shape
    # once came back as the bias's own buffer).
    assert np.array_equal(np.array(bias.astype(mx.float32)), bf16_rounded(b).astype(np.float32))
    assert residual is None or np.array_equal(np.array(residual), extra)


@pytest.mark.parametrize("rows", [3, 165], ids=["split by columns", "split by rows"])
def test_the_linear_kernel_takes_fp32_operands_with_sgemm(rows: int) -> None:
    """The C layer's fp32 form (no rounding), which the fp32 feed-forward's passes share; on the
    pool (the weights alone are 51200 values)."""
    x, w, b, extra = random(rows, 256, seed=30), random(200, 256, seed=31), random(200, seed=32), random(rows, 200,
                                                                                                          seed=33)
    out = np.empty((rows, 200), np.float32)
    kernels.linear(x, w, b, extra, gemm.gemm().sgemm, out)
    reference = x.astype(np.float64) @ w.T.astype(np.float64) + b + extra
    assert np.abs(out - reference).max() / np.abs(reference).max() < 1e-6


@pytest.mark.usefixtures("each_bf16_gemm")
def test_bf16_matmul_of_bf16_bits_is_exact_on_bf16_operands() -> None:
    rng = np.random.default_rng(5)
    a, b = (rng.standard_normal(shape, dtype=np.float32) for shape in ((33, 300), (300, 20)))
    bits = [np.array(mx.array(t).astype(mx.bfloat16).view(mx.uint16)) for t in (a, b)]
    out = np.empty((33, 20), np.float32)
    gemm.matmul(*bits, out)
    np.testing.assert_allclose(out, bf16_rounded(a) @ bf16_rounded(b), rtol=1e-5, atol=1e-5)


def test_matmul_refuses_mixed_operand_types() -> None:
    with pytest.raises(ValueError, match="fp32 or bf16"):
        gemm.matmul(np.zeros((2, 3), np.float32), np.zeros((3, 2), np.uint16), np.empty((2, 2), np.float32))


def test_matmul_reads_and_writes_row_strided_views_in_place() -> None:
    """One head's columns of token-major (tokens, heads * dim) arrays, as the attention passes them."""
    q, k = random(9, 3 * 4, seed=14), random(11, 3 * 4, seed=15)
    out = np.full((9, 3 * 11), 5.0, np.float32)
    gemm.matmul(q[:, 4:8], k[:, 4:8], out[:, 11:22], transpose_b=True)
    np.testing.assert_allclose(out[:, 11:22], q[:, 4:8].astype(np.float64) @ k[:, 4:8].T, rtol=1e-6, atol=1e-6)
    assert (out[:, :11] == 5).all() and (out[:, 22:] == 5).all()  # the other heads' columns untouched


def test_matmul_reads_strided_operands_and_refuses_a_strided_output() -> None:
    a, b = random(6, 5, seed=12), random(7, 5, seed=13)
    out = np.empty((6, 7), np.float32)
    gemm.matmul(np.asfortranarray(a), b[:, :], out, transpose_b=True, alpha=0.5)
    np.testing.assert_allclose(out, 0.5 * a.astype(np.float64) @ b.T, rtol=1e-6, atol=1e-6)
    gemm.matmul(a, b.T, out)  # a transposed view as b
    np.testing.assert_allclose(out, a.astype(np.float64) @ b.T, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="rows must be contiguous"):
        gemm.matmul(a, b, np.empty((7, 6), np.float32).T, transpose_b=True)


def test_layers_take_the_fast_path_only_where_it_applies(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(gemm, "conv2d", lambda *args: calls.append("conv2d"))
    x = mx.array(random(1, 8, 8, 4, seed=9))
    Conv2d(4, 4, 3, padding=1)(x)
    assert calls == ["conv2d"]
    for layer in (Conv2d(4, 4, 3, stride=2, padding=1), Conv2d(4, 4, 3), Conv2d(4, 4, 1)):
        reference = nn.Conv2d.__call__(layer, x)
        assert mx.array_equal(layer(x), reference)  # MLX's own convolution: fp32 1x1 is a GEMM there
    assert calls == ["conv2d"]


@needs_bf16
def test_bf16_layers_compute_in_bf16_and_fp32_layers_do_not(monkeypatch) -> None:
    calls = []
    real_linear = gemm.linear
    monkeypatch.setattr(gemm, "linear", lambda *args: calls.append(args[1].dtype) or real_linear(*args))
    x = mx.array(random(2, 3, 3, 8, seed=10))
    for layer in (Linear(8, 6), Conv2d(8, 6, 1)):
        layer(x)
        layer.set_dtype(mx.bfloat16)
        assert layer(x).dtype == mx.float32
    assert calls == [mx.bfloat16, mx.bfloat16]


def test_without_a_fast_blas_layers_use_mlx(monkeypatch) -> None:
    monkeypatch.setattr(gemm, "gemm", lambda: None)
    monkeypatch.setattr(gemm, "conv2d", lambda *args: pytest.fail("fast path taken"))
    layer, x = Conv2d(4, 4, 3, padding=1), mx.array(random(1, 6, 6, 4, seed=11))
    layer.set_dtype(mx.bfloat16)
    assert mx.array_equal(layer(x), nn.Conv2d.__call__(layer, x))


def geglu_reference(h: np.ndarray) -> np.ndarray:
    """The first half of the last axis times the exact (erf) GELU of the second half, in float64."""
    hidden, gate = np.split(h, 2, axis=-1)
    return hidden * gate * 0.5 * (1 + np.vectorize(math.erf)(gate / math.sqrt(2)))


@pytest.mark.parametrize("dtype", [mx.float32, pytest.param(mx.bfloat16, marks=needs_bf16)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("with_add", [False, True], ids=["plain", "residual"])
def test_feed_forward_matches_float64(dtype: mx.Dtype, with_bias: bool, with_add: bool, monkeypatch) -> None:
    """Blocks of rows (here 16, so 74 rows end with a short block) projected, gated and projected
    again in scratch. In bf16 the gated activations are rounded to bf16 before the second
    product, as the reference does too."""
    monkeypatch.setattr(gemm, "FF_ROWS", 16)
    x, w1, b1 = random(2, 37, 24, seed=16), random(2 * 20, 24, seed=17), random(2 * 20, seed=18)
    w2, b2 = random(12, 20, seed=20), random(12, seed=21)
    rounded = bf16_rounded if dtype == mx.bfloat16 else lambda t: t.astype(np.float64)
    biases = [mx.array(b).astype(dtype) if with_bias else None for b in (b1, b2)]
    extra = random(2, 37, 12, seed=22) if with_add else None
    ours = gemm.feed_forward(mx.array(x), mx.array(w1).astype(dtype), biases[0], mx.array(w2).astype(dtype),
                                 biases[1], None if extra is None else mx.array(extra))
    gated = geglu_reference(rounded(x) @ rounded(w1).T + (rounded(b1) if with_bias else 0))
    reference = rounded(gated) @ rounded(w2).T + (rounded(b2) if with_bias else 0) + (0 if extra is None else extra)
    assert ours.shape == (2, 37, 12) and ours.dtype == mx.float32
    # The erf approximation's 1.5e-7 and fp32 sums; a gated value rounding to the other bf16
    # neighbour (not the case for these inputs) would show as ~1e-3.
    assert relative_error(ours, reference) < 2e-6


def test_unet_feed_forward_is_fused_where_the_gemms_take_it(monkeypatch) -> None:
    calls = []
    real = gemm.feed_forward
    monkeypatch.setattr(gemm, "feed_forward", lambda *args: calls.append(args[1].dtype) or real(*args))
    layer, x = accelerate(FeedForward(8)), mx.array(random(1, 5, 8, seed=19))
    separate = layer.net[2](geglu(layer.net[0].proj(x)))
    np.testing.assert_allclose(np.array(layer(x)), np.array(separate), rtol=1e-5, atol=1e-6)
    layer.set_dtype(mx.float16)  # MLX's own fp16 matmuls: not fused
    layer(x)
    assert calls == [mx.float32]


@pytest.mark.parametrize("dtype", [mx.float32, pytest.param(mx.bfloat16, marks=needs_bf16)], ids=["fp32", "bf16"])
def test_layers_add_to_their_output_in_any_form(dtype: mx.Dtype) -> None:
    """`output_plus(layer, x, add)` is layer(x) + add, whether the layer folds `add` into its own
    output pass (residuals, per-image vectors), adds it after (other shapes, MLX's path), or is
    an `nn.QuantizedLinear` that quantization put in its place."""
    x = mx.array(random(2, 5, 6, 8, seed=23))
    conv, pointwise, linear = Conv2d(8, 4, 3, padding=1), Conv2d(8, 4, 1), Linear(8, 4)
    quantized = nn.QuantizedLinear.from_linear(Linear(32, 4), group_size=32, bits=8)
    for layer in (conv, pointwise, linear):
        layer.set_dtype(dtype)
    cases = [(conv, x, (2, 5, 6, 4)), (conv, x, (2, 1, 1, 4)), (conv, x, (1, 1, 1, 4)), (pointwise, x, (2, 5, 6, 4)),
             (pointwise, x, (2, 1, 1, 4)), (linear, x, (2, 5, 6, 4)), (linear, x, (4,)),
             (quantized, mx.array(random(3, 32, seed=24)), (3, 4))]
    for i, (layer, inputs, shape) in enumerate(cases):
        add = mx.array(random(*shape, seed=25 + i))
        expected = type(layer).__mro__[1].__call__(layer, inputs) if isinstance(layer, (Conv2d, Linear)) else layer(inputs)
        ours = output_plus(layer, inputs, add)
        # bf16 layers on the CPU round their input to bf16, which MLX's own layer does not.
        tolerance = 2e-2 if dtype == mx.bfloat16 else 1e-5
        np.testing.assert_allclose(np.array(ours), np.array(expected + add), rtol=tolerance, atol=tolerance,
                                   err_msg=f"{type(layer).__name__} plus {shape}")
