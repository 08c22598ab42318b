/* Fused elementwise and row kernels for mlx-sd's CPU path, called through ctypes
 * (mlx_sd/models/cpu_kernels.py).
 *
 * Each replaces a chain of numpy or MLX passes (softmax: max, subtract, exp, sum; GELU: about
 * twenty; a convolution's pad, cast, slice and bias add) with one or two passes over
 * cache-resident blocks, vectorised by the compiler. The callers
 * split the work into blocks and spread them over the cores; ctypes releases the GIL.
 *
 * The shared arithmetic (exp, bf16 rounding, row maxima) is in cpu_math.h.
 */

#include "cpu_math.h"

/* The interface version: bump it with any change to an exported function's signature or
 * meaning, together with ABI_VERSION in cpu_kernels.py, so that a library left over from an
 * older install is refused instead of called with the wrong arguments. */
int kernels_abi_version(void) { return 4; }

#if X86_GCC
/* The same rounding in one AVX512-BF16 instruction per 32 values: 4x cheaper than the integer form. */
__attribute__((target("avx512f,avx512bf16")))
static void to_bf16_avx512(const float *x, ptrdiff_t n, uint16_t *out) {
    ptrdiff_t j = 0;
    for (; j + 32 <= n; j += 32) {
        __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + j + 16), _mm512_loadu_ps(x + j));
        _mm512_storeu_si512((void *)(out + j), (__m512i)pair);
    }
    for (; j < n; j++)
        out[j] = bf16_bits(x[j]);
}
#endif

/* out = x rounded to bf16, n values. */
void to_bf16(const float *x, ptrdiff_t n, uint16_t *out) {
#if X86_GCC
    if (__builtin_cpu_supports("avx512bf16")) {
        to_bf16_avx512(x, n, out);
        return;
    }
#endif
    for (ptrdiff_t j = 0; j < n; j++)
        out[j] = bf16_bits(x[j]);
}

/* Abramowitz & Stegun 7.1.26: erf(z) = 1 - t (a1 + t (a2 + ...)) e^(-z²), t = 1 / (1 + p z),
 * for z >= 0, with absolute error <= 1.5e-7. GELU(x) = x Φ(x), where Φ(x) = 1 - q for x >= 0
 * and q for x < 0, q = (1 - erf(|x| / √2)) / 2. */
static inline float gelu_one(float x) {
    float z = (x < 0 ? -x : x) * 0.707106781186547524f;
    float t = 1.0f / (1.0f + 0.3275911f * z);
    float poly = 1.061405429f;
    poly = poly * t - 1.453152027f;
    poly = poly * t + 1.421413741f;
    poly = poly * t - 0.284496736f;
    poly = poly * t + 0.254829592f;
    float q = 0.5f * poly * t * exp_fast(-z * z);
    return x >= 0 ? x - x * q : x * q;
}

static inline float sigmoid_gate_one(float x, float slope) {
    return x / (1.0f + exp_fast(-slope * x));
}

/* Each row of `scores` (rows x cols, contiguous) becomes e^(x - max of the row), in place, and
 * also rounded to bf16 into `bf16` unless that is NULL; sums[i] is the sum of row i's float
 * results (as torch's bf16 attention sums before rounding). */
MULTIVERSION
void softmax_numerators(float *scores, ptrdiff_t rows, ptrdiff_t cols, uint16_t *bf16, float *sums) {
    for (ptrdiff_t i = 0; i < rows; i++) {
        float *row = scores + i * cols;
        float top = row_max(row, cols);
        float sum = 0;
#pragma omp simd reduction(+ : sum)
        for (ptrdiff_t j = 0; j < cols; j++) {
            row[j] = exp_fast(row[j] - top);
            sum += row[j];
        }
        sums[i] = sum;
        if (bf16 != NULL)
            to_bf16(row, cols, bf16 + i * cols);
    }
}

/* out[i, j] = x[i, j] * GELU(x[i, width + j]) for x: rows x (2 width), out: rows x width. */
MULTIVERSION
void geglu(const float *x, ptrdiff_t rows, ptrdiff_t width, float *out) {
    for (ptrdiff_t i = 0; i < rows; i++) {
        const float *hidden = x + i * 2 * width, *gate = hidden + width;
        float *y = out + i * width;
#pragma omp simd
        for (ptrdiff_t j = 0; j < width; j++)
            y[j] = hidden[j] * gelu_one(gate[j]);
    }
}

