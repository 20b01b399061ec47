/* util.c — errors, aligned allocation, timing. (CRC-32: crc32.c) */
#define _GNU_SOURCE /* MADV_HUGEPAGE */
#include "util.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

static _Thread_local char g_error[1024];

const char *fm_last_error(void) { return g_error; }

fm_status fm_fail(fm_status st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_error, sizeof g_error, fmt, ap);
    va_end(ap);
    return st;
}

void *fm_alloc(size_t bytes) {
    void *p = NULL;
    if (bytes == 0) bytes = 64;
    bytes = (bytes + 63) & ~(size_t)63;
    if (posix_memalign(&p, 64, bytes) != 0) return NULL;
    memset(p, 0, bytes);
    return p;
}

void fm_free(void *p) { free(p); }

void *fm_alloc_weights(size_t bytes) {
    enum { HUGE_PAGE = 2u << 20 }; /* not HUGE: a macro of <math.h> on macOS */
    void *p = NULL;
    bytes = bytes ? (bytes + HUGE_PAGE - 1) & ~(size_t)(HUGE_PAGE - 1) : HUGE_PAGE;
    if (posix_memalign(&p, HUGE_PAGE, bytes) != 0) return NULL;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, bytes, MADV_HUGEPAGE); /* advice only: where refused, 4 KiB pages as before */
#endif
    return p;
}

void *fm_grow(void **buf, size_t *cap, size_t bytes, size_t grow_to) {
    if (bytes > *cap) {
        fm_free(*buf);
        *buf = fm_alloc(grow_to);
        *cap = *buf ? grow_to : 0;
    }
    return *buf;
}

double fm_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
