/* Whole linear and feed-forward layers on the CPU: the input rounded to bf16, the bias and a
 * residual, and the BLAS's GEMMs, in one call spread over the pool (pool.c), so that a
 * layer costs one ctypes call and no Python between its passes (mlx_sd/cpu/gemm.py
 * describes the math). The GEMM is passed in: for bf16 operands (as uint16 bits) MKL's
 * cblas_gemm_bf16bf16f32 or oneDNN's through onednn_gemm_bf16 below, for fp32 any BLAS's
 * cblas_sgemm; all take the same arguments.
 */

#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"
#include "vector_math.h"
#include "pool.h"

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
/* Below this many rows per thread a linear layer is split by its output columns instead (the
 * time embeddings' two rows): each thread then reads its share of the weights. */
#define MIN_SPLIT_ROWS 16

typedef void (*gemm_fn)(int, int, int, int, int, int, float, const void *, int, const void *, int, float, void *,
                        int);

/* oneDNN's bf16 GEMM (dnnl_gemm_bf16bf16f32: row-major, 'N'/'T', 64-bit sizes, a status) behind
 * cblas_gemm_bf16bf16f32's arguments, so that the layers and gemm.py call either the same way.
 * Its callers pass valid shapes; a failing status (no memory for its packed copies) is counted
 * for gemm_failures(). */
typedef int (*dnnl_gemm_fn)(char, char, int64_t, int64_t, int64_t, float, const void *, int64_t, const void *,
                            int64_t, float, float *, int64_t);
static dnnl_gemm_fn onednn_bf16;
static atomic_int failures;

static void onednn_gemm_bf16(int layout, int transa, int transb, int m, int n, int k, float alpha, const void *a,
                             int lda, const void *b, int ldb, float beta, void *c, int ldc) {
    (void)layout; /* always row-major here */
    if (onednn_bf16(transa == TRANS ? 'T' : 'N', transb == TRANS ? 'T' : 'N', m, n, k, alpha, a, lda, b, ldb, beta,
                    c, ldc) != 0)
        atomic_fetch_add(&failures, 1);
}

/* Takes oneDNN's dnnl_gemm_bf16bf16f32 and returns the adapter that calls it. */
void *onednn_adapter(void *gemm) {
    onednn_bf16 = (dnnl_gemm_fn)gemm;
    return (void *)onednn_gemm_bf16;
}

/* How many adapted GEMMs failed since the last call. */
int gemm_failures(void) { return atomic_exchange(&failures, 0); }

/* The GEMM's input for `rows` rows of x (width k): x itself in fp32, or rounded to bf16 into
 * `scratch`. */
static const void *gemm_input(const float *x, ptrdiff_t rows, ptrdiff_t k, int bf16, uint16_t *scratch) {
    if (!bf16)
        return x;
    to_bf16_values(x, rows * k, scratch);
    return scratch;
}

/* Fills `rows` rows of out (row stride ld, `cols` wide) with bias + add (add with row stride
 * ld_add), either may be NULL, and returns the GEMM's beta: 0 when there was nothing to add. */
static float start_rows(float *out, ptrdiff_t rows, ptrdiff_t cols, ptrdiff_t ld, const float *bias,
                        const float *add, ptrdiff_t ld_add) {
    if (bias == NULL && add == NULL)
        return 0.0f;
    for (ptrdiff_t r = 0; r < rows; r++) {
        float *row = out + r * ld;
        const float *extra = add != NULL ? add + r * ld_add : NULL;
        if (bias != NULL && extra != NULL)
            for (ptrdiff_t j = 0; j < cols; j++)
                row[j] = bias[j] + extra[j];
        else
            memcpy(row, bias != NULL ? bias : extra, (size_t)cols * sizeof(float));
    }
    return 1.0f;
}

struct linear_job {
    const float *x, *bias, *add;
    const void *weight;
    float *out;
    ptrdiff_t rows, n, k, piece; /* piece: rows, or output columns, per chunk */
    int bf16, by_columns;
    gemm_fn gemm;
    atomic_int failed;
};

static void linear_chunk(void *context, ptrdiff_t first, ptrdiff_t last) {
    struct linear_job *job = context;
    ptrdiff_t k = job->k, n = job->n, size = job->bf16 ? 2 : 4;
    ptrdiff_t end = job->by_columns ? n : job->rows;
    ptrdiff_t lo = first * job->piece, hi = last * job->piece < end ? last * job->piece : end;
    /* By rows: rows [lo, hi) of every column. By columns: every row, columns [lo, hi). */
    ptrdiff_t r0 = job->by_columns ? 0 : lo, r1 = job->by_columns ? job->rows : hi;
    ptrdiff_t c0 = job->by_columns ? lo : 0, c1 = job->by_columns ? hi : n;
    if (r1 <= r0 || c1 <= c0)
        return;
    ptrdiff_t rows = r1 - r0;
    uint16_t *scratch = job->bf16 ? malloc((size_t)(rows * k) * sizeof(uint16_t)) : NULL;
    if (job->bf16 && scratch == NULL) {
        job->failed = 1;
        return;
    }
    const void *input = gemm_input(job->x + r0 * k, rows, k, job->bf16, scratch);
    float *out = job->out + r0 * n + c0;
    float beta = start_rows(out, rows, c1 - c0, n, job->bias != NULL ? job->bias + c0 : NULL,
                            job->add != NULL ? job->add + r0 * n + c0 : NULL, n);
    job->gemm(ROW_MAJOR, NO_TRANS, TRANS, (int)rows, (int)(c1 - c0), (int)k, 1.0f, input, (int)k,
              (const char *)job->weight + c0 * k * size, (int)k, beta, out, (int)n);
    free(scratch);
}

