/* Fused elementwise and row kernels for mlx-sd's CPU path, called through ctypes
 * (mlx_sd/cpu/kernels.py).
 *
 * Each replaces a chain of numpy or MLX passes (softmax: max, subtract, exp, sum; GELU: about
 * twenty; a convolution's pad, cast, slice and bias add) with one or two passes over
 * cache-resident blocks, vectorised by the compiler. Each exported kernel spreads its rows
 * over the pool's threads (pool.c); ctypes releases the GIL while it runs.
 *
 * The shared arithmetic (exp, bf16 rounding, row maxima) is in vector_math.h.
 */

#include <stdatomic.h>
#include <stdlib.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

#include "kernels.h"
#include "vector_math.h"
#include "pool.h"

/* The interface version: bump it with any change to an exported function's signature or
 * meaning, together with ABI_VERSION in kernels.py, so that a library left over from an
 * older install is refused instead of called with the wrong arguments. */
int kernels_abi_version(void) { return 8; }

/* The instruction sets this processor (or emulator) reports and the system enables, as CPUID
 * shows them to this code: bits 0 AVX2 with FMA, 1 AVX-512 F, 2 AVX-512 BF16, 3 AMX-BF16 and its
 * tiles (mlx_sd/cpu/dispatch.py; amx_attention.c also asks Linux for the tiles). */
int cpu_features(void) {
#if X86_GCC
    unsigned a, b, c, d;
    int amx = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1) && (d >> 24 & 1);
    return (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) | !!__builtin_cpu_supports("avx512f") << 1 |
           !!__builtin_cpu_supports("avx512bf16") << 2 | amx << 3;
#else
    return 0;
#endif
}

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

void to_bf16_values(const float *x, ptrdiff_t n, uint16_t *out) {
#if X86_GCC
    if (__builtin_cpu_supports("avx512bf16")) {
        to_bf16_avx512(x, n, out);
        return;
    }
#endif
    for (ptrdiff_t j = 0; j < n; j++)
        out[j] = bf16_bits(x[j]);
}

/* The elementwise and row kernels' arguments: rows of `width` values, or values (width 1). */
struct map_job {
    const float *x;
    void *out;
    ptrdiff_t width;
    float slope;
};

static void to_bf16_chunk(void *context, ptrdiff_t first, ptrdiff_t last) {
    struct map_job *job = context;
    to_bf16_values(job->x + first, last - first, (uint16_t *)job->out + first);
}

/* out = x rounded to bf16 (nearest even), n values. */
void to_bf16(const float *x, ptrdiff_t n, uint16_t *out) {
    struct map_job job = {x, out, 1, 0};
    pool_run(to_bf16_chunk, &job, n, n);
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
            to_bf16_values(row, cols, bf16 + i * cols);
    }
}

MULTIVERSION
void geglu_rows(const float *x, ptrdiff_t rows, ptrdiff_t width, float *out) {
    for (ptrdiff_t i = 0; i < rows; i++) {
        const float *hidden = x + i * 2 * width, *gate = hidden + width;
        float *y = out + i * width;
#pragma omp simd
        for (ptrdiff_t j = 0; j < width; j++)
            y[j] = hidden[j] * gelu_one(gate[j]);
    }
}

static void geglu_chunk(void *context, ptrdiff_t first, ptrdiff_t last) {
    struct map_job *job = context;
    geglu_rows(job->x + first * 2 * job->width, last - first, job->width, (float *)job->out + first * job->width);
}

/* out[i, j] = x[i, j] * GELU(x[i, width + j]) for x: rows x (2 width), out: rows x width. */
void geglu(const float *x, ptrdiff_t rows, ptrdiff_t width, float *out) {
    struct map_job job = {x, out, width, 0};
    pool_run(geglu_chunk, &job, rows, rows * width * 3);
}

