/*
 * fm_metal_args.h — the argument structs of the Metal kernels, one header for the shaders (MSL), the
 * Objective-C host and the CPU emulator (C/C++). Plain structs of 32-bit fields, so the layout is the same
 * in all three; the host passes each with setBytes at the kernel's [[buffer(n)]] index.
 * Also the kernels' fixed shapes, which the grid computations (fm_metal_grid.h) must agree with.
 */
#ifndef FM_METAL_ARGS_H
#define FM_METAL_ARGS_H

#ifndef __METAL_VERSION__
#include <stdint.h> /* MSL has the fixed-width types in <metal_stdlib> */
#endif

#define FM_METAL_SIMD 32            /* lanes per simdgroup on every Apple GPU */
#define FM_QMV_SIMDGROUPS 2         /* every matvec / matmul: simdgroups per threadgroup (MLX qmv_fast) */
#define FM_QMV_ROWS_PER_SIMD 4      /* rows each simdgroup reduces (the 4 components of a float4) */
#define FM_QMV_VALUES_PER_LANE 16   /* q4/q8, fp32 activations: consecutive weights per lane per step */
#define FM_MV_VALUES_PER_LANE 8     /* f32/bf16 weights: consecutive weights per lane per step */
#define FM_QMV_I8_VALUES_PER_LANE 32 /* q4/q8 on int8 activations: consecutive weights per lane per step */
#define FM_MM_TOKENS 8              /* the multi-token kernels (fm_qmm_*, fm_mm_*): tokens per threadgroup */
#define FM_MM_MIN_TOKENS 2          /* T from which the multi-token kernels run (below: the matvec) */
#define FM_QX_THREADS 64            /* quantize_x: groups (one per thread) per threadgroup */
#define FM_GATHER_THREADS 256
#define FM_RMSNORM_MAX_THREADS 256  /* threads per row of rmsnorm */
#define FM_ADD_THREADS 256
#define FM_ELTWISE_THREADS 256      /* one thread per element: fm_metal_grid_eltwise's kernels */
#define FM_ROPE_THREADS 64          /* rope: rotated pairs per threadgroup */
#define FM_CONV1D_THREADS 64        /* conv1d_silu: channels per threadgroup */
#define FM_EMBED_THREADS 256        /* embed: elements of a row per threadgroup */
#define FM_ROUTE_MAX_K 32           /* route: top k at most (a selection per lane of its simdgroup) */
#define FM_ATTN_SIMDGROUPS 8        /* attention: simdgroups per threadgroup, simdgroup s over keys s, s + 8, ... */
#define FM_ATTN_CHUNK 256           /* attention: keys per chunk, at multiples of 256 in absolute position */
#define FM_ATTN_MAX_HD 256          /* attention: head_dim at most FM_ATTN_SIMDGROUPS · 32 (8 dims per lane) */
#define FM_ATTN_SPLIT_BELOW 256     /* attention: flash-decoding split below this many (head, token) pairs */
#define FM_ATTN_SPLIT_MAX_FLOATS (8u << 20) /* attention: and with partials of at most 32 MiB */
#define FM_GDN_SIMDGROUPS 4         /* gated delta: simdgroups per threadgroup */
#define FM_GDN_COLS 4               /* gated delta: state columns per simdgroup (a float4 per row) */
#define FM_GDN_MAX_DK 128           /* gated delta: key head dim at most 128 (4 state rows per lane) */

/* x[n] += y[n] */
typedef struct {
    uint32_t n;
} fm_add_args;

/* out[T, n] = x * rsqrt(mean(x²) + eps) * (zero_centered ? 1 + w : w); one threadgroup per row */
typedef struct {
    uint32_t n;
    float eps;
    uint32_t zero_centered;
} fm_rmsnorm_args;

/* y[T, rows] = x[T, cols] · Wᵀ (every matvec and matmul kernel). W f32, bf16 (the top half of a float32),
 * or q4 / q8 affine: q4's byte j of a row holds elements 2j (low nibble) and 2j+1, q8 one byte per element;
 * w = scale·q + bias with a scale and bias per group of group_size elements of a row, 16-bit: fp16, or
 * bfloat16 where scale_bf16. f32/bf16: any cols (group_size 0). q4/q8 on fp32 activations: cols and
 * group_size multiples of FM_QMV_VALUES_PER_LANE; on int8 activations: group_size 32, 64, 128 or 256. */
