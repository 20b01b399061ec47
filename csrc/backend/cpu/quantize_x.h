/*
 * quantize_x.h — the int8 activations of cpu.h, portable C: x[n] → xq, xd, xqs per group of gs (a multiple of 32).
 * The CPU's kernels take them (ops.c; matmul_avx2.c's quantizer gives the same numbers) and so does the CUDA
 * backend's host replay of its kernels (cuda/host_ffn.c), whose fm_quantize_x kernel rounds the same way.
 */
#ifndef FM_CPU_QUANTIZE_X_H
#define FM_CPU_QUANTIZE_X_H

#include <math.h>
#include <stdint.h>

/* m = max|x_g|, xq = rint(x·(127/m)) (the product rounded, then half to even), xd = m/127, xqs = Σ xq; q4's SIMD
 * kernels take xq permuted per 32-element block (its 16 even elements, then its 16 odd ones: the order of a packed
 * byte's low and high nibbles) */
static inline void fm_quantize_x_c(const float *x, int n, int gs, int permute, int8_t *xq, float *xd, float *xqs) {
    for (int g = 0; g < n / gs; g++) {
        const float *xg = x + g * gs;
        float amax = 0.0f;
        for (int i = 0; i < gs; i++) amax = fabsf(xg[i]) > amax ? fabsf(xg[i]) : amax;
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int i = 0; i < gs; i++) {
            const int v = (int)rintf(xg[i] * inv); /* |v| <= 127: |x·inv| <= 127 up to one rounding */
            const int j = permute ? (i & ~31) + ((i & 1) ? 16 : 0) + ((i & 31) >> 1) : i;
            xq[g * gs + j] = (int8_t)v;
            sum += v;
        }
        xd[g] = amax / 127.0f;
        xqs[g] = (float)sum;
    }
}

#endif /* FM_CPU_QUANTIZE_X_H */
