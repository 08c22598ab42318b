/* The single-threaded forms of kernels.c's kernels that the other C files build on (their
 * exported forms spread the same work over the pool). */

#ifndef MLX_SD_CPU_KERNELS_H
#define MLX_SD_CPU_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* out = x rounded to bf16, n values. */
void to_bf16_values(const float *x, ptrdiff_t n, uint16_t *out);
/* out[i, j] = x[i, j] * GELU(x[i, width + j]) for x: rows x (2 width), out: rows x width. */
void geglu_rows(const float *x, ptrdiff_t rows, ptrdiff_t width, float *out);

#endif
