"""The fused C kernels (mlx_sd/cpu/kernels.c) against float64 numpy, and their guards."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_sd.cpu import kernels

pytestmark = pytest.mark.skipif(sys.platform != "linux" and kernels.kernels() is None,
                                reason="the kernels were not built here (no C compiler)")


def test_the_kernels_are_built_on_linux() -> None:
    # The install compiles them; on Linux a missing library means the build silently failed.
    assert kernels.kernels() is not None


def test_exp_is_accurate_over_the_whole_range() -> None:
    # A row whose max is 0 gives exp(x) itself; below -87 the input is clamped (e^-87 ~ 1.6e-38).
    x = np.concatenate([[0.0], np.linspace(-87, 0, 200001)]).astype(np.float32)[None].copy()
    expected = np.exp(x.astype(np.float64))
    sums = kernels.softmax_numerators(x)
    np.testing.assert_allclose(x, expected, rtol=3e-7, atol=0)
    np.testing.assert_allclose(sums, expected.sum(), rtol=1e-6)


def test_softmax_numerators_match_float64() -> None:
    rng = np.random.default_rng(0)
    scores = (rng.standard_normal((37, 4099)) * 8).astype(np.float32)
    scores[3, 5] = 1e4  # one dominant score: the rest of its row underflows to ~0
    scores[4] = -1e4  # a constant row: all ones
    # The subtraction is float32's, as in the kernel; its rounding is not the kernel's error.
    expected = np.exp((scores - scores.max(axis=1, keepdims=True)).astype(np.float64))
    sums = kernels.softmax_numerators(scores)
    np.testing.assert_allclose(scores, expected, rtol=3e-7, atol=1e-37)
    np.testing.assert_allclose(sums, expected.sum(axis=1), rtol=2e-6)
    assert sums[3] == 1 and sums[4] == 4099


def test_softmax_numerators_round_to_bf16_to_nearest_even() -> None:
    rng = np.random.default_rng(4)
    scores = (rng.standard_normal((5, 1000)) * 4).astype(np.float32)  # 1000: not a multiple of 32
    bf16 = np.empty(scores.shape, np.uint16)
    sums = kernels.softmax_numerators(scores, bf16)
    bits = scores.view(np.uint32)
    expected = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(bf16, expected)
    np.testing.assert_allclose(sums, scores.sum(axis=1), rtol=1e-6)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("rows", [50, 500], ids=["calling thread", "pool"])
def test_scale_shift_matches_float64_with_a_scale_and_offset_per_image(silu: bool, rows: int) -> None:
    rng = np.random.default_rng(1)
    x, scale, offset = (rng.standard_normal(shape, dtype=np.float32) * 4 for shape in ((3, rows, 96), (3, 96), (3, 96)))
    out = np.empty_like(x)
    kernels.scale_shift(x, scale, offset, silu, out)
    y = x.astype(np.float64) * scale[:, None] + offset[:, None]
    expected = y / (1 + np.exp(-y)) if silu else y
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("rows", [50, 500], ids=["calling thread", "pool"])
def test_scale_shift_writes_bf16_rounded_to_nearest_even(silu: bool, rows: int) -> None:
    """The bf16 output is the fp32 one rounded to nearest even; 300 channels span more than one
    of the kernel's 256-channel blocks."""
    rng = np.random.default_rng(2)
    x, scale, offset = (rng.standard_normal(shape, dtype=np.float32) * 4 for shape in ((2, rows, 300), (2, 300), (2, 300)))
    wide, bits = np.empty_like(x), np.empty(x.shape, np.uint16)
    kernels.scale_shift(x, scale, offset, silu, wide)
    kernels.scale_shift(x, scale, offset, silu, bits)
    words = wide.view(np.uint32).astype(np.uint64)
    np.testing.assert_array_equal(bits, ((words + 0x7FFF + ((words >> 16) & 1)) >> 16).astype(np.uint16))


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.float64), np.zeros((8, 16), np.float32)[:, ::2]],
                         ids=["float64", "strided"])
def test_raw_pointer_inputs_must_be_contiguous_float32(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="C-contiguous float32"):
        kernels.sigmoid_gate(bad, 1.0, np.empty((8, 8), np.float32))


def test_shape_mismatches_are_refused() -> None:
    with pytest.raises(ValueError, match="GEGLU"):
        kernels.geglu(np.zeros((4, 10), np.float32), np.empty((4, 6), np.float32))
    with pytest.raises(ValueError, match="shape mismatch"):
        kernels.scale_shift(np.zeros((1, 4, 8), np.float32), np.zeros((1, 8), np.float32),
                                np.zeros((1, 7), np.float32), False, np.empty((1, 4, 8), np.float32))


