/* A pool of one thread per core for the CPU kernels' parallel loops (pool.c). */

#ifndef MLX_SD_CPU_POOL_H
#define MLX_SD_CPU_POOL_H

#include <stddef.h>

/* Runs task(context, first, last) on contiguous chunks covering [0, total), one per pool thread
 * (the caller runs the first), and returns when all are done; on the calling thread alone when
 * the job touches fewer than POOL_MIN_VALUES `values` (handing it over would cost more), or
 * when called from inside a job. */
typedef void (*pool_task)(void *context, ptrdiff_t first, ptrdiff_t last);
void pool_run(pool_task task, void *context, ptrdiff_t total, ptrdiff_t values);
#define POOL_MIN_VALUES (1 << 15)

/* The number of threads pool_run spreads work over (1 before pool_start, or after a fork). */
int pool_threads(void);

#endif
