/* util.h — small shared helpers: errors, allocation, number conversions, timing. */
#ifndef FM_UTIL_H
#define FM_UTIL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "flashmoe.h"

/* Record an error message (printf-style) for fm_last_error() and return the status. */
fm_status fm_fail(fm_status st, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* 64-byte aligned, zeroed allocation; NULL on failure. fm_free(NULL) is a no-op. */
void *fm_alloc(size_t bytes);
void fm_free(void *p);
/* Weights streamed every token (dense weights, the expert cache): 2 MiB aligned and, on Linux, advised
 * into transparent huge pages, so the stream crosses a page (TLB entry, prefetch boundary) every 2 MiB,
 * not every 4 KiB. Not zeroed: the caller fills it. fm_free releases it. */
void *fm_alloc_weights(size_t bytes);

double fm_now(void); /* monotonic seconds */

uint32_t fm_crc32(uint32_t crc, const void *data, size_t n); /* IEEE, as zlib.crc32 */

static inline float fm_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float fm_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        u = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        u = sign;
    } else { /* subnormal: renormalise */
        exp = 113;
        while (!(mant & 0x400)) {
            mant <<= 1;
            exp--;
        }
        u = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float fm_silu(float x) { return x / (1.0f + expf(-x)); }
static inline float fm_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline float fm_softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

#endif /* FM_UTIL_H */
