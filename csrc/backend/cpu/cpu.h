/*
 * cpu.h — the CPU backend's kernels (portable C, AVX2, AVX-512 VNNI, NEON, NEON dot product) and the
 * choice of variant. The core reaches them only through the backend interface (../backend.h); tests and
 * benchmarks call them directly.
 *
 * Shapes are row-major; T is the number of tokens in the chunk. Activations are fp32.
 */
#ifndef FM_CPU_H
#define FM_CPU_H

#include <stdint.h>

#include "../tensor.h"

/* CPU kernel variants: "scalar" (always), "avx2" (x86-64 with AVX2 + FMA), "avx512" (AVX-512 VNNI for the
 * int8-activation kernels, AVX2 for the rest), "neon" (AArch64), "neondot" (the Armv8.2 dot product for the
 * int8-activation kernels, NEON for the rest). The best
 * one the CPU has is used unless one is forced (tests run every variant). Returns 0, or -1 if
 * unknown/unsupported. */
int fm_cpu_set_isa(const char *name); /* "auto", "scalar", "avx2", "avx512", "neon", "neondot" */
int fm_cpu_isa_available(const char *name);
int fm_cpu_use_avx2(void); /* kernels should take their AVX2 copy: selected (or best) and present */

/* y[T, rows] = x[T, cols] · Wᵀ.
 * int8 activations: when w->int8_act is set and w is q4/q8 with a group size that is a multiple of 32
 * (up to 256), each token's x (any T: decode and prefill) is quantized per weight group g as llama.cpp
 * does: m = max|x_g|, xq = rint(x·(127/m)), d_g = m/127, and
 *   y = Σ_g d_g·(scale_g·Σ q·xq + bias_g·Σ xq)   (integer dot products),
 * i.e. the dequantized W times x rounded to d·xq. Every CPU variant computes this same function; it
 * halves the decode work of the SIMD kernels and makes prefill tiles ~1.5x faster than fp32 ones.
 * Batch-invariant: within one variant, row t of y is bitwise the same whatever T, t's place in x or the
 * thread count (matmul.h). */
void fm_cpu_matmul(const fm_mat *w, const float *x, int T, float *y);
/* out[cols] = row r of W, dequantized (embedding lookup) */
void fm_cpu_get_row(const fm_mat *w, int r, float *out);

/* x[T, n] normalised per row: x * rsqrt(mean(x²) + eps) * (1 + w) (zero_centered) or * w. */
void fm_cpu_rmsnorm(float *out, const float *x, const float *w, int T, int n, float eps, int zero_centered);
/* x[T, n] *= rsqrt(sum(x²) + eps) per row, then * scale */
void fm_cpu_l2norm(float *x, int T, int n, float eps, float scale);
/* NeoX rotate-half RoPE on dims [0, rot_dim) of each head: x[T, heads, head_dim], position pos0 + t. */
void fm_cpu_rope(float *x, int T, int heads, int head_dim, int rot_dim, int pos0, float theta);
/* out[T, n] = silu(gate) * up */
void fm_cpu_silu_mul(float *out, const float *gate, const float *up, int T, int n);
/* out[T, n] = x * sigmoid(gate) */
void fm_cpu_sigmoid_mul(float *out, const float *gate, const float *x, int T, int n);

/* Causal attention of T new queries over a KV cache holding positions [0, pos0 + T).
 * q[T, nh, hd]; k_cache, v_cache [ctx, nkv, hd] with the new keys already written; out[T, nh, hd]. */
void fm_cpu_attention(float *out, const float *q, const float *k_cache, const float *v_cache, int T, int pos0,
                     int nh, int nkv, int hd, float scale);

/* Depthwise causal conv over channels C with kernel K, then SiLU.
 * x[T, C] pre-conv inputs; state[K-1, C] the K-1 previous inputs, oldest first (updated);
 * w[C, K]; out[T, C]. */
void fm_cpu_conv1d_silu(float *out, const float *x, float *state, const float *w, int T, int C, int K);

/* Gated delta rule, recurrent form, T tokens. q, k [T, Hk, dk] (already normalised and scaled);
 * v [T, Hv, dv]; g, beta [T, Hv]; S [Hv, dk, dv] updated; out [T, Hv, dv]. Value head h uses key
 * head h / (Hv / Hk). */
void fm_cpu_gated_delta(float *out, float *S, const float *q, const float *k, const float *v, const float *g,
                       const float *beta, int T, int Hk, int Hv, int dk, int dv);
/* The same map in its chunked (WY / UT-transform) form, for prefill: same arguments, layouts and state
 * update, tokens taken in chunks that end at multiples of `chunk` (<= 0: 64) counted from absolute
 * position pos0 of the first token, with matrix products, value heads spread over the thread pool. A
 * chunk of one token takes the recurrent step. So a sequence gives the same bits however it is split
 * into calls at multiples of `chunk` (batch invariance). Equal to the recurrent form up to fp32
 * rounding, not bitwise (tests/test_ops.py); faster from 2 tokens on (bench/RESULTS.md). */
void fm_cpu_gated_delta_chunk(float *out, float *S, const float *q, const float *k, const float *v, const float *g,
                             const float *beta, int T, int Hk, int Hv, int dk, int dv, int chunk, int pos0);

/* Router: probs = softmax(logits[n]) in fp32, top-k indices (descending probability) and weights,
 * renormalised to sum 1 when norm. */
void fm_cpu_topk_softmax(const float *logits, int n, int k, int norm, int32_t *idx, float *weights);

#endif /* FM_CPU_H */
