/* The one thread pool of the native kernels. Workers persist between calls and spin briefly before sleeping:
 * a decode step calls the kernels back to back, and a fresh pthread per call costs as much as a small product. */
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>

#include "spz.h"

#define SPIN_ROUNDS 4000 /* pause instructions before an idle worker sleeps on the condition variable */

typedef struct {
    pthread_mutex_t dispatch; /* one job at a time (several Python threads may call in without the GIL) */
    pthread_mutex_t mu;       /* guards sleeping on `wake` */
    pthread_cond_t wake;
    int workers;              /* started worker threads; worker i runs part i (the caller runs part 0) */
    uint64_t generation;      /* bumped per job (atomic) */
    SpzPartFn fn;
    void *ctx;
    int parts;
    int pending; /* workers that have not finished the current job (atomic) */
} Pool;

static Pool POOL = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, NULL, NULL, 0, 0};

static inline void cpu_relax(void) {
#ifdef SPZ_X86
    _mm_pause();
#endif
}

/* A worker's start: its part number and the last generation before it existed (it must run the next one). */
typedef struct {
    int id;
    uint64_t seen;
} WorkerStart;

static void *pool_worker(void *arg) {
    WorkerStart start = *(WorkerStart *)arg;
    free(arg);
    uint64_t seen = start.seen;
    for (;;) {
        uint64_t g;
        int spins = 0;
        while ((g = __atomic_load_n(&POOL.generation, __ATOMIC_ACQUIRE)) == seen) {
            if (++spins < SPIN_ROUNDS) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&POOL.mu);
            while ((g = __atomic_load_n(&POOL.generation, __ATOMIC_ACQUIRE)) == seen)
                pthread_cond_wait(&POOL.wake, &POOL.mu);
            pthread_mutex_unlock(&POOL.mu);
            break;
        }
        seen = g;
        if (start.id < POOL.parts) POOL.fn(POOL.ctx, start.id, POOL.parts);
        __atomic_fetch_sub(&POOL.pending, 1, __ATOMIC_RELEASE);
    }
    return NULL;
}

/* A forked child has none of the parent's workers: it starts again from an empty pool. */
static void pool_after_fork(void) {
    pthread_mutex_init(&POOL.dispatch, NULL);
    pthread_mutex_init(&POOL.mu, NULL);
    pthread_cond_init(&POOL.wake, NULL);
    POOL.workers = 0;
    POOL.pending = 0;
}

void spz_run_parts(SpzPartFn fn, void *ctx, int parts) {
    if (parts > SPZ_MAX_THREADS) parts = SPZ_MAX_THREADS;
    if (parts <= 1) {
        fn(ctx, 0, 1);
        return;
    }
    pthread_mutex_lock(&POOL.dispatch);
    while (POOL.workers < parts - 1) {
        pthread_t id;
        WorkerStart *start = malloc(sizeof *start);
        if (!start) break;
        *start = (WorkerStart){POOL.workers + 1, POOL.generation}; /* generation changes only under `dispatch` */
        if (pthread_create(&id, NULL, pool_worker, start) != 0) {
            free(start);
            break;
        }
        pthread_detach(id);
        POOL.workers++;
    }
    if (parts > POOL.workers + 1) parts = POOL.workers + 1; /* could not start more threads */
    POOL.fn = fn;
    POOL.ctx = ctx;
    POOL.parts = parts;
    __atomic_store_n(&POOL.pending, POOL.workers, __ATOMIC_RELAXED);
    pthread_mutex_lock(&POOL.mu);
    __atomic_fetch_add(&POOL.generation, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&POOL.wake);
    pthread_mutex_unlock(&POOL.mu);
    fn(ctx, 0, parts);
    for (int spins = 0; __atomic_load_n(&POOL.pending, __ATOMIC_ACQUIRE); spins++) {
        if (spins < SPIN_ROUNDS) cpu_relax();
        else sched_yield();
    }
    pthread_mutex_unlock(&POOL.dispatch);
}

void spz_run_parts_nogil(SpzPartFn fn, void *ctx, int parts) {
    Py_BEGIN_ALLOW_THREADS
    spz_run_parts(fn, ctx, parts < 1 ? 1 : parts);
    Py_END_ALLOW_THREADS
}

/* ------------------------------------------------------------------ per-thread scratch */

typedef struct {
    size_t bytes;
    unsigned char data[];
} Scratch;

static pthread_key_t SCRATCH_KEY;

void *spz_scratch(size_t bytes) {
    Scratch *s = pthread_getspecific(SCRATCH_KEY);
    if (s && s->bytes >= bytes) return s->data;
    free(s);
    s = calloc(1, sizeof *s + bytes);
    pthread_setspecific(SCRATCH_KEY, s);
    if (!s) return NULL;
    s->bytes = bytes;
    return s->data;
}

void spz_pool_init(void) {
    pthread_key_create(&SCRATCH_KEY, free);
    pthread_atfork(NULL, NULL, pool_after_fork);
}