/* out (rows, n) = x (rows, k) @ weightᵀ + bias + add, weight (n, k); bias (n,) and add (rows,
 * n) may be NULL. bf16: weight holds bf16 bits and x is rounded to bf16 for the products.
 * Returns 0, or -1 when scratch memory ran out. */
int linear(const float *x, const void *weight, const float *bias, const float *add, ptrdiff_t rows, ptrdiff_t n,
           ptrdiff_t k, int bf16, void *gemm, float *out) {
    int threads = pool_threads();
    struct linear_job job = {x, bias, add, weight, out, rows, n, k, 0, bf16, 0, (gemm_fn)gemm, 0};
    job.by_columns = threads > 1 && rows < threads * MIN_SPLIT_ROWS;
    /* Column pieces in multiples of 16, which keeps each piece's weights and outputs aligned. */
    job.piece = job.by_columns ? (n / threads + 15) / 16 * 16 : (rows + threads - 1) / threads;
    if (job.piece == 0)
        job.piece = 1;
    pool_run(linear_chunk, &job, ((job.by_columns ? n : rows) + job.piece - 1) / job.piece, rows * (n + k) + n * k);
    return job.failed ? -1 : 0;
}

struct feed_forward_job {
    const float *x, *bias1, *bias2, *add;
    const void *weight1, *weight2;
    float *out;
    ptrdiff_t rows, k, n, dim, block;
    int bf16;
    gemm_fn gemm;
    atomic_int failed;
};

static void feed_forward_chunk(void *context, ptrdiff_t first, ptrdiff_t last) {
    struct feed_forward_job *job = context;
    ptrdiff_t k = job->k, n = job->n, half = n / 2, dim = job->dim, block = job->block;
    float *hidden = malloc((size_t)(block * (n + half)) * sizeof(float));
    uint16_t *bits = job->bf16 ? malloc((size_t)(block * (k > half ? k : half)) * sizeof(uint16_t)) : NULL;
    if (hidden == NULL || (job->bf16 && bits == NULL)) {
        free(hidden);
        free(bits);
        job->failed = 1;
        return;
    }
    float *gated = hidden + block * n;
    for (ptrdiff_t b = first; b < last; b++) {
        ptrdiff_t start = b * block, count = start + block < job->rows ? block : job->rows - start;
        const void *input = gemm_input(job->x + start * k, count, k, job->bf16, bits);
        float beta = start_rows(hidden, count, n, n, job->bias1, NULL, 0);
        job->gemm(ROW_MAJOR, NO_TRANS, TRANS, (int)count, (int)n, (int)k, 1.0f, input, (int)k, job->weight1, (int)k,
                  beta, hidden, (int)n);
        geglu_rows(hidden, count, half, gated);
        const void *activations = gemm_input(gated, count, half, job->bf16, bits);
        float *out = job->out + start * dim;
        beta = start_rows(out, count, dim, dim, job->bias2, job->add != NULL ? job->add + start * dim : NULL, dim);
        job->gemm(ROW_MAJOR, NO_TRANS, TRANS, (int)count, (int)dim, (int)half, 1.0f, activations, (int)half,
                  job->weight2, (int)half, beta, out, (int)dim);
    }
    free(hidden);
    free(bits);
}

/* out (rows, dim) = GEGLU(x @ weight1ᵀ + bias1) @ weight2ᵀ + bias2 + add, for x (rows, k),
 * weight1 (n, k) and weight2 (dim, n / 2), in blocks of `block` rows whose projection and
 * gated activations stay in per-thread scratch. bf16 as in `linear` (the gated activations are
 * rounded to bf16 too). Returns 0, or -1 when scratch memory ran out. */
int feed_forward(const float *x, const void *weight1, const float *bias1, const void *weight2, const float *bias2,
                 const float *add, ptrdiff_t rows, ptrdiff_t k, ptrdiff_t n, ptrdiff_t dim, ptrdiff_t block, int bf16,
                 void *gemm, float *out) {
    struct feed_forward_job job = {x, bias1, bias2, add, weight1, weight2, out, rows, k, n, dim, block, bf16,
                                   (gemm_fn)gemm, 0};
    pool_run(feed_forward_chunk, &job, (rows + block - 1) / block, rows * n);
    return job.failed ? -1 : 0;
}
