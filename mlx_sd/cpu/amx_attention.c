/* Fused attention for bf16 models on Intel AMX (Sapphire Rapids and later), called through
 * ctypes (mlx_sd/cpu/kernels.py).
 *
 * Each head (or run of a head's query rows) is one job for the pool (pool.c), computing
 * softmax(q kᵀ scale) v 32 query rows at a time, all inside the L2 cache: the block's scores
 * (32 rows x all keys) come from AMX tile products of bf16 q and k with fp32 sums, their
 * exponentials and row sums from AVX-512, and the value product again from AMX, on the
 * weights rounded to bf16 (torch's bf16 attention rounds them the same way). No BLAS call, no
 * scores larger than the block, no per-call packing of the operands by a library: k and v are
 * packed once per job into the tiles' layouts.
 *
 * AMX multiplies a 16 x 32 bf16 tile A by a 32 x 16 tile B into a 16 x 16 fp32 tile; B holds
 * pairs of consecutive rows interleaved ("VNNI" layout), so B's row r is the 32-bit pairs
 * (B[2r][c], B[2r+1][c]) for c = 0..15. The packed k is therefore kᵀ in pairs of head dims,
 * and the packed v is v in pairs of keys. Head dims are padded with zeros to 32 (for the
 * scores) and to 16 (for the output), keys to 32; the padded keys get zero weight.
 *
 * Without AMX (or off x86 Linux with GCC) amx_available() is 0 and amx_attention is never called.
 */

#define _GNU_SOURCE /* syscall() under -std=c11 */
#include <stdatomic.h>
#include <stdlib.h>

#include "vector_math.h"
#include "pool.h"

#if X86_GCC && __GNUC__ >= 11
#define AMX_BUILT 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define AMX_BUILT 0
#endif

#if AMX_BUILT
#define ARCH_REQ_XCOMP_PERM 0x1023 /* Linux asks each process to request the tile state */
#define XFEATURE_XTILEDATA 18

/* 1 when the processor has AMX-BF16 and AVX512-BF16 and Linux grants this process the tiles. */
int amx_available(void) {
    static int state = -1; /* a race here only repeats the idempotent request */
    if (state < 0) {
        unsigned a, b, c, d;
        int cpu = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1) && (d >> 24 & 1) &&
                  __builtin_cpu_supports("avx512bf16");
        state = cpu && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }
    return state;
}

#define AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))
/* Inlined into each caller, where `pair` is a constant for the scores. */
#define INLINED static inline __attribute__((always_inline))
#define ROWS 32 /* query rows per block: two tiles */

/* Palette 1 with all eight tiles 16 rows of 64 bytes: 0-3 accumulate, 4-5 hold A, 6-7 hold B. */
struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
};

static ptrdiff_t round_up(ptrdiff_t n, ptrdiff_t to) { return (n + to - 1) / to * to; }

/* x[0..16) rounded to bf16, with only the first `count` values read (the rest are zero). */
AMX static inline __m256i bf16x16(const float *x, ptrdiff_t count) {
    __mmask16 lanes = count >= 16 ? 0xFFFF : count <= 0 ? 0 : (__mmask16)((1u << count) - 1);
    return (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(lanes, x));
}

/* The 32-bit pairs (low[i], high[i]) of two runs of 16 bf16 values: a B tile row. */
AMX static inline __m512i pairs(__m256i low, __m256i high) {
    return _mm512_or_si512(_mm512_cvtepu16_epi32(low), _mm512_slli_epi32(_mm512_cvtepu16_epi32(high), 16));
}

/* kpack (depth / 2 x keys_padded pairs) = kᵀ in pairs of head dims: 16 keys at a time, each pair
 * of dims gathered down the keys' rows. */
