/*
 * threads.h — a persistent pool of compute threads (pthreads), shared by every model in the process.
 *
 * fm_parallel_for(n, fn, ctx) runs fn(ctx, i) for i in [0, n) on the pool plus the calling thread
 * and returns when all are done. Tasks are handed out with an atomic counter, so uneven tasks
 * balance. Calls from several threads at once are serialised; a call from inside a task runs its tasks
 * inline on that thread. I/O threads are separate (expert store).
 */
#ifndef FM_THREADS_H
#define FM_THREADS_H

typedef void (*fm_task_fn)(void *ctx, int i);

/* Number of threads that run tasks (workers + the caller); default: the online CPUs. */
void fm_threads_set(int n);
int fm_threads_get(void);

void fm_parallel_for(int n, fm_task_fn fn, void *ctx);

/* The calling thread's index in the pool: 0 for a thread outside it (the one calling fm_parallel_for),
 * 1 .. fm_threads_get() - 1 for the workers. Tasks use it to pick a per-thread scratch. */
int fm_thread_index(void);

#endif /* FM_THREADS_H */