typedef struct {
    uint32_t rows, cols, group_size, scale_bf16, T;
} fm_matmul_args;

/* int8 activations (csrc/backend/cpu/cpu.h): x[T, cols] per group of group_size → xq [T, cols] (int8),
 * xd, xqs [T, cols / group_size] (fp32) */
typedef struct {
    uint32_t cols, group_size;
} fm_quantize_x_args;

/* out[i, :] = x[idx[i], :] for i < n, rows of cols floats */
typedef struct {
    uint32_t n, cols;
} fm_gather_args;

/* out[n] = silu(gate)·up (fm_silu_mul) or x·sigmoid(gate) (fm_sigmoid_mul), n = T·width */
typedef struct {
    uint32_t n;
} fm_eltwise_args;

/* x[rows, n] *= scale / sqrt(Σx² + eps) per row, in place; one threadgroup per row */
typedef struct {
    uint32_t n;
    float eps, scale;
} fm_l2norm_args;

/* NeoX rotate-half RoPE on dims [0, rot_dim) of each head of x[T, heads, head_dim], position pos0 + t,
 * inv_freq = 1 / theta^(2i / rot_dim) */
typedef struct {
    uint32_t heads, head_dim, rot_dim;
    int32_t pos0;
    float theta;
} fm_rope_args;

/* gated attention: q2 [T, nh, 2·hd] (per head query | gate) → q, gate [T, nh, hd]; n = T·nh·hd */
typedef struct {
    uint32_t n, hd;
} fm_split_q_gate_args;

/* rows [pos0, pos0 + T) of a cache [ctx, row] ← src [T, row]; n = T·row */
typedef struct {
    uint32_t n, row, pos0;
} fm_kv_write_args;

/* out[t, :] *= sigmoid(g[t]), out [T, n]; total = T·n */
typedef struct {
    uint32_t total, n;
} fm_gate_rows_args;

/* DeltaNet gates in place over [T, Hv]: b → sigmoid(b), a → -exp(A_log)·softplus(a + dt_bias); n = T·Hv */
typedef struct {
    uint32_t n, Hv;
} fm_deltanet_gates_args;

/* DeltaNet: conv [T, 2·kd + vd] → q, k [T, kd], v [T, vd]; n = T·(2·kd + vd) */
typedef struct {
    uint32_t n, kd, vd;
} fm_deltanet_split_args;

/* depthwise causal conv of x [T, C] with taps w [C, K] after the state [K-1, C] (the last K-1 inputs,
 * oldest first), then SiLU; the state becomes the last K-1 inputs of [state | x] */
typedef struct {
    uint32_t T, C, K;
} fm_conv1d_args;

/* out[t] += Σ_j w[t, j]·ye[row[t, j]], j in order; out [T, h], row and w [T, k]; n = T·h */
typedef struct {
    uint32_t n, h, k;
} fm_moe_combine_args;

/* embed: out[t] = row ids[t] of W [rows, cols] dequantized; group_size and scale_bf16: q4 and q8 only */
typedef struct {
    uint32_t rows, cols, group_size, scale_bf16;
} fm_embed_args;

/* route: softmax over logits [T, E], the top k (<= FM_ROUTE_MAX_K) per token, renormalised when norm */
typedef struct {
    uint32_t E, k, norm;
} fm_route_args;

/* Causal attention, cpu.h's fm_cpu_attention: out[T, nh, hd] from q[T, nh, hd] over k_cache, v_cache
 * [ctx, nkv, hd]; query t sees positions [0, pos0 + t]; query head h reads KV head h / (nh / nkv).
 * hd <= FM_ATTN_MAX_HD. chunks: the flash-decoding split's chunks per query in its partial buffer
 * (fm_metal_attention_chunks; unused by the one-pass kernel). */
typedef struct {
    uint32_t T;
    int32_t pos0;
    uint32_t nh, nkv, hd;
    float scale;
    uint32_t chunks;
} fm_attention_args;

/* The gated delta rule, recurrent form (cpu.h's fm_cpu_gated_delta): q, k [T, Hk, dk], v [T, Hv, dv],
 * g, beta [T, Hv], S [Hv, dk, dv] updated in place, out [T, Hv, dv]; value head h reads key head
 * h / (Hv / Hk). dk <= FM_GDN_MAX_DK. */
typedef struct {
    uint32_t T, Hk, Hv, dk, dv;
} fm_gated_delta_args;

#endif /* FM_METAL_ARGS_H */