/* out = x * sigmoid(slope * x) over n values: SiLU at slope 1, CLIP's quick GELU at 1.702. */
MULTIVERSION
void sigmoid_gate(const float *x, ptrdiff_t n, float slope, float *out) {
#pragma omp simd
    for (ptrdiff_t j = 0; j < n; j++)
        out[j] = sigmoid_gate_one(x[j], slope);
}

/* out[i, c] = x[i, c] * scale[c] + offset[c] for rows x channels, then SiLU if `silu`. */
MULTIVERSION
void scale_shift(const float *x, ptrdiff_t rows, ptrdiff_t channels, const float *scale, const float *offset,
                 int silu, float *out) {
    for (ptrdiff_t i = 0; i < rows; i++) {
        const float *in = x + i * channels;
        float *y = out + i * channels;
        if (silu) {
#pragma omp simd
            for (ptrdiff_t c = 0; c < channels; c++)
                y[c] = sigmoid_gate_one(in[c] * scale[c] + offset[c], 1.0f);
        } else {
#pragma omp simd
            for (ptrdiff_t c = 0; c < channels; c++)
                y[c] = in[c] * scale[c] + offset[c];
        }
    }
}

/* Adds to sum[c] and squares[c] the sums over rows of d and d² for d = x[i, c] - shift[c]
 * (rows x channels). Partial sums are float over runs of MOMENT_ROWS rows, then float64. */
#define MOMENT_ROWS 256
MULTIVERSION
void channel_moments(const float *x, ptrdiff_t rows, ptrdiff_t channels, const float *shift, float *scratch,
                     double *sum, double *squares) {
    float *s1 = scratch, *s2 = scratch + channels;
    for (ptrdiff_t start = 0; start < rows; start += MOMENT_ROWS) {
        ptrdiff_t stop = start + MOMENT_ROWS < rows ? start + MOMENT_ROWS : rows;
        for (ptrdiff_t c = 0; c < channels; c++)
            s1[c] = s2[c] = 0;
        for (ptrdiff_t i = start; i < stop; i++) {
            const float *in = x + i * channels;
#pragma omp simd
            for (ptrdiff_t c = 0; c < channels; c++) {
                float d = in[c] - shift[c];
                s1[c] += d;
                s2[c] += d * d;
            }
        }
        for (ptrdiff_t c = 0; c < channels; c++) {
            sum[c] += s1[c];
            squares[c] += s2[c];
        }
    }
}

/* out[i] = (x[i] - mean) / sqrt(var + eps) * weight + bias per row of x (rows x width), with the
 * row's mean and (biased) variance from two passes over the row. */
MULTIVERSION
void layer_norm(const float *x, ptrdiff_t rows, ptrdiff_t width, const float *weight, const float *bias, float eps,
                float *out) {
    for (ptrdiff_t i = 0; i < rows; i++) {
        const float *in = x + i * width;
        float *y = out + i * width;
        float total = 0;
#pragma omp simd reduction(+ : total)
        for (ptrdiff_t j = 0; j < width; j++)
            total += in[j];
        float mean = total / width, squares = 0;
#pragma omp simd reduction(+ : squares)
        for (ptrdiff_t j = 0; j < width; j++)
            squares += (in[j] - mean) * (in[j] - mean);
        float rstd = 1.0f / __builtin_sqrtf(squares / width + eps);
#pragma omp simd
        for (ptrdiff_t j = 0; j < width; j++)
            y[j] = (in[j] - mean) * rstd * weight[j] + bias[j];
    }
}

/* n values at offset `at` of an output that is float32 (`f32`) or, when `f32` is NULL, bf16:
 * `in`, rounded for bf16, or zeros when `in` is NULL. */
static void put_values(const float *in, ptrdiff_t n, float *f32, uint16_t *bf16, ptrdiff_t at) {
    if (in == NULL && f32 != NULL)
        memset(f32 + at, 0, (size_t)n * sizeof *f32);
    else if (in == NULL)
        memset(bf16 + at, 0, (size_t)n * sizeof *bf16);
    else if (f32 != NULL)
        memcpy(f32 + at, in, (size_t)n * sizeof *f32);
    else
        to_bf16(in, n, bf16 + at);
}

