/* pool.c: a persistent pool of worker threads for the C core's own kernels
 * (the bf16 matrix-vector products of decode, and bf16 -> f32 blocks of
 * prefill), which OpenBLAS's pool does not run.
 *
 * An idle worker spins for up to SPIN_NS (a decode step calls the pool
 * ~150 times, microseconds apart, and waking a sleeping thread costs tens
 * of microseconds), then sleeps on a condition variable, so it takes no
 * time from OpenBLAS's threads during a long sgemm. The caller waits for
 * its workers the same way. One caller at a time uses the
 * pool; a second, concurrent caller (another runtime in another Python
 * thread) runs its job on its own thread instead of waiting. After fork()
 * the child starts with no workers and makes its own on first use.
 */
#include <pthread.h>
#include <stdint.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#include "pcasurgery.h"

enum { POOL_MAX = 64 };
static const long SPIN_NS = 100000; /* 0.1 ms */

static struct {
    pthread_mutex_t mu;   /* guards everything below but busy */
    pthread_cond_t go;    /* a new job (gen changed) */
    pthread_cond_t done;  /* remaining reached 0 */
    pthread_mutex_t busy; /* held by the one caller running a job */
    int n_workers;        /* workers started: ids 1..n_workers */
    unsigned long gen;    /* job generation (atomic: read unlocked while spinning) */
    unsigned long start_gen[POOL_MAX + 1];
    int remaining;        /* workers still running the current job (atomic, as gen) */
    pcs_task_fn fn;
    void *arg;
    int n;                /* threads of the current job, caller included */
    int atfork_set;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
          PTHREAD_MUTEX_INITIALIZER};

static long elapsed_ns(const struct timespec *t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) * 1000000000L + (t.tv_nsec - t0->tv_nsec);
}

static unsigned long load_gen(void)
{
    return __atomic_load_n(&pool.gen, __ATOMIC_ACQUIRE);
}

/* Spin for at most SPIN_NS until a new job (gen != seen) or, wait_done,
 * until the job's workers are done. Unlocked: only a hint, the caller
 * re-checks under pool.mu. */
static void spin(unsigned long seen, int wait_done)
{
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (unsigned i = 1;; i++) {
        if (wait_done ? __atomic_load_n(&pool.remaining, __ATOMIC_ACQUIRE) == 0
                      : load_gen() != seen)
            return;
        CPU_RELAX();
        if (i % 64 == 0 && elapsed_ns(&t0) > SPIN_NS)
            return;
    }
}

static void *worker(void *p)
{
    const int id = (int)(intptr_t)p;
    pthread_mutex_lock(&pool.mu);
    unsigned long seen = pool.start_gen[id];
    for (;;) {
        if (load_gen() == seen) {
            pthread_mutex_unlock(&pool.mu);
            spin(seen, 0);
            pthread_mutex_lock(&pool.mu);
        }
        while (load_gen() == seen)
            pthread_cond_wait(&pool.go, &pool.mu);
        seen = load_gen();
        if (id < pool.n) {
            pcs_task_fn fn = pool.fn;
            void *arg = pool.arg;
            int n = pool.n;
            pthread_mutex_unlock(&pool.mu);
            fn(arg, id, n);
            pthread_mutex_lock(&pool.mu);
            if (__atomic_sub_fetch(&pool.remaining, 1, __ATOMIC_ACQ_REL) == 0)
                pthread_cond_signal(&pool.done);
        }
    }
    return NULL;
}

/* In a forked child the workers do not exist: start over. */
static void pool_atfork_child(void)
{
    pthread_mutex_init(&pool.mu, NULL);
    pthread_mutex_init(&pool.busy, NULL);
    pthread_cond_init(&pool.go, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.n_workers = 0;
    pool.remaining = 0;
}

static void run_serial(pcs_task_fn fn, void *arg, int n)
{
    for (int i = 0; i < n; i++)
        fn(arg, i, n);
}

void pcs_parallel(pcs_task_fn fn, void *arg, int n)
{
    if (n > POOL_MAX + 1)
        n = POOL_MAX + 1;
    if (n <= 1) {
        fn(arg, 0, 1);
        return;
    }
    if (pthread_mutex_trylock(&pool.busy) != 0) { /* another caller has the pool */
        run_serial(fn, arg, n);
        return;
    }
    pthread_mutex_lock(&pool.mu);
    if (!pool.atfork_set)
        pool.atfork_set = pthread_atfork(NULL, NULL, pool_atfork_child) == 0;
    while (pool.n_workers < n - 1) {
        const int id = pool.n_workers + 1;
        pthread_t t;
        pool.start_gen[id] = load_gen();
        if (pthread_create(&t, NULL, worker, (void *)(intptr_t)id) != 0)
            break;
        pthread_detach(t);
        pool.n_workers = id;
    }
    if (pool.n_workers < n - 1) /* threads could not start: the rest run here */
        n = pool.n_workers + 1;
    pool.fn = fn;
    pool.arg = arg;
    pool.n = n;
    __atomic_store_n(&pool.remaining, n - 1, __ATOMIC_RELEASE);
    __atomic_store_n(&pool.gen, pool.gen + 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&pool.go);
    pthread_mutex_unlock(&pool.mu);
    fn(arg, 0, n);
    spin(0, 1);
    pthread_mutex_lock(&pool.mu);
    while (__atomic_load_n(&pool.remaining, __ATOMIC_ACQUIRE) > 0)
        pthread_cond_wait(&pool.done, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&pool.busy);
}
