/* util.c — errors, aligned allocation, timing, CRC-32. */
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
    enum { HUGE = 2u << 20 };
    void *p = NULL;
    bytes = bytes ? (bytes + HUGE - 1) & ~(size_t)(HUGE - 1) : HUGE;
    if (posix_memalign(&p, HUGE, bytes) != 0) return NULL;
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

/* Slicing-by-8 CRC-32 (reflected polynomial 0xEDB88320), tables built on first use. */
static uint32_t g_crc_table[8][256];
static int g_crc_ready;

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        g_crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) g_crc_table[t][i] = (g_crc_table[t - 1][i] >> 8) ^ g_crc_table[0][g_crc_table[t - 1][i] & 0xff];
    __atomic_store_n(&g_crc_ready, 1, __ATOMIC_RELEASE);
}

uint32_t fm_crc32(uint32_t crc, const void *data, size_t n) {
    if (!__atomic_load_n(&g_crc_ready, __ATOMIC_ACQUIRE)) crc_init(); /* idempotent: a race only rebuilds */
    const uint8_t *p = (const uint8_t *)data;
    crc = ~crc;
    while (n >= 8) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4);
        memcpy(&hi, p + 4, 4);
        lo ^= crc;
        crc = g_crc_table[7][lo & 0xff] ^ g_crc_table[6][(lo >> 8) & 0xff] ^ g_crc_table[5][(lo >> 16) & 0xff] ^
              g_crc_table[4][lo >> 24] ^ g_crc_table[3][hi & 0xff] ^ g_crc_table[2][(hi >> 8) & 0xff] ^
              g_crc_table[1][(hi >> 16) & 0xff] ^ g_crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) crc = g_crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}