MULTIVERSION
static void sigmoid_gate_chunk(void *context, ptrdiff_t first, ptrdiff_t last) {
    struct map_job *job = context;
    float *out = job->out, slope = job->slope;
#pragma omp simd
    for (ptrdiff_t j = first; j < last; j++)
        out[j] = sigmoid_gate_one(job->x[j], slope);
}

/* out = x * sigmoid(slope * x) over n values: SiLU at slope 1, CLIP's quick GELU at 1.702. */
void sigmoid_gate(const float *x, ptrdiff_t n, float slope, float *out) {
    struct map_job job = {x, out, 1, slope};
    pool_run(sigmoid_gate_chunk, &job, n, n);
}

struct scale_shift_job {
    const float *x, *scale, *offset;
    float *f32;
    uint16_t *bf16;
    ptrdiff_t rows_per_image, channels;
    int silu;
};

/* Channels per pass of a bf16 output: the row's fp32 results wait in a stack buffer this long. */
#define SCALE_SHIFT_BLOCK 256

MULTIVERSION
static void scale_shift_values(const float *in, const float *scale, const float *offset, ptrdiff_t n, int silu,
                               float *y) {
    if (silu) {
#pragma omp simd
        for (ptrdiff_t c = 0; c < n; c++)
            y[c] = sigmoid_gate_one(in[c] * scale[c] + offset[c], 1.0f);
    } else {
#pragma omp simd
        for (ptrdiff_t c = 0; c < n; c++)
            y[c] = in[c] * scale[c] + offset[c];
    }
}

static void scale_shift_chunk(void *context, ptrdiff_t first, ptrdiff_t last) {
    struct scale_shift_job *job = context;
    ptrdiff_t channels = job->channels;
    float block[SCALE_SHIFT_BLOCK];
    for (ptrdiff_t i = first; i < last; i++) {
        const float *in = job->x + i * channels, *scale = job->scale + i / job->rows_per_image * channels;
        const float *offset = job->offset + i / job->rows_per_image * channels;
        if (job->f32 != NULL) {
            scale_shift_values(in, scale, offset, channels, job->silu, job->f32 + i * channels);
            continue;
        }
        for (ptrdiff_t c = 0; c < channels; c += SCALE_SHIFT_BLOCK) {
            ptrdiff_t n = channels - c < SCALE_SHIFT_BLOCK ? channels - c : SCALE_SHIFT_BLOCK;
            scale_shift_values(in + c, scale + c, offset + c, n, job->silu, block);
            to_bf16_values(block, n, job->bf16 + i * channels + c);
        }
    }
}

/* out[i, c] = x[i, c] * scale[c] + offset[c], then SiLU if `silu`, for x and out (rows x
 * channels), whose rows are images of `rows_per_image` rows, each with its own row of scale and
 * offset (images x channels). out is float32 (`f32`) or, when `f32` is NULL, bf16 (`bf16`),
 * rounded to nearest even as to_bf16 rounds: what a bf16 product would make of the float32
 * result, without the float32 result ever being stored. */
void scale_shift(const float *x, ptrdiff_t rows, ptrdiff_t rows_per_image, ptrdiff_t channels, const float *scale,
                 const float *offset, int silu, float *f32, uint16_t *bf16) {
    struct scale_shift_job job = {x, scale, offset, f32, bf16, rows_per_image, channels, silu};
    pool_run(scale_shift_chunk, &job, rows, rows * channels);
}

/* Partial sums are float over runs of MOMENT_ROWS rows, then float64. */
#define MOMENT_ROWS 256

/* Adds to sum[c] and squares[c] the sums over `rows` rows of x of d and d² for d = x[i, c] -
 * shift[c]; `scratch` holds 2 * channels floats. */
