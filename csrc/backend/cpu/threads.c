/*
 * threads.c — the compute thread pool.
 *
 * A decode step issues hundreds of small parallel jobs (every matvec of every expert), a few tens of
 * microseconds each, so waking sleeping workers through a condition variable per job (tens of
 * microseconds of futex and scheduler latency) would cost as much as the work. Workers therefore spin
 * on a job counter for a while after each job (FM_SPIN_SECONDS) and only then sleep on the condition
 * variable; the caller spins until the workers are done. Between bursts (waiting for a disk read, or
 * for the next prompt) the workers sleep and use no CPU.
 */
#define _GNU_SOURCE
#include "threads.h"

#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

enum { MAX_THREADS = 256 };
#define FM_SPIN_SECONDS 0.002 /* how long an idle worker polls for the next job before it sleeps */

typedef struct {
    unsigned long generation; /* the job generation when the worker was created */
    int index;                /* its fm_thread_index() */
} worker_arg;

static struct {
    pthread_mutex_t mu; /* with wake: sleeping workers */
    pthread_cond_t wake;
    pthread_mutex_t call_mu; /* one fm_parallel_for at a time */
    pthread_t threads[MAX_THREADS];
    worker_arg args[MAX_THREADS];
    int n_workers, wanted, started;
    fm_task_fn fn; /* the current job, published by the release increment of generation */
    void *ctx;
    int n_tasks;
    atomic_ulong generation; /* bumped per job */
    atomic_int next;         /* next task of the current job */
    atomic_int pending;      /* workers not yet done with the current job */
    atomic_int sleeping;     /* workers waiting on `wake` */
    atomic_int stop;
} P = {.mu = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER, .call_mu = PTHREAD_MUTEX_INITIALIZER};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static _Thread_local int tl_in_task; /* this thread is running a task: a nested call runs inline */
static _Thread_local int tl_index;   /* 0 outside the pool, 1 .. n_workers for the workers */

int fm_thread_index(void) { return tl_index; }

static void run_tasks(void) {
    tl_in_task = 1;
    for (int i; (i = atomic_fetch_add(&P.next, 1)) < P.n_tasks;) P.fn(P.ctx, i);
    tl_in_task = 0;
}

/* Wait until generation moves past `seen` (or stop): spin first, then sleep. */
static void wait_for_job(unsigned long seen) {
    double until = 0.0;
    for (unsigned spins = 0; atomic_load(&P.generation) == seen && !atomic_load(&P.stop); spins++) {
        if ((spins & 1023) == 0) { /* read the clock now and then */
            const double t = now();
            if (until == 0.0) until = t + FM_SPIN_SECONDS;
            else if (t > until) break;
        }
        cpu_relax();
    }
    if (atomic_load(&P.generation) != seen || atomic_load(&P.stop)) return;
    pthread_mutex_lock(&P.mu);
    atomic_fetch_add(&P.sleeping, 1); /* seq_cst: the caller's generation store or this store is seen */
    while (atomic_load(&P.generation) == seen && !atomic_load(&P.stop)) pthread_cond_wait(&P.wake, &P.mu);
    atomic_fetch_sub(&P.sleeping, 1);
    pthread_mutex_unlock(&P.mu);
}

static void *worker(void *arg) {
    const worker_arg *a = (const worker_arg *)arg;
    unsigned long seen = a->generation;
    tl_index = a->index;
    for (;;) {
        wait_for_job(seen);
        if (atomic_load(&P.stop)) break;
        seen = atomic_load(&P.generation);
        run_tasks();
        atomic_fetch_sub(&P.pending, 1);
    }
    return NULL;
}

static void stop_workers(void) {
    pthread_mutex_lock(&P.mu);
    atomic_store(&P.stop, 1);
    pthread_cond_broadcast(&P.wake);
    pthread_mutex_unlock(&P.mu);
    for (int i = 0; i < P.n_workers; i++) pthread_join(P.threads[i], NULL);
    P.n_workers = 0;
    atomic_store(&P.stop, 0);
}

static void ensure_started(void) {
    if (P.started) return;
    P.started = 1;
    if (P.wanted <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        P.wanted = n > 0 ? (int)n : 1;
    }
    const int workers = P.wanted - 1 < MAX_THREADS ? P.wanted - 1 : MAX_THREADS;
    for (int i = 0; i < workers; i++) {
        P.args[i] = (worker_arg){atomic_load(&P.generation), i + 1};
        if (pthread_create(&P.threads[i], NULL, worker, &P.args[i]) != 0) break;
        P.n_workers++;
    }
}

void fm_threads_set(int n) {
    pthread_mutex_lock(&P.call_mu);
    if (P.started) stop_workers();
    P.started = 0;
    P.wanted = n;
    pthread_mutex_unlock(&P.call_mu);
}

int fm_threads_get(void) {
    if (tl_in_task) return 1; /* inside a task, this thread is all there is (and call_mu is held) */
    pthread_mutex_lock(&P.call_mu);
    ensure_started();
    const int n = P.n_workers + 1;
    pthread_mutex_unlock(&P.call_mu);
    return n;
}

void fm_parallel_for(int n, fm_task_fn fn, void *ctx) {
    if (n <= 0) return;
    if (tl_in_task) { /* called from inside a task (an expert's matvec): the pool is busy with the outer job */
        for (int i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    pthread_mutex_lock(&P.call_mu);
    ensure_started();
    if (n == 1 || P.n_workers == 0) {
        pthread_mutex_unlock(&P.call_mu);
        for (int i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    P.fn = fn;
    P.ctx = ctx;
    P.n_tasks = n;
    atomic_store(&P.next, 0);
    atomic_store(&P.pending, P.n_workers);
    atomic_fetch_add(&P.generation, 1); /* publishes the job (seq_cst) */
    if (atomic_load(&P.sleeping) > 0) {
        pthread_mutex_lock(&P.mu);
        pthread_cond_broadcast(&P.wake);
        pthread_mutex_unlock(&P.mu);
    }
    run_tasks();
    while (atomic_load(&P.pending) > 0) cpu_relax();
    pthread_mutex_unlock(&P.call_mu);
}
