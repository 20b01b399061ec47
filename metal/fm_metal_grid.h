/*
 * fm_metal_grid.h — how each kernel is dispatched: pure functions from an op's shape to the threadgroup
 * grid, the threads per threadgroup and the threadgroup memory, for dispatchThreadgroups. The host
 * (csrc/backend/metal/metal_ops.c, over Metal or the CPU emulator) calls these, so the emulator
 * exercises the host's dispatch arithmetic too. C99, host side only.
 */
#ifndef FM_METAL_GRID_H
#define FM_METAL_GRID_H

#include <stdint.h>

#include "fm_metal_args.h"

typedef struct {
    uint32_t groups[3];  /* threadgroups per grid */
    uint32_t threads[3]; /* threads per threadgroup */
    uint32_t tg_bytes[1]; /* threadgroup memory length at [[threadgroup(i)]] (a multiple of 16) */
} fm_metal_grid;

static inline uint32_t fm_metal_div_up(uint32_t a, uint32_t b) { return (a + b - 1) / b; }

static inline fm_metal_grid fm_metal_grid_add(uint32_t n) {
    fm_metal_grid g = {{fm_metal_div_up(n, FM_ADD_THREADS), 1, 1}, {FM_ADD_THREADS, 1, 1}, {0}};
    return g;
}

/* one threadgroup per row, a whole number of simdgroups up to FM_RMSNORM_MAX_THREADS; threadgroup memory
 * holds one partial sum per simdgroup */
static inline fm_metal_grid fm_metal_grid_rmsnorm(uint32_t T, uint32_t n) {
    uint32_t threads = fm_metal_div_up(n, FM_METAL_SIMD) * FM_METAL_SIMD;
    if (threads > FM_RMSNORM_MAX_THREADS) threads = FM_RMSNORM_MAX_THREADS;
    const uint32_t simdgroups = threads / FM_METAL_SIMD;
    fm_metal_grid g = {{T, 1, 1}, {threads, 1, 1}, {fm_metal_div_up(simdgroups * 4, 16) * 16}};
    return g;
}

/* l2norm: as rmsnorm, one threadgroup per row (of T·heads) */
static inline fm_metal_grid fm_metal_grid_l2norm(uint32_t rows, uint32_t n) { return fm_metal_grid_rmsnorm(rows, n); }

/* silu_mul, sigmoid_mul, split_q_gate, kv_write, gate_rows, deltanet_gates, deltanet_split, moe_combine:
 * one thread per element (of the output; deltanet_gates: per gate pair) */
static inline fm_metal_grid fm_metal_grid_eltwise(uint32_t n) {
    fm_metal_grid g = {{fm_metal_div_up(n, FM_ELTWISE_THREADS), 1, 1}, {FM_ELTWISE_THREADS, 1, 1}, {0}};
    return g;
}

/* conv1d_silu: one thread per channel, each through every token (then its column of the state) */
static inline fm_metal_grid fm_metal_grid_conv1d(uint32_t C) {
    fm_metal_grid g = {{fm_metal_div_up(C, FM_CONV1D_THREADS), 1, 1}, {FM_CONV1D_THREADS, 1, 1}, {0}};
    return g;
}

/* embed: one thread per element of a row along x, a token per grid row */
static inline fm_metal_grid fm_metal_grid_embed(uint32_t T, uint32_t cols) {
    fm_metal_grid g = {{fm_metal_div_up(cols, FM_EMBED_THREADS), T, 1}, {FM_EMBED_THREADS, 1, 1}, {0}};
    return g;
}

/* route: a threadgroup of one simdgroup per token */
static inline fm_metal_grid fm_metal_grid_route(uint32_t T) {
    fm_metal_grid g = {{T, 1, 1}, {FM_METAL_SIMD, 1, 1}, {0}};
    return g;
}

/* rope: one thread per rotated pair (i < rot_dim / 2) along x, a head per grid row, a token per slice */
static inline fm_metal_grid fm_metal_grid_rope(uint32_t T, uint32_t heads, uint32_t rot_dim) {
    fm_metal_grid g = {{fm_metal_div_up(rot_dim / 2, FM_ROPE_THREADS), heads, T}, {FM_ROPE_THREADS, 1, 1}, {0}};
    return g;
}

/* Tokens per threadgroup of a matmul over T tokens: 1 (the matvec kernels, fm_qmv_* / fm_mv_*) for a
 * single token, FM_MM_TOKENS (the multi-token kernels, fm_qmm_* / fm_mm_*) from FM_MM_MIN_TOKENS on. Both
 * compute a token in the same order, so this choice does not change any bits (batch invariance). */
static inline uint32_t fm_metal_matmul_tokens(uint32_t T) { return T >= FM_MM_MIN_TOKENS ? FM_MM_TOKENS : 1; }

