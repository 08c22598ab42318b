/* A pool of one thread per core for the CPU kernels' parallel loops, in C.
 *
 * The Python thread pool (threads.py) costs 100-150 µs per parallel call on a virtual
 * machine whose idle cores halt: a submitted chunk waits for its thread to be woken, and the
 * caller waits again to be woken when it is done; each is a trip through the hypervisor.
 * That is as much as a whole small layer (a 2x1024x320 linear layer: 0.3 ms of GEMM). Here
 * the threads, like OpenMP's, spin for SPIN_NS after each chunk before sleeping, so back-to-back
 * calls (a UNet step's layers) hand work over through shared memory, and the caller spins
 * while the last chunks finish; a thread idle for longer sleeps on a condition variable and
 * costs nothing. The spins yield, so they do not keep a core from another runnable thread (the
 * BLAS's own threads).
 *
 * Each pool thread runs its BLAS calls on one thread (MKL's per-thread setting, passed in by
 * pool_start), and so does the caller while it runs its chunk: the chunks already use every core.
 */

#define _GNU_SOURCE
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define PAUSE() __asm__ __volatile__("yield")
#else
#define PAUSE() ((void)0)
#endif

/* How long an idle thread (or the waiting caller) spins before it sleeps: longer than the
 * Python between two layers of a UNet step, short enough that an idle server sleeps at once. */
#define SPIN_NS 200000L
#define MAX_THREADS 256

typedef int (*set_threads_fn)(int);
typedef void (*set_omp_fn)(int);
typedef int (*get_omp_fn)(void);

static int threads = 1;
/* The calling thread's own GEMM thread counts: MKL's, and that of the OpenMP runtime oneDNN's
 * GEMMs run on (where oneDNN computes the bf16 products); each may be NULL. */
static set_threads_fn set_blas_threads;
static set_omp_fn set_omp_threads;
static get_omp_fn get_omp_threads;

struct gemm_threads {
    int blas, omp;
};

/* Limits this thread's GEMMs to one thread; returns what restore_gemm_threads takes back. */
static struct gemm_threads one_gemm_thread(void) {
    struct gemm_threads previous = {0, 0};
    if (set_blas_threads != NULL)
        previous.blas = set_blas_threads(1);
    if (set_omp_threads != NULL) {
        previous.omp = get_omp_threads();
        set_omp_threads(1);
    }
    return previous;
}

static void restore_gemm_threads(struct gemm_threads previous) {
    if (set_blas_threads != NULL)
        set_blas_threads(previous.blas);
    if (set_omp_threads != NULL)
        set_omp_threads(previous.omp);
}
static _Atomic unsigned generation;  /* bumped for each job */
static _Atomic int pending;          /* pool threads yet to finish the current job */
static _Atomic int sleepers;         /* pool threads asleep on `wake` */
static pool_task job_task;
static void *job_context;
static ptrdiff_t job_total;
static int job_chunks;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t busy = PTHREAD_MUTEX_INITIALIZER; /* one job at a time */
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER, finished = PTHREAD_COND_INITIALIZER;

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Spins until done(arg) or SPIN_NS have passed; returns done(arg). */
static int spin_until(int (*done)(unsigned), unsigned arg) {
    long deadline = now_ns() + SPIN_NS;
    for (unsigned n = 1; !done(arg); n++) {
        PAUSE();
        if (n % 64 == 0) {
            if (now_ns() > deadline)
                return 0;
            sched_yield();
        }
    }
    return 1;
}

static int job_posted(unsigned seen) { return atomic_load_explicit(&generation, memory_order_acquire) != seen; }
static int job_done(unsigned unused) { (void)unused; return atomic_load_explicit(&pending, memory_order_acquire) == 0; }

static void run_chunk(int i) {
    if (i < job_chunks)
        job_task(job_context, job_total * i / job_chunks, job_total * (i + 1) / job_chunks);
}

static void *pool_thread(void *arg) {
    int i = (int)(intptr_t)arg;
    one_gemm_thread();
    unsigned seen = 0;
    for (;;) {
        if (!spin_until(job_posted, seen)) {
            pthread_mutex_lock(&lock);
            atomic_fetch_add(&sleepers, 1);
            while (!job_posted(seen))
                pthread_cond_wait(&wake, &lock);
            atomic_fetch_sub(&sleepers, 1);
            pthread_mutex_unlock(&lock);
        }
        seen = atomic_load(&generation);
        run_chunk(i);
        if (atomic_fetch_sub_explicit(&pending, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&lock);
            pthread_cond_signal(&finished);
            pthread_mutex_unlock(&lock);
        }
    }
    return NULL;
}

/* A forked child has none of the parent's pool threads: it runs its jobs on one thread. */
static void forked_child(void) { threads = 1; }

/* Starts count - 1 pool threads (once; later calls change nothing) and returns the pool's size.
 * `set_local_threads` is MKL's MKL_Set_Num_Threads_Local, `set_omp` and `get_omp` OpenMP's
 * omp_set_num_threads and omp_get_max_threads; each may be NULL. */
int pool_start(int count, void *set_local_threads, void *set_omp, void *get_omp) {
    static int started;
    pthread_mutex_lock(&lock); /* two first callers at once start one pool */
    if (!started) {
        started = 1;
        set_blas_threads = (set_threads_fn)set_local_threads;
        set_omp_threads = (set_omp_fn)set_omp;
        get_omp_threads = set_omp != NULL ? (get_omp_fn)get_omp : NULL;
        if (get_omp_threads == NULL)
            set_omp_threads = NULL;
        pthread_atfork(NULL, NULL, forked_child);
        count = count > MAX_THREADS ? MAX_THREADS : count;
        int made = 1;
        for (; made < count; made++) {
            pthread_t thread;
            if (pthread_create(&thread, NULL, pool_thread, (void *)(intptr_t)made) != 0)
                break;
            pthread_detach(thread);
        }
        threads = made;
    }
    pthread_mutex_unlock(&lock);
    return threads;
}

int pool_threads(void) { return threads; }

void pool_run(pool_task task, void *context, ptrdiff_t total, ptrdiff_t values) {
    /* Alone, small, or while a job (this thread's or another's) holds the pool: all here. */
    if (threads < 2 || total < 2 || values < POOL_MIN_VALUES || pthread_mutex_trylock(&busy) != 0) {
        task(context, 0, total);
        return;
    }
    job_task = task;
    job_context = context;
    job_total = total;
    job_chunks = total < threads ? (int)total : threads;
    atomic_store(&pending, threads - 1);
    atomic_fetch_add(&generation, 1); /* sequentially consistent: ordered before reading `sleepers` */
    if (atomic_load(&sleepers) > 0) {
        pthread_mutex_lock(&lock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&lock);
    }
    struct gemm_threads previous = one_gemm_thread();
    run_chunk(0);
    restore_gemm_threads(previous);
    if (!spin_until(job_done, 0)) {
        pthread_mutex_lock(&lock);
        while (!job_done(0))
            pthread_cond_wait(&finished, &lock);
        pthread_mutex_unlock(&lock);
    }
    pthread_mutex_unlock(&busy);
}