AMX static void pack_keys(const float *k, ptrdiff_t keys, ptrdiff_t dim, ptrdiff_t stride, ptrdiff_t depth,
                          ptrdiff_t keys_padded, uint32_t *kpack) {
    __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                      _mm512_set1_epi32((int)stride));
    for (ptrdiff_t n = 0; n < keys_padded; n += 16) {
        __mmask16 present = keys - n >= 16 ? 0xFFFF : keys <= n ? 0 : (__mmask16)((1u << (keys - n)) - 1);
        const float *first = k + (n < keys ? n : 0) * stride;
        for (ptrdiff_t r = 0; r < depth / 2; r++) {
            __mmask16 low = 2 * r < dim ? present : 0, high = 2 * r + 1 < dim ? present : 0;
            const float *column = first + (2 * r + 1 < dim ? 2 * r : 0);
            __m512 even = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), low, rows, column, 4);
            __m512 odd = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), high, rows, column + 1, 4);
            _mm512_storeu_si512(kpack + r * keys_padded + n, pairs((__m256i)_mm512_cvtneps_pbh(even),
                                                                    (__m256i)_mm512_cvtneps_pbh(odd)));
        }
    }
}

/* vpack (keys_padded / 2 x width pairs) = v in pairs of keys, each pair two rows of v. */
AMX static void pack_values(const float *v, ptrdiff_t keys, ptrdiff_t dim, ptrdiff_t stride, ptrdiff_t width,
                            ptrdiff_t keys_padded, uint32_t *vpack) {
    for (ptrdiff_t r = 0; r < keys_padded / 2; r++) {
        ptrdiff_t even = 2 * r, odd = 2 * r + 1;
        const float *a = v + (even < keys ? even : 0) * stride, *b = v + (odd < keys ? odd : 0) * stride;
        ptrdiff_t a_count = even < keys ? dim : 0, b_count = odd < keys ? dim : 0;
        for (ptrdiff_t c = 0; c < width; c += 16)
            _mm512_storeu_si512(vpack + r * width + c, pairs(bf16x16(a + c, a_count - c), bf16x16(b + c, b_count - c)));
    }
}

/* Tiles 0-3 = the (32 x 32) product of A, 32 rows of bf16 `a_stride` values apart, and B, 16-row
 * tiles of pairs `b_stride` pairs apart, summed over `steps` steps of 32 terms; a step moves 32
 * values along A's rows and `b_step` pairs down B. Only the left column of tiles (0 and 2)
 * unless `pair`. */
AMX INLINED void product_32x32(const uint16_t *a, ptrdiff_t a_stride, const uint32_t *b, ptrdiff_t b_stride,
                              ptrdiff_t b_step, ptrdiff_t steps, int pair) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (ptrdiff_t t = 0; t < steps; t++) {
        _tile_loadd(4, a + 32 * t, a_stride * 2);
        _tile_loadd(5, a + 16 * a_stride + 32 * t, a_stride * 2);
        _tile_loadd(6, b + t * b_step, b_stride * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (pair) {
            _tile_loadd(7, b + t * b_step + 16, b_stride * 4);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
}

/* Stores tiles 0-3 (or 0 and 2 unless `pair`) to c, rows `stride` floats apart. */
AMX INLINED void store_32x32(float *c, ptrdiff_t stride, int pair) {
    _tile_stored(0, c, stride * 4);
    _tile_stored(2, c + 16 * stride, stride * 4);
    if (pair) {
        _tile_stored(1, c + 16, stride * 4);
        _tile_stored(3, c + 16 * stride + 16, stride * 4);
    }
}

/* The scores of one block: scores (ROWS x keys_padded) = qblock (ROWS x depth) · kᵀ. */
AMX static void block_scores(const uint16_t *qblock, ptrdiff_t depth, const uint32_t *kpack, ptrdiff_t keys_padded,
                             float *scores) {
    for (ptrdiff_t j = 0; j < keys_padded; j += 32) {
        product_32x32(qblock, depth, kpack + j, keys_padded, 16 * keys_padded, depth / 32, 1);
        store_32x32(scores + j, keys_padded, 1);
    }
}

/* 2^x for x <= 0, 16 at a time: 2^n 2^r with n = round(x) and r = x - n in [-1/2, 1/2] (exact),
 * 2^r = e^(r ln 2) by its Taylor series to degree 6 (relative error below 1.2e-7). Inputs below
 * -125 give 2^-125 or so, still a normal float, so no subnormal ever reaches the arithmetic. */
AMX static inline __m512 exp2_negative(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-125.0f));
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.540353039e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.333355815e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.618129108e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.550410866e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.402265070e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.931471806e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* weights = bf16(e^(scale (s - max s))) over a row's first `keys` scores; returns the sum of the
 * fp32 exponentials (torch's bf16 attention also sums before rounding). One pass after the
 * maximum, in base 2 (the scale folded into one multiply-add). */
AMX static float row_weights(const float *s, ptrdiff_t keys, float scale, uint16_t *weights) {
    float factor = scale * LOG2E;
    __m512 multiply = _mm512_set1_ps(factor), offset = _mm512_set1_ps(-row_max(s, keys) * factor);
    __m512 sum = _mm512_setzero_ps();
    for (ptrdiff_t j = 0; j < keys; j += 16) {
        __mmask16 lanes = keys - j >= 16 ? 0xFFFF : (__mmask16)((1u << (keys - j)) - 1);
        __m512 e = exp2_negative(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes, s + j), multiply, offset));
        sum = _mm512_mask_add_ps(sum, lanes, sum, e);
        _mm256_mask_storeu_epi16(weights + j, lanes, (__m256i)_mm512_cvtneps_pbh(e));
    }
    return _mm512_reduce_add_ps(sum);
}