MULTIVERSION
static void moments_rows(const float *x, ptrdiff_t rows, ptrdiff_t channels, const float *shift, float *scratch,
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

struct moments_job {
    const float *x, *shift;
    double *partial; /* per piece: sums, then squares, channels each */
    ptrdiff_t rows_per_image, channels, pieces, piece_rows;
    atomic_int failed;
};

static void moments_chunk(void *context, ptrdiff_t first, ptrdiff_t last) {
    struct moments_job *job = context;
    ptrdiff_t channels = job->channels;
    float *scratch = malloc((size_t)(2 * channels) * sizeof(float));
    if (scratch == NULL) {
        job->failed = 1;
        return;
    }
    for (ptrdiff_t p = first; p < last; p++) {
        ptrdiff_t image = p / job->pieces, start = p % job->pieces * job->piece_rows;
        ptrdiff_t rows = start + job->piece_rows < job->rows_per_image ? job->piece_rows : job->rows_per_image - start;
        double *sums = job->partial + p * 2 * channels;
        if (rows > 0)
            moments_rows(job->x + (image * job->rows_per_image + start) * channels, rows, channels,
                         job->shift + image * channels, scratch, sums, sums + channels);
    }
    free(scratch);
}

/* sum and squares (images x channels, float64) = the per-channel sums of d and d² over each
 * image's rows of x (images * rows_per_image rows x channels), d = x - shift (a row of
 * channels per image). Each image is split into about as many pieces as it takes to give every
 * pool thread one, each summed into its own partial sums. Returns 0, or -1 without memory. */
int channel_moments(const float *x, ptrdiff_t images, ptrdiff_t rows_per_image, ptrdiff_t channels,
                    const float *shift, double *sum, double *squares) {
    ptrdiff_t pieces = (pool_threads() + images - 1) / images;
    struct moments_job job = {x, shift, calloc((size_t)(images * pieces * 2 * channels), sizeof(double)),
                              rows_per_image, channels, pieces, (rows_per_image + pieces - 1) / pieces, 0};
    if (job.partial == NULL)
        return -1;
    pool_run(moments_chunk, &job, images * pieces, images * rows_per_image * channels);
    for (ptrdiff_t p = 0; p < images * pieces; p++) {
        const double *partial = job.partial + p * 2 * channels;
        double *s1 = sum + p / pieces * channels, *s2 = squares + p / pieces * channels;
        for (ptrdiff_t c = 0; c < channels; c++) {
            s1[c] = (p % pieces ? s1[c] : 0) + partial[c];
            s2[c] = (p % pieces ? s2[c] : 0) + partial[channels + c];
        }
    }
    free(job.partial);
    return job.failed ? -1 : 0;
}

struct layer_norm_job {
    const float *x, *weight, *bias;
    float *out;
    ptrdiff_t width;
    float eps;
};

MULTIVERSION
static void layer_norm_chunk(void *context, ptrdiff_t first, ptrdiff_t last) {
    struct layer_norm_job *job = context;
    ptrdiff_t width = job->width;
    const float *weight = job->weight, *bias = job->bias;
    for (ptrdiff_t i = first; i < last; i++) {
        const float *in = job->x + i * width;
        float *y = job->out + i * width;
        float total = 0;
#pragma omp simd reduction(+ : total)
        for (ptrdiff_t j = 0; j < width; j++)
            total += in[j];
        float mean = total / width, squares = 0;
#pragma omp simd reduction(+ : squares)
        for (ptrdiff_t j = 0; j < width; j++)
            squares += (in[j] - mean) * (in[j] - mean);
        float rstd = 1.0f / __builtin_sqrtf(squares / width + job->eps);
#pragma omp simd
        for (ptrdiff_t j = 0; j < width; j++)
            y[j] = (in[j] - mean) * rstd * weight[j] + bias[j];
    }
}

/* out[i] = (x[i] - mean) / sqrt(var + eps) * weight + bias per row of x (rows x width), with the
 * row's mean and (biased) variance from two passes over the row. */
void layer_norm(const float *x, ptrdiff_t rows, ptrdiff_t width, const float *weight, const float *bias, float eps,
                float *out) {
    struct layer_norm_job job = {x, weight, bias, out, width, eps};
    pool_run(layer_norm_chunk, &job, rows, rows * width);
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
        to_bf16_values(in, n, bf16 + at);
}

/* The image kernels' arguments: an NHWC batch x (B, H, W, C), the output (float32 `f32`, else
 * bf16 `bf16`), and the row the kernel's range starts at (`origin`: pool chunks count from 0). */
struct image_job {
    const float *x, *bias, *add;
    float *f32;
    uint16_t *bf16;
    ptrdiff_t origin, height, width, channels, pad, kernel, padded_height, padded_width, bias_stride;
};

static void pad_chunk(void *context, ptrdiff_t first, ptrdiff_t last) {
    const struct image_job *job = context;
    ptrdiff_t height = job->height, pad = job->pad, padded_height = height + 2 * pad;
    ptrdiff_t row = (job->width + 2 * pad) * job->channels, border = pad * job->channels;
    ptrdiff_t inside = job->width * job->channels;
    for (ptrdiff_t r = job->origin + first; r < job->origin + last; r++) {
        ptrdiff_t image = r / padded_height, y = r % padded_height - pad;
        if (y < 0 || y >= height) {
            put_values(NULL, row, job->f32, job->bf16, r * row);
            continue;
        }
        put_values(NULL, border, job->f32, job->bf16, r * row);
        put_values(job->x + (image * height + y) * inside, inside, job->f32, job->bf16, r * row + border);
        put_values(NULL, border, job->f32, job->bf16, r * row + border + inside);
    }
}

/* Rows [first, last) of the zero-padded copy of an NHWC image batch x (B, H, W, C): out is
 * (B, H + 2 pad, W + 2 pad, C), its rows counted over the whole batch, written as float32 into
 * `f32`, or as bf16 into `bf16` when `f32` is NULL. */
void pad_image(const float *x, ptrdiff_t height, ptrdiff_t width, ptrdiff_t channels, ptrdiff_t pad,
               ptrdiff_t first, ptrdiff_t last, float *f32, uint16_t *bf16) {
    struct image_job job = {.x = x, .f32 = f32, .bf16 = bf16, .origin = first, .height = height, .width = width,
                            .channels = channels, .pad = pad};
    pool_run(pad_chunk, &job, last - first, (last - first) * (width + 2 * pad) * channels);
}

MULTIVERSION
static void crop_chunk(void *context, ptrdiff_t first, ptrdiff_t last) {
    const struct image_job *job = context;
    ptrdiff_t height = job->height, channels = job->channels, values = job->width * channels;
    for (ptrdiff_t r = job->origin + first; r < job->origin + last; r++) {
        ptrdiff_t image = r / height, y = r % height;
        const float *in = job->x + (image * job->padded_height + y) * job->padded_width * channels;
        const float *b = job->bias == NULL ? NULL : job->bias + image * job->bias_stride;
        const float *a = job->add == NULL ? NULL : job->add + r * values;
        float *o = job->f32 + r * values;
        if (b == NULL && a == NULL) {
            memcpy(o, in, (size_t)values * sizeof *o);
            continue;
        }
        for (ptrdiff_t at = 0; at < values; at += channels) {
#pragma omp simd
            for (ptrdiff_t c = 0; c < channels; c++)
                o[at + c] = in[at + c] + (b == NULL ? 0.0f : b[c]) + (a == NULL ? 0.0f : a[at + c]);
        }
    }
}

/* Output rows [first, last) (over the batch, B * H of them) of out (B, H, W, C): the pixels of
 * src (B, padded_height, padded_width, C) with y < H and x < W, plus the bias unless it is NULL
 * (a row of C per image, `bias_stride` apart: 0 when all images share one), plus `add` (B, H, W,
 * C: a residual) unless it is NULL. */
void crop_bias(const float *src, ptrdiff_t height, ptrdiff_t width, ptrdiff_t padded_height, ptrdiff_t padded_width,
               ptrdiff_t channels, const float *bias, ptrdiff_t bias_stride, const float *add, ptrdiff_t first,
               ptrdiff_t last, float *out) {
    struct image_job job = {.x = src, .bias = bias, .add = add, .f32 = out, .origin = first, .height = height,
                            .width = width, .channels = channels, .padded_height = padded_height,
                            .padded_width = padded_width, .bias_stride = bias_stride};
    pool_run(crop_chunk, &job, last - first, (last - first) * width * channels);
}

static void im2col_chunk(void *context, ptrdiff_t first, ptrdiff_t last) {
    const struct image_job *job = context;
    ptrdiff_t height = job->height, width = job->width, channels = job->channels, kernel = job->kernel;
    ptrdiff_t row = kernel * kernel * channels;
    for (ptrdiff_t r = job->origin + first; r < job->origin + last; r++) {
        ptrdiff_t image = r / (height * width), y = r / width % height, col = r % width;
        for (ptrdiff_t dy = 0; dy < kernel; dy++) {
            for (ptrdiff_t dx = 0; dx < kernel; dx++) {
                ptrdiff_t sy = y + dy - job->pad, sx = col + dx - job->pad;
                int inside = sy >= 0 && sy < height && sx >= 0 && sx < width;
                const float *in = inside ? job->x + ((image * height + sy) * width + sx) * channels : NULL;
                put_values(in, channels, job->f32, job->bf16, r * row + (dy * kernel + dx) * channels);
            }
        }
    }
}

/* Rows [first, last) of the im2col matrix of an NHWC image batch x (B, H, W, C) for a k x k
 * convolution with `pad` zero pixels per side and stride 1: row b * H * W + y * W + x holds the
 * k * k * C values around that output pixel, in (dy, dx, c) order, the weight's (O, k, k, C)
 * order. Written as float32 into `f32`, or as bf16 into `bf16` when `f32` is NULL. */
void im2col(const float *x, ptrdiff_t height, ptrdiff_t width, ptrdiff_t channels, ptrdiff_t kernel, ptrdiff_t pad,
            ptrdiff_t first, ptrdiff_t last, float *f32, uint16_t *bf16) {
    struct image_job job = {.x = x, .f32 = f32, .bf16 = bf16, .origin = first, .height = height, .width = width,
                            .channels = channels, .pad = pad, .kernel = kernel};
    pool_run(im2col_chunk, &job, last - first, (last - first) * kernel * kernel * channels);
}

/* Element `from` of src to element `to` of dst, for elements of 2 or 4 bytes. */
static inline void move_element(const void *src, ptrdiff_t from, ptrdiff_t size, void *dst, ptrdiff_t to) {
    if (size == 2)
        ((uint16_t *)dst)[to] = ((const uint16_t *)src)[from];
    else
        ((uint32_t *)dst)[to] = ((const uint32_t *)src)[from];
}

#if X86_GCC
/* One output channel's taps with 32-bit gathers: 16 channels of a tap per gather, each lane
 * reading its element (and, for 16-bit elements, the next one, dropped by the narrowing). `last`
 * keeps the gathers from reading past the final element of the buffer. */
__attribute__((target("avx512f,avx512bw")))
static void transpose_block_avx512(const void *src, ptrdiff_t channels, ptrdiff_t taps, ptrdiff_t size, int last,
                                   void *dst) {
    __m512i lanes = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                       _mm512_set1_epi32((int)(taps * size)));
    for (ptrdiff_t t = 0; t < taps; t++) {
        ptrdiff_t c = 0, end = channels - (last && t == taps - 1 && size == 2);
        for (; c + 16 <= end; c += 16) {
            const char *first = (const char *)src + (c * taps + t) * size;
            if (size == 2)
                _mm256_storeu_si256((__m256i *)((uint16_t *)dst + t * channels + c),
                                    _mm512_cvtepi32_epi16(_mm512_i32gather_epi32(lanes, first, 1)));
            else
                _mm512_storeu_si512((uint32_t *)dst + t * channels + c, _mm512_i32gather_epi32(lanes, first, 1));
        }
        for (; c < channels; c++)
            move_element(src, c * taps + t, size, dst, t * channels + c);
    }
}
#endif