/* Rows [first, last) of the zero-padded copy of an NHWC image batch x (B, H, W, C): out is
 * (B, H + 2 pad, W + 2 pad, C), its rows counted over the whole batch, written as float32 into
 * `f32`, or as bf16 into `bf16` when `f32` is NULL. */
void pad_image(const float *x, ptrdiff_t height, ptrdiff_t width, ptrdiff_t channels, ptrdiff_t pad,
               ptrdiff_t first, ptrdiff_t last, float *f32, uint16_t *bf16) {
    ptrdiff_t padded_height = height + 2 * pad, row = (width + 2 * pad) * channels;
    ptrdiff_t border = pad * channels, inside = width * channels;
    for (ptrdiff_t r = first; r < last; r++) {
        ptrdiff_t image = r / padded_height, y = r % padded_height - pad;
        if (y < 0 || y >= height) {
            put_values(NULL, row, f32, bf16, r * row);
            continue;
        }
        put_values(NULL, border, f32, bf16, r * row);
        put_values(x + (image * height + y) * inside, inside, f32, bf16, r * row + border);
        put_values(NULL, border, f32, bf16, r * row + border + inside);
    }
}

/* Output rows [first, last) (over the batch, B * H of them) of out (B, H, W, C): the pixels of
 * src (B, padded_height, padded_width, C) with y < H and x < W, plus the bias unless it is NULL
 * (a row of C per image, `bias_stride` apart: 0 when all images share one), plus `add` (B, H, W,
 * C: a residual) unless it is NULL. */
MULTIVERSION
void crop_bias(const float *src, ptrdiff_t height, ptrdiff_t width, ptrdiff_t padded_height, ptrdiff_t padded_width,
               ptrdiff_t channels, const float *bias, ptrdiff_t bias_stride, const float *add, ptrdiff_t first,
               ptrdiff_t last, float *out) {
    for (ptrdiff_t r = first; r < last; r++) {
        ptrdiff_t image = r / height, y = r % height;
        const float *in = src + (image * padded_height + y) * padded_width * channels;
        const float *b = bias == NULL ? NULL : bias + image * bias_stride;
        const float *a = add == NULL ? NULL : add + r * width * channels;
        float *o = out + r * width * channels;
        if (b == NULL && a == NULL) {
            memcpy(o, in, (size_t)(width * channels) * sizeof *o);
            continue;
        }
        for (ptrdiff_t x = 0; x < width; x++) {
            const ptrdiff_t at = x * channels;
#pragma omp simd
            for (ptrdiff_t c = 0; c < channels; c++)
                o[at + c] = in[at + c] + (b == NULL ? 0.0f : b[c]) + (a == NULL ? 0.0f : a[at + c]);
        }
    }
}

/* Rows [first, last) of the im2col matrix of an NHWC image batch x (B, H, W, C) for a k x k
 * convolution with `pad` zero pixels per side and stride 1: row b * H * W + y * W + x holds the
 * k * k * C values around that output pixel, in (dy, dx, c) order, the weight's (O, k, k, C)
 * order. Written as float32 into `f32`, or as bf16 into `bf16` when `f32` is NULL. */
void im2col(const float *x, ptrdiff_t height, ptrdiff_t width, ptrdiff_t channels, ptrdiff_t kernel, ptrdiff_t pad,
            ptrdiff_t first, ptrdiff_t last, float *f32, uint16_t *bf16) {
    ptrdiff_t row = kernel * kernel * channels;
    for (ptrdiff_t r = first; r < last; r++) {
        ptrdiff_t image = r / (height * width), y = r / width % height, col = r % width;
        for (ptrdiff_t dy = 0; dy < kernel; dy++) {
            for (ptrdiff_t dx = 0; dx < kernel; dx++) {
                ptrdiff_t sy = y + dy - pad, sx = col + dx - pad;
                int inside = sy >= 0 && sy < height && sx >= 0 && sx < width;
                const float *in = inside ? x + ((image * height + sy) * width + sx) * channels : NULL;
                put_values(in, channels, f32, bf16, r * row + (dy * kernel + dx) * channels);
            }
        }
    }
}