/* every matvec / matmul kernel: FM_QMV_SIMDGROUPS × FM_QMV_ROWS_PER_SIMD rows per threadgroup along x, a tile
 * of fm_metal_matmul_tokens(T) tokens per grid row */
static inline fm_metal_grid fm_metal_grid_matmul(uint32_t T, uint32_t rows) {
    fm_metal_grid g = {{fm_metal_div_up(rows, FM_QMV_SIMDGROUPS * FM_QMV_ROWS_PER_SIMD),
                        fm_metal_div_up(T, fm_metal_matmul_tokens(T)), 1},
                       {FM_QMV_SIMDGROUPS * FM_METAL_SIMD, 1, 1}, {0}};
    return g;
}

/* attention: one threadgroup of FM_ATTN_SIMDGROUPS simdgroups per (query head, token); threadgroup memory
 * holds each simdgroup's partial softmax of a chunk: max and sum (2 floats) and its hd output values */
static inline fm_metal_grid fm_metal_grid_attention(uint32_t T, uint32_t nh, uint32_t hd) {
    const uint32_t floats = FM_ATTN_SIMDGROUPS * (2 + hd);
    fm_metal_grid g = {{nh, T, 1}, {FM_ATTN_SIMDGROUPS * FM_METAL_SIMD, 1, 1}, {fm_metal_div_up(floats * 4, 16) * 16}};
    return g;
}

/* attention's chunks of FM_ATTN_CHUNK keys for the last of T queries from pos0 (the most of any) */
static inline uint32_t fm_metal_attention_chunks(uint32_t T, int32_t pos0) {
    return fm_metal_div_up((uint32_t)pos0 + T, FM_ATTN_CHUNK);
}

/* the split's partial buffer: (max, sum, hd values) per chunk of each (token, head), floats */
static inline uint64_t fm_metal_attention_partial_floats(uint32_t T, uint32_t nh, uint32_t hd, int32_t pos0) {
    return (uint64_t)T * nh * fm_metal_attention_chunks(T, pos0) * (2 + hd);
}

/* Whether attention takes the flash-decoding split (fm_attention_split + fm_attention_merge) rather than
 * fm_attention: too few (head, token) pairs to fill the GPU, a context of several chunks, and partials
 * of at most FM_ATTN_SPLIT_MAX_FLOATS. Either gives the same bits, so this may be any function of the
 * shape. */
static inline int fm_metal_attention_split(uint32_t T, uint32_t nh, uint32_t hd, int32_t pos0) {
    return nh * T < FM_ATTN_SPLIT_BELOW && fm_metal_attention_chunks(T, pos0) > 1 &&
           fm_metal_attention_partial_floats(T, nh, hd, pos0) <= FM_ATTN_SPLIT_MAX_FLOATS;
}

/* the split's pass 1: one threadgroup per (head, chunk, token), as fm_attention's */
static inline fm_metal_grid fm_metal_grid_attention_split(uint32_t T, uint32_t nh, uint32_t hd, int32_t pos0) {
    fm_metal_grid g = fm_metal_grid_attention(T, nh, hd);
    g.groups[1] = fm_metal_attention_chunks(T, pos0);
    g.groups[2] = T;
    return g;
}

/* the split's pass 2: one threadgroup per (head, token), a thread per output dim */
static inline fm_metal_grid fm_metal_grid_attention_merge(uint32_t T, uint32_t nh, uint32_t hd) {
    fm_metal_grid g = {{nh, T, 1}, {fm_metal_div_up(hd, FM_METAL_SIMD) * FM_METAL_SIMD, 1, 1}, {0}};
    return g;
}

/* gated delta: FM_GDN_SIMDGROUPS simdgroups of FM_GDN_COLS state columns each per threadgroup along x,
 * one value head per grid row; no threadgroup memory (the columns are independent) */
static inline fm_metal_grid fm_metal_grid_gated_delta(uint32_t Hv, uint32_t dv) {
    fm_metal_grid g = {{fm_metal_div_up(dv, FM_GDN_SIMDGROUPS * FM_GDN_COLS), Hv, 1},
                       {FM_GDN_SIMDGROUPS * FM_METAL_SIMD, 1, 1}, {0}};
    return g;
}

/* quantize_x: one thread per group of a token's x along x, a token per grid row */
static inline fm_metal_grid fm_metal_grid_quantize_x(uint32_t T, uint32_t groups) {
    fm_metal_grid g = {{fm_metal_div_up(groups, FM_QX_THREADS), T, 1}, {FM_QX_THREADS, 1, 1}, {0}};
    return g;
}

/* gather_rows: one thread per float of a row along x, a row per grid row */
static inline fm_metal_grid fm_metal_grid_gather(uint32_t n, uint32_t cols) {
    fm_metal_grid g = {{fm_metal_div_up(cols, FM_GATHER_THREADS), n, 1}, {FM_GATHER_THREADS, 1, 1}, {0}};
    return g;
}

#endif /* FM_METAL_GRID_H */