/* dst (O, taps, C) = src (O, C, taps) for elements of `size` bytes (2 or 4): a checkpoint's OIHW
 * convolution weights moved into MLX's OHWI layout; with AVX-512, 2x faster than numpy's
 * strided copy. */
void transpose_taps(const void *src, ptrdiff_t out_channels, ptrdiff_t channels, ptrdiff_t taps, ptrdiff_t size,
                    void *dst) {
    ptrdiff_t block = channels * taps;
    for (ptrdiff_t o = 0; o < out_channels; o++) {
        const char *from = (const char *)src + o * block * size;
        char *to = (char *)dst + o * block * size;
#if X86_GCC
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
            transpose_block_avx512(from, channels, taps, size, o == out_channels - 1, to);
            continue;
        }
#endif
        for (ptrdiff_t t = 0; t < taps; t++)
            for (ptrdiff_t c = 0; c < channels; c++)
                move_element(from, c * taps + t, size, to, t * channels + c);
    }
}

/* Element types of convert_values. */
enum { VALUES_F32 = 0, VALUES_F16 = 1, VALUES_BF16 = 2 };
#define CONVERT_BLOCK 256

/* An IEEE half's value, exactly: subnormals are their 10-bit mantissa times 2^-24. */
static inline float half_value(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = h >> 10 & 0x1f, mantissa = h & 0x3ff, bits;
    if (exponent == 0) {
        float magnitude = (float)mantissa * 5.9604644775390625e-8f;
        memcpy(&bits, &magnitude, sizeof bits);
        bits |= sign;
    } else {
        bits = sign | (exponent == 0x1f ? 0x7f800000 : (exponent + 112) << 23) | mantissa << 13;
    }
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

#if X86_GCC
__attribute__((target("avx512f")))
static void halves_avx512(const uint16_t *x, ptrdiff_t n, float *out) {
    ptrdiff_t j = 0;
    for (; j + 16 <= n; j += 16)
        _mm512_storeu_ps(out + j, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(x + j))));
    for (; j < n; j++)
        out[j] = half_value(x[j]);
}
#endif