@pytest.mark.parametrize("images", [1, 3])
def test_channel_moments_are_float64_sums_of_deviations_per_image(images: int) -> None:
    """Each image split into pieces for the pool threads (one image) or not (three), every piece
    in runs of 256 rows (here several, the last one short)."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((images, 901, 40)) * 3 + 50).astype(np.float32)
    shift = np.ascontiguousarray(x[:, ::60].mean(axis=1))
    sums, squares = kernels.channel_moments(x, shift)
    d = x.astype(np.float64) - shift[:, None]
    np.testing.assert_allclose(sums, d.sum(axis=1), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(squares, (d * d).sum(axis=1), rtol=1e-5)


def test_layer_norm_matches_float64() -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((70, 320)) * 5 + 3).astype(np.float32)
    weight, bias = (rng.standard_normal(320, dtype=np.float32) for _ in range(2))
    out = np.empty_like(x)
    kernels.layer_norm(x, weight, bias, 1e-5, out)
    xd = x.astype(np.float64)
    expected = (xd - xd.mean(1, keepdims=True)) / np.sqrt(xd.var(1, keepdims=True) + 1e-5) * weight + bias
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def test_to_bf16_rounds_to_nearest_even() -> None:
    x = np.random.default_rng(6).standard_normal(1001).astype(np.float32)  # 31 x 32 + a tail of 9
    x[:4] = [0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8]  # exact ties: down to even, up to even
    out = np.empty(x.shape, np.uint16)
    kernels.to_bf16(x, out)
    np.testing.assert_array_equal(out, bf16_bits(x))
    assert list(out[2:4]) == [0x3F80, 0x3F82]


@pytest.mark.parametrize("bf16", [False, True])
def test_pad_image_in_row_ranges_matches_np_pad(bf16: bool) -> None:
    x = np.random.default_rng(7).standard_normal((2, 5, 7, 3)).astype(np.float32)
    out = np.full((2, 9, 11, 3), 7, np.uint16 if bf16 else np.float32)  # junk that must go
    for first, last in [(0, 4), (4, 13), (13, 18)]:  # ranges that split images and their borders
        kernels.pad_image(x, 2, first, last, out)
    expected = np.pad(x, [(0, 0), (2, 2), (2, 2), (0, 0)])
    np.testing.assert_array_equal(out, bf16_bits(expected) if bf16 else expected)


def test_crop_bias_keeps_the_top_left_pixels_plus_bias_and_residual() -> None:
    rng = np.random.default_rng(8)
    source = rng.standard_normal((2, 7, 9, 4)).astype(np.float32)
    bias, per_image = rng.standard_normal(4).astype(np.float32), rng.standard_normal((2, 4)).astype(np.float32)
    residual = rng.standard_normal((2, 5, 6, 4)).astype(np.float32)
    outs = [np.empty((2, 5, 6, 4), np.float32) for _ in range(4)]
    for first, last in [(0, 3), (3, 10)]:  # a split inside the first image
        kernels.crop_bias(source, bias, first, last, outs[0])
        kernels.crop_bias(source, None, first, last, outs[1])
        kernels.crop_bias(source, per_image, first, last, outs[2], residual)
        kernels.crop_bias(source, None, first, last, outs[3], residual)
    cropped = source[:, :5, :6]
    np.testing.assert_array_equal(outs[0], cropped + bias)
    np.testing.assert_array_equal(outs[1], cropped)
    np.testing.assert_allclose(outs[2], cropped + per_image[:, None, None] + residual, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(outs[3], cropped + residual)


def test_crop_bias_refuses_biases_and_residuals_of_other_shapes() -> None:
    source, out = np.zeros((2, 4, 4, 3), np.float32), np.empty((2, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="bias"):
        kernels.crop_bias(source, np.zeros((3, 3), np.float32), 0, 6, out)
    with pytest.raises(ValueError, match="cannot add"):
        kernels.crop_bias(source, None, 0, 6, out, np.zeros((2, 3, 3, 1), np.float32))


def test_image_kernels_refuse_rows_out_of_range() -> None:
    x = np.zeros((1, 2, 2, 1), np.float32)
    with pytest.raises(ValueError, match="rows 0:5"):
        kernels.pad_image(x, 1, 0, 5, np.empty((1, 4, 4, 1), np.float32))
    with pytest.raises(ValueError, match="rows 0:3"):
        kernels.crop_bias(np.zeros((1, 4, 4, 1), np.float32), None, 0, 3, x)


def test_a_library_of_another_version_is_refused(monkeypatch, caplog) -> None:
    built = kernels.kernels()
    kernels._library.cache_clear()
    kernels.kernels.cache_clear()
    monkeypatch.setattr(kernels, "ABI_VERSION", kernels.ABI_VERSION + 1)
    try:
        with caplog.at_level("WARNING"):
            assert kernels.kernels() is None
        assert "reinstalled" in caplog.text
    finally:
        kernels._library.cache_clear()
        kernels.kernels.cache_clear()
    monkeypatch.undo()
    assert kernels.kernels() is not None and built is not None


@pytest.mark.parametrize("bf16", [False, True])
def test_im2col_rows_hold_the_padded_patches_in_weight_order(bf16: bool) -> None:
    x = np.random.default_rng(9).standard_normal((2, 4, 5, 3)).astype(np.float32)
    out = np.full((40, 27), 7, np.uint16 if bf16 else np.float32)
    for first, last in [(0, 13), (13, 40)]:
        kernels.im2col(x, 3, 1, first, last, out)
    padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))  # (B, H, W, C, dy, dx)
    expected = windows.transpose(0, 1, 2, 4, 5, 3).reshape(40, 27)
    np.testing.assert_array_equal(out, bf16_bits(expected) if bf16 else expected)


@pytest.mark.parametrize("bits", [np.uint16, np.uint32])
@pytest.mark.parametrize("shape", [(4, 37, 3, 3), (3, 16, 1, 3), (2, 1, 3, 3), (5, 64, 3, 3)])
def test_transpose_taps_moves_conv_weights_into_mlx_layout(bits: type, shape: tuple) -> None:
    """Against numpy's transpose, with channel counts that are and are not multiples of 16."""
    source = np.random.default_rng(4).integers(0, np.iinfo(bits).max, shape, dtype=bits)
    out = np.empty((shape[0], shape[2], shape[3], shape[1]), bits)
    kernels.transpose_taps(source, out)
    np.testing.assert_array_equal(out, source.transpose(0, 2, 3, 1))


