/* threads.c — the compute thread pool. Workers sleep on a condition variable between jobs. */
#define _GNU_SOURCE
#include "threads.h"

#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

enum { MAX_THREADS = 256 };

static struct {
    pthread_mutex_t mu;       /* guards the fields below */
    pthread_cond_t wake, idle;
    pthread_mutex_t call_mu;  /* one fm_parallel_for at a time */
    pthread_t threads[MAX_THREADS];
    int n_workers, wanted, started;
    unsigned long generation; /* bumped per job */
    fm_task_fn fn;
    void *ctx;
    int n_tasks, next, busy; /* next task; workers still inside the current job */
    int stop;
} P = {.mu = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER, .idle = PTHREAD_COND_INITIALIZER,
       .call_mu = PTHREAD_MUTEX_INITIALIZER};

/* Take and run tasks of the current job until none are left (caller holds P.mu; released while running). */
static void run_tasks(void) {
    while (P.next < P.n_tasks) {
        const int i = P.next++;
        fm_task_fn fn = P.fn;
        void *ctx = P.ctx;
        pthread_mutex_unlock(&P.mu);
        fn(ctx, i);
        pthread_mutex_lock(&P.mu);
    }
}

static void *worker(void *arg) {
    (void)arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&P.mu);
    for (;;) {
        while (!P.stop && P.generation == seen) pthread_cond_wait(&P.wake, &P.mu);
        if (P.stop) break;
        seen = P.generation;
        P.busy++;
        run_tasks();
        if (--P.busy == 0) pthread_cond_broadcast(&P.idle);
    }
    pthread_mutex_unlock(&P.mu);
    return NULL;
}

static void stop_workers(void) {
    pthread_mutex_lock(&P.mu);
    P.stop = 1;
    pthread_cond_broadcast(&P.wake);
    pthread_mutex_unlock(&P.mu);
    for (int i = 0; i < P.n_workers; i++) pthread_join(P.threads[i], NULL);
    P.n_workers = 0;
    P.stop = 0;
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
        if (pthread_create(&P.threads[i], NULL, worker, NULL) != 0) break;
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
    pthread_mutex_lock(&P.call_mu);
    ensure_started();
    const int n = P.n_workers + 1;
    pthread_mutex_unlock(&P.call_mu);
    return n;
}

void fm_parallel_for(int n, fm_task_fn fn, void *ctx) {
    if (n <= 0) return;
    pthread_mutex_lock(&P.call_mu);
    ensure_started();
    if (n == 1 || P.n_workers == 0) {
        pthread_mutex_unlock(&P.call_mu);
        for (int i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    pthread_mutex_lock(&P.mu);
    P.fn = fn;
    P.ctx = ctx;
    P.n_tasks = n;
    P.next = 0;
    P.generation++;
    pthread_cond_broadcast(&P.wake);
    run_tasks();
    while (P.busy > 0) pthread_cond_wait(&P.idle, &P.mu);
    pthread_mutex_unlock(&P.mu);
    pthread_mutex_unlock(&P.call_mu);
}
