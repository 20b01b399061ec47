/*
 * eltwise.cuh — element-wise formulas that kernels of more than one file compute (eltwise.cu's ops, matmul.cu's
 * folded shared expert), written once: the same source inlined gives the same instructions (nvcc's contraction of
 * a * b + c into an FMA included), so those kernels agree bit for bit.
 */
#ifndef FM_CUDA_ELTWISE_CUH
#define FM_CUDA_ELTWISE_CUH

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "../../core/exp_fma.h"

__device__ __forceinline__ float fmc_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* silu(g)·u for eltwise.cu's silu_mul_k and matmul.cu's and matmul_mma.cu's fused gate·up: exp_fma.h's, whose bits
 * host code reproduces (host_ffn.c, the host's share of decode's experts) */
__device__ __forceinline__ float fmc_silu_mul(float g, float u) { return fm_silu_mul_fma(g, u); }

/* o + Σ_j w[j]·ye[row[j], c], j in order (moe_combine: a token's k choices, w and row its [k] entries) */
__device__ __forceinline__ float fmc_combine(float o, const float *ye, const int32_t *row, const float *w, int k,
                                             int h, size_t c) {
    for (int j = 0; j < k; j++) o += w[j] * ye[(size_t)row[j] * h + c];
    return o;
}

#endif /* FM_CUDA_ELTWISE_CUH */