/* acc (ROWS x width) = weights (ROWS x keys_padded) · v, over output column tiles in pairs. */
AMX static void block_values(const uint16_t *weights, ptrdiff_t keys_padded, const uint32_t *vpack, ptrdiff_t width,
                             float *acc) {
    for (ptrdiff_t c = 0; c < width; c += 32) {
        int pair = c + 16 < width;
        product_32x32(weights, keys_padded, vpack + c, width, 16 * width, keys_padded / 32, pair);
        store_32x32(acc + c, width, pair);
    }
}

/* out = softmax(q kᵀ scale) v for one head: q (queries x dim), k and v (keys x dim) and out
 * (queries x dim) are fp32 rows `stride` floats apart (one head's columns of the token-major
 * projections), each row contiguous. With
 * causal_first >= 0, row i is query causal_first + i and sees keys 0..causal_first + i only (a
 * causal mask); -1 means no mask. Returns 0, or -1 when the scratch (about (dim + 64) * 4 bytes
 * per key) cannot be allocated. */
AMX static int attend_head(const float *q, const float *k, const float *v, ptrdiff_t queries, ptrdiff_t keys,
                           ptrdiff_t dim, ptrdiff_t stride, float scale, ptrdiff_t causal_first, float *out) {
    ptrdiff_t depth = round_up(dim, 32), width = round_up(dim, 16), keys_padded = round_up(keys, 32);
    size_t kbytes = (size_t)(depth / 2 * keys_padded) * 4, vbytes = (size_t)(keys_padded / 2 * width) * 4;
    size_t qbytes = (size_t)(ROWS * depth) * 2, sbytes = (size_t)(ROWS * keys_padded) * 4;
    size_t wbytes = (size_t)(ROWS * keys_padded) * 2, abytes = (size_t)(ROWS * width) * 4;
    char *scratch = aligned_alloc(64, kbytes + vbytes + qbytes + sbytes + wbytes + abytes);
    if (scratch == NULL)
        return -1;
    uint32_t *kpack = (uint32_t *)scratch, *vpack = (uint32_t *)(scratch + kbytes);
    uint16_t *qblock = (uint16_t *)(scratch + kbytes + vbytes);
    float *scores = (float *)(scratch + kbytes + vbytes + qbytes);
    uint16_t *weights = (uint16_t *)(scratch + kbytes + vbytes + qbytes + sbytes);
    float *acc = (float *)(scratch + kbytes + vbytes + qbytes + sbytes + wbytes);
    memset(weights, 0, wbytes); /* padded keys and rows keep zero weight */

    pack_keys(k, keys, dim, stride, depth, keys_padded, kpack);
    pack_values(v, keys, dim, stride, width, keys_padded, vpack);

    struct tile_config config = {.palette = 1};
    for (int t = 0; t < 8; t++) {
        config.bytes_per_row[t] = 64;
        config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
    float sums[ROWS];
    for (ptrdiff_t first = 0; first < queries; first += ROWS) {
        ptrdiff_t rows = queries - first < ROWS ? queries - first : ROWS;
        for (ptrdiff_t i = 0; i < ROWS; i++) {
            const float *row = q + (first + (i < rows ? i : 0)) * stride;
            for (ptrdiff_t c = 0; c < depth; c += 16)
                _mm256_storeu_si256((__m256i *)(qblock + i * depth + c), bf16x16(row + c, (i < rows ? dim : 0) - c));
        }
        block_scores(qblock, depth, kpack, keys_padded, scores);
        for (ptrdiff_t i = 0; i < rows; i++) {
            ptrdiff_t visible = causal_first < 0 ? keys : causal_first + first + i + 1;
            visible = visible < keys ? visible : keys;
            uint16_t *row = weights + i * keys_padded;
            sums[i] = row_weights(scores + i * keys_padded, visible, scale, row);
            memset(row + visible, 0, (size_t)(keys - visible) * sizeof *row);
        }
        block_values(weights, keys_padded, vpack, width, acc);
        for (ptrdiff_t i = 0; i < rows; i++) {
            float inverse = 1.0f / sums[i], *o = out + (first + i) * stride;
#pragma omp simd
            for (ptrdiff_t c = 0; c < dim; c++)
                o[c] = acc[i * width + c] * inverse;
        }
    }
    _tile_release();
    free(scratch);
    return 0;
}

struct heads_job {
    const float *q, *k, *v;
    float *out;
    ptrdiff_t heads, queries, keys, dim, runs, rows;
    float scale;
    int causal;
    atomic_int failed;
};

/* Jobs [first, last) of (image, head, run of query rows), in that order. */
static void heads_chunk(void *context, ptrdiff_t first, ptrdiff_t last) {
    struct heads_job *job = context;
    ptrdiff_t width = job->heads * job->dim;
    for (ptrdiff_t j = first; j < last; j++) {
        ptrdiff_t image = j / (job->heads * job->runs), head = j / job->runs % job->heads;
        ptrdiff_t start = j % job->runs * job->rows;
        ptrdiff_t count = start + job->rows < job->queries ? job->rows : job->queries - start;
        if (count <= 0)
            continue;
        ptrdiff_t query = (image * job->queries + start) * width + head * job->dim;
        ptrdiff_t key = image * job->keys * width + head * job->dim;
        if (attend_head(job->q + query, job->k + key, job->v + key, count, job->keys, job->dim, width, job->scale,
                        job->causal ? start : -1, job->out + query) != 0)
            job->failed = 1;
    }
}

/* Multi-head attention over token-major projections: q and out (images x queries x heads *
 * dim), k and v (images x keys x heads * dim), fp32 and contiguous; each head of each image is
 * one job for the pool, split into runs of query rows where there are fewer heads than pool
 * threads (the VAE's single head). `causal` masks later keys (query i sees keys 0..i). Returns
 * 0, -1 when a head's scratch cannot be allocated, or -2 without AMX (nothing is computed: the
 * tile instructions would fault). */
int amx_attention(const float *q, const float *k, const float *v, ptrdiff_t images, ptrdiff_t heads,
                  ptrdiff_t queries, ptrdiff_t keys, ptrdiff_t dim, float scale, int causal, float *out) {
    if (!amx_available())
        return -2;
    ptrdiff_t runs = (pool_threads() + images * heads - 1) / (images * heads);
    struct heads_job job = {q, k, v, out, heads, queries, keys, dim, runs, (queries + runs - 1) / runs, scale,
                            causal, 0};
    pool_run(heads_chunk, &job, images * heads * runs, images * heads * queries * keys);
    return job.failed ? -1 : 0;
}
#else
int amx_available(void) { return 0; }

/* Built without AMX: refused, as where the processor lacks it; here so that every build exports
 * the same names. */
int amx_attention(const float *q, const float *k, const float *v, ptrdiff_t images, ptrdiff_t heads,
                  ptrdiff_t queries, ptrdiff_t keys, ptrdiff_t dim, float scale, int causal, float *out) {
    return -2;
}
#endif