def test_transpose_taps_refuses_other_element_sizes_and_shapes() -> None:
    with pytest.raises(ValueError):
        kernels.transpose_taps(np.zeros((2, 3, 3, 3), np.uint8), np.empty((2, 3, 3, 3), np.uint8))
    with pytest.raises(ValueError):
        kernels.transpose_taps(np.zeros((2, 3, 3, 3), np.uint16), np.empty((2, 3, 3, 2), np.uint16))


def test_convert_values_widens_every_half_and_bf16_exactly() -> None:
    """All 65536 bit patterns, subnormals, infinities and NaNs included, against numpy's exact
    half-to-float conversion and bf16's definition (the top half of a float32). (NaNs stay NaNs;
    the processor's conversion quiets signalling ones, numpy's keeps their bits.)"""
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(patterns.size, np.uint32)
    kernels.convert_values(patterns, mx.float16, out, mx.float32)
    expected = patterns.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(out.view(np.float32)), nan)
    np.testing.assert_array_equal(out[~nan], expected.view(np.uint32)[~nan])
    # Runs of 15 go to the scalar form that finishes each vector loop (and serves CPUs without
    # AVX-512), which keeps every bit, NaN payloads included.
    for start in range(0, patterns.size, 15):
        kernels.convert_values(patterns[start:start + 15], mx.float16, out[start:start + 15], mx.float32)
    np.testing.assert_array_equal(out, expected.view(np.uint32))
    kernels.convert_values(patterns, mx.bfloat16, out, mx.float32)
    np.testing.assert_array_equal(out, patterns.astype(np.uint32) << 16)


def test_convert_values_rounds_to_bf16_as_mlx_does() -> None:
    """Every finite half, and floats on and around bf16's rounding midpoints, against MLX's cast."""
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    halves = halves[np.isfinite(halves.view(np.float16))]
    out = np.empty(halves.size, np.uint16)
    kernels.convert_values(halves, mx.float16, out, mx.bfloat16)
    expected = mx.array(halves).view(mx.float16).astype(mx.bfloat16).view(mx.uint16)
    np.testing.assert_array_equal(out, np.array(expected))
    floats = np.random.default_rng(5).standard_normal(4099).astype(np.float32)
    floats = np.concatenate([floats, (floats.view(np.uint32) & 0xFFFF0000 | 0x8000).view(np.float32)])  # midpoints
    out = np.empty(floats.size, np.uint16)
    kernels.convert_values(floats.view(np.uint32), mx.float32, out, mx.bfloat16)
    np.testing.assert_array_equal(out, np.array(mx.array(floats).astype(mx.bfloat16).view(mx.uint16)))


def test_convert_values_refuses_other_casts_and_sizes() -> None:
    with pytest.raises(ValueError, match="no conversion"):
        kernels.convert_values(np.zeros(4, np.uint32), mx.float32, np.empty(4, np.uint16), mx.float16)
    with pytest.raises(ValueError):
        kernels.convert_values(np.zeros(4, np.uint16), mx.float16, np.empty(3, np.uint32), mx.float32)