/* out = n values of type `type` (F16 or BF16) widened to float32, exactly. */
static void widen(const uint16_t *x, int type, ptrdiff_t n, float *out) {
#if X86_GCC
    if (type == VALUES_F16 && __builtin_cpu_supports("avx512f")) {
        halves_avx512(x, n, out);
        return;
    }
#endif
    for (ptrdiff_t j = 0; j < n; j++) {
        uint32_t bits = (uint32_t)x[j] << 16;
        if (type == VALUES_F16)
            out[j] = half_value(x[j]);
        else
            memcpy(out + j, &bits, sizeof bits);
    }
}

/* dst = n values of src converted from `from` to `to`: F16 or BF16 widened to F32 (exact), or
 * F16 or F32 rounded to BF16 (nearest even); a checkpoint's tensors cast as they are read.
 * Returns 0, or -1 for another pair of types. */
int convert_values(const void *src, int from, ptrdiff_t n, int to, void *dst) {
    if (from == to || from < VALUES_F32 || from > VALUES_BF16 || (to != VALUES_F32 && to != VALUES_BF16))
        return -1;
    if (from == VALUES_F32) {
        to_bf16_values(src, n, dst);
        return 0;
    }
    if (to == VALUES_F32) {
        widen(src, from, n, dst);
        return 0;
    }
    float wide[CONVERT_BLOCK];
    for (ptrdiff_t start = 0; start < n; start += CONVERT_BLOCK) {
        ptrdiff_t count = n - start < CONVERT_BLOCK ? n - start : CONVERT_BLOCK;
        widen((const uint16_t *)src + start, from, count, wide);
        to_bf16_values(wide, count, (uint16_t *)dst + start);
    }
    return 0;
}
