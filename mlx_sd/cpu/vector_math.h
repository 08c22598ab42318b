/* Inline arithmetic shared by mlx-sd's CPU kernels (kernels.c, amx_attention.c).
 *
 * exp is computed here rather than through libm so that every loop vectorises on every
 * compiler: e^x = 2^n e^r with n = round(x / ln 2) and |r| <= ln(2) / 2, where r is reduced
 * with ln 2 split into a short high part (exact in n * high) and a low remainder, and e^r is
 * its Taylor series to r^7 (truncation error below 6e-9, under float32's resolution).
 * The input is clamped to [-87, 88], so 2^n is always a normal float and no result overflows.
 */

#ifndef MLX_SD_CPU_MATH_H
#define MLX_SD_CPU_MATH_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define X86_GCC 1
#include <immintrin.h>
/* One build that uses AVX-512 or AVX2 where the processor has them (chosen at load time). */
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define X86_GCC 0
#define MULTIVERSION
#endif

#define LOG2E 1.44269504088896341f
#define LN2_HIGH 0.693359375f /* 8 significant bits: n * LN2_HIGH is exact for |n| < 2^15 */
#define LN2_LOW -2.12194440e-4f
#define ROUNDER 12582912.0f /* 1.5 * 2^23: adding and subtracting it rounds to an integer */

static inline float exp_fast(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float n = (x * LOG2E + ROUNDER) - ROUNDER;
    float r = (x - n * LN2_HIGH) - n * LN2_LOW;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* bf16 bits of a finite float, rounded to nearest even. */
static inline uint16_t bf16_bits(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* max(x[0..n)), with LANES independent running maxima: one would chain every vector max
 * behind the previous one's latency. */
#define LANES 64
static inline float row_max(const float *x, ptrdiff_t n) {
    float lanes[LANES], top = x[0];
    for (int l = 0; l < LANES; l++)
        lanes[l] = x[0];
    ptrdiff_t j = 0;
    for (; j + LANES <= n; j += LANES) {
#pragma omp simd
        for (int l = 0; l < LANES; l++)
            lanes[l] = x[j + l] > lanes[l] ? x[j + l] : lanes[l];
    }
    for (; j < n; j++)
        top = x[j] > top ? x[j] : top;
    for (int l = 0; l < LANES; l++)
        top = lanes[l] > top ? lanes[l] : top;
    return top;
}

#endif
