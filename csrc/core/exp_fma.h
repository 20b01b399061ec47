/*
 * exp_fma.h — e^x and silu(g)·u from correctly rounded operations only (products, fmaf, a division, rintf, exact
 * scalings by powers of 2), so that a GPU kernel and host C give the same bits: the CUDA backend's fused gate·up
 * and silu_mul (eltwise.cuh) and the host's share of decode's experts (cuda/host_ffn.c) call these. CUDA's own
 * expf ends in an approximate ex2 that host code cannot reproduce. Within 1 ulp of e^x (tests/test_ops.py checks
 * silu_mul against float64; a sweep of every 8th float of its range measured 0.93 ulp at most). Compile host users with -ffp-contract=off (every fma here is explicit).
 */
#ifndef FM_EXP_FMA_H
#define FM_EXP_FMA_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define FM_HD __host__ __device__ __forceinline__
#else
#define FM_HD static inline
#endif

/* 2^n as a float, n in [-126, 127] (exact) */
FM_HD float fm_pow2i(int n) {
    const uint32_t u = (uint32_t)(n + 127) << 23;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* e^x: x = n·ln2 + r (n = rint(x·log2 e), r by two fmas with ln2 in two parts, |r| <= 0.35), e^r by a degree-7
 * polynomial (Horner, fmaf), times 2^n in two exact steps (n can pass 127 or go below -126 on the way to a
 * subnormal, an infinity or 0). NaN in, NaN out. */
FM_HD float fm_exp_fma(float x) {
    if (!(x > -104.0f)) return x != x ? x : 0.0f; /* NaN, or below the smallest subnormal's log */
    if (x > 89.0f) return INFINITY;
    const float n = rintf(x * 1.44269504088896341f);
    float r = fmaf(n, -0.693145751953125f, x); /* ln2's top bits: n·this is exact */
    r = fmaf(n, -1.42860682030941723212e-6f, r);
    float p = 1.98412698e-4f; /* 1/5040 */
    p = fmaf(p, r, 1.38888889e-3f);
    p = fmaf(p, r, 8.33333333e-3f);
    p = fmaf(p, r, 4.1666667e-2f);
    p = fmaf(p, r, 1.6666667e-1f);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    const int k = (int)n, k1 = k / 2;
    return p * fm_pow2i(k1) * fm_pow2i(k - k1);
}

/* silu(g)·u = g / (1 + e^-g) · u, rounded after each operation */
FM_HD float fm_silu_mul_fma(float g, float u) {
    const float e = fm_exp_fma(-g), d = 1.0f + e, s = g / d;
    return s * u;
}

#endif /* FM_EXP_FMA_H */
