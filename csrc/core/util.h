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

/* 1 when host code (the sampler) should take its AVX2 copy: the CPU's kernel variant, as the CPU backend
 * chose it or a test forced it (csrc/backend/cpu/ops.c defines it). */
int fm_cpu_use_avx2(void);
void fm_free(void *p);
/* Weights streamed every token (dense weights, the expert cache): 2 MiB aligned and, on Linux, advised
 * into transparent huge pages, so the stream crosses a page (TLB entry, prefetch boundary) every 2 MiB,
 * not every 4 KiB. Not zeroed: the caller fills it. fm_free releases it. */
void *fm_alloc_weights(size_t bytes);
/* A scratch buffer kept across calls that only grows, so a hot path does not fault in and zero fresh
 * pages on every call: *buf with room for `bytes`, reallocated to grow_to (>= bytes) when smaller. The
 * caller owns *buf and *cap (thread-local where threads call it). NULL, with *cap 0, when that fails. */
void *fm_grow(void **buf, size_t *cap, size_t bytes, size_t grow_to);

double fm_now(void); /* monotonic seconds */
/* max(l[0..n)) ignoring NaN (-inf when all are NaN); the greedy token: the lowest id holding it (0 when all are
 * NaN). Both the sampler's and the CPU backend's argmax op. */
float fm_max_f32(const float *l, int n);
int32_t fm_argmax_f32(const float *l, int n);

uint32_t fm_crc32(uint32_t crc, const void *data, size_t n); /* IEEE, as zlib.crc32 (crc32.c) */
uint32_t fm_crc32_portable(uint32_t crc, const void *data, size_t n); /* the same by table only (tests) */

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

/* exp(x), relative error ~2e-7; exactly 1 at 0, 0 below -87 (so exp(-inf) = 0), exp(88) above 88.
 * Cody-Waite range reduction and a degree-6 polynomial, with no calls and no branches, so that loops of
 * it vectorise (libm's expf does not): silu, sigmoid and the sampler's softmax. */
static inline float fm_exp(float x) {
    const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer, held in the low bits */
    const float t = xc * 1.44269504088896341f + magic;
    const float kf = t - magic;
    const float r = (xc - kf * 0.693145751953125f) - kf * 1.428606765330187045e-06f;
    float p = 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t tb;
    memcpy(&tb, &t, 4);
    const uint32_t sb = (tb - 0x4B400000u + 127u) << 23; /* 2^kf */
    float scale;
    memcpy(&scale, &sb, 4);
    const float v = p * scale;
    return x < -87.0f ? 0.0f : v;
}

static inline float fm_silu(float x) { return x / (1.0f + fm_exp(-x)); }
static inline float fm_sigmoid(float x) { return 1.0f / (1.0f + fm_exp(-x)); }
static inline float fm_softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

/* Loops of fm_exp and friends run 8 wide where the CPU has AVX2. On x86-64 each such function is an
 * FM_INLINE body compiled twice, once FM_AVX2_COPY and once plain, and the caller picks with
 * fm_cpu_use_avx2() (csrc/backend/ops.h) at each call: a forced "scalar" kernel variant then runs the
 * plain copy too, so the tests check both (an ifunc clone, picked at load, would ignore it). */
#define FM_INLINE static inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__)
#define FM_HAVE_AVX2_COPY 1
#define FM_AVX2_COPY __attribute__((target("avx2")))
#endif

#endif /* FM_UTIL_H */
