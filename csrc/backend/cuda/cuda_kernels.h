/*
 * cuda_kernels.h — the CUDA kernels' launchers, as the backend (cuda_ops.cu, cuda_experts.cu) calls them.
 *
 * Every pointer is device memory unless named host. Each launcher queues its kernels on stream s and
 * returns FM_OK, or FM_ERR_INVALID (after fm_fail says why) for a shape its kernels cannot take: never a
 * result computed without them. Launch errors are the table's to check (cudaGetLastError after each op).
 *
 * Batch invariance (backend.h): each token's outputs are the same bits whatever T is and wherever the token
 * sits in the call, so every kernel reduces in an order fixed by the token alone (never by T or the grid).
 */
#ifndef FM_CUDA_KERNELS_H
#define FM_CUDA_KERNELS_H

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "../../core/util.h"
#include "../tensor.h"

/* ---- matmul.cu */
/* 1 when a and b have the same dtype, shape and numerics options: one grouped call's kernels take both */
int fmc_same_kind(const fm_mat *a, const fm_mat *b);
/* Device scratch fmc_matmul needs for T tokens of w (int8 activations: the quantized x and its per-group
 * factors); 0 when none. */
size_t fmc_matmul_scratch_bytes(const fm_mat *w, int T);
/* y[T, rows] = x[T, cols] · Wᵀ, the numerics of cpu.h's fm_cpu_matmul (int8 activations where w->int8_act
 * and the group size is a multiple of 32 up to 256); scratch: fmc_matmul_scratch_bytes(w, T) bytes. have_q: the
 * scratch already holds x's int8 activations for a matrix of w's dtype, columns and group size (the last matmul's,
 * on this x, unchanged since): they are not computed again. */
fm_status fmc_matmul(cudaStream_t s, const fm_mat *w, const float *x, int T, float *y, void *scratch, int have_q);
/* One routed expert of a grouped call: its three matrices (device pointers; all experts of a call share dtype,
 * shapes, group sizes, int8_act and scale_bf16, and gate and up share them too), its n token rows tok[0..n) of xn
 * (device; each in [0, T)), and the first row row0 of its outputs in ye (in h: row0 less the call's lowest row0). */
typedef struct {
    fm_mat gate, up, down;
    const int32_t *tok;
    int n, row0;
} fmc_expert;
/* Device scratch fmc_experts needs (int8 activations: xn's T rows for gate and up, then h's rows for down); 0 when
 * none. */
size_t fmc_experts_scratch_bytes(const fm_mat *gate, const fm_mat *down, int T, int rows);
/* h[r + i, :] = silu(gate · xn[tok[i]]) * (up · xn[tok[i]]), then ye[row0 + i, :] = down · h[r + i] for every expert
 * of ex (device array [n_ex]; ex_host: the same array on the host, for the checks and the grid), r = row0 - lo, lo
 * the lowest row0 of the call's experts (of n > 0); xn [T, H]; h [rows, I] scratch, rows >= every r + n (Σ n where
 * the experts' rows of ye are contiguous); ye [·, H]. Only the experts' own rows are read or written. Two kernels
 * whatever n_ex (and where the matrices take int8 activations, a quantizer before each: xn's T rows once, then the
 * experts' rows of h). Bitwise fmc_matmul of gate and of up on each expert's gathered rows, then eltwise.cu's
 * silu_mul (g / (1 + expf(-g)) * u), then fmc_matmul of down. scratch: fmc_experts_scratch_bytes(gate, down, T,
 * rows) bytes. */
fm_status fmc_experts(cudaStream_t s, const fmc_expert *ex, const fmc_expert *ex_host, int n_ex, const float *xn, int T,
                      int H, float *h, float *ye, int rows, void *scratch);
/* fmc_experts for the experts of one layer as fmc_route_group left them on the device, no host copy of their
 * counts: ex device [n_ex] (every expert of the layer, n 0 for those not chosen), shape (host) one of them (the
 * table's rule: one kind, one alignment), xn [T, H], their rows [0, rows) of ye and of h (rows: T·k, every row
 * some expert's). big (fmc_experts_imma_routed_min; 0: none): the experts of at least big tokens on
 * tensor cores, in map's map_n tiles (fmc_route_group's, made with big and fmc_experts_imma_tile(narrow)), the others
 * on fm_mm. The bits of fmc_experts on the same experts. scratch: fmc_experts_scratch_bytes(gate, down, T, rows). */
fm_status fmc_experts_routed(cudaStream_t s, const fmc_expert *ex, const fmc_expert *shape, int n_ex, const int2 *map,
                             int map_n, int narrow, int big, const float *xn, int T, int H, float *h, float *ye, int rows,
                             void *scratch);
/* The end of a MoE layer whose shared expert ran in the routed experts' call (cuda_experts.cu's moe_device), for each
 * token t < T: out[t] = ye[T·k + t] (its shared FFN) · sigmoid(gate_row · xn[t]), then + Σ_j wt[t, j]·ye[row[t, j]],
 * j in order. The bits of fmc_matmul of gate_row (one row, on fp32 activations), fmc_gate_rows and fmc_moe_combine
 * (one kernel for the three). row, wt device [T, k]; xn [T, h]; ye [T·(k + 1), h]. */
fm_status fmc_shared_combine(cudaStream_t s, const fm_mat *gate_row, const float *xn, int T, float *out,
                             const float *ye, const int32_t *row, const float *wt, int k, int h);
/* out[T, cols] = row ids[t] of W, dequantized (fm_cpu_get_row); ids: device [T] */
fm_status fmc_embed(cudaStream_t s, const fm_mat *w, const int32_t *ids, int T, float *out);

/* ---- matmul_mma.cu */
/* fmc_matmul's int8-activation matmul (q4 or q8 w; xq, xd, xs its quantized x, matmul.cu's scratch) on tensor cores,
 * bitwise matmul.cu's kernel for every (row, token). Queues it and returns 1 where it takes the call: T at least
 * FMC_IMMA_MIN_T, sm_80 or later, w's rows 16-byte aligned, and FLASHMOE_CUDA_IMMA 1, or unset and the call's
 * blocks fill half the GPU; else 0 (nothing queued). */
#define FMC_IMMA_MIN_T 16
int fmc_mm_imma(cudaStream_t s, const fm_mat *w, const int8_t *xq, const float *xd, const float *xs, float *y, int T);
/* fmc_experts' part there: its experts of at least the number this returns take it (0: none, for w's shape, the
 * device, FLASHMOE_CUDA_IMMA, or too few such experts' tokens to fill half the GPU where it is unset); w the call's
 * first gate (gu) or down, ex_host its experts. 4: a 512-token prompt's experts (~16 tokens each) ×1.2 against 16,
 * and a decode step's one-token experts stay on fm_mm (bench/RESULTS.md, session 20);
 * FLASHMOE_CUDA_IMMA_MIN_EXPERT_T overrides it. */
#define FMC_IMMA_MIN_EXPERT_T 4
int fmc_experts_imma_min(const fm_mat *w, int gu, const fmc_expert *ex_host, int n_ex);
/* gate·up (gu: into h, silu(gate)·up) or down (into ye) of the experts of ex (device [n_ex]; ex_host the same on the
 * host) of at least big tokens, bitwise fm_mm's: w the first expert's gate or down (the call's shape and options,
 * every matrix's rows 16-byte aligned), xq, xd, xs the quantized xn or h, y h or ye, hlo the call's lowest row0.
 * 1 where it queued the kernel (or had nothing to do), 0 where the grid is too large (nothing queued). */
int fmc_experts_imma(cudaStream_t s, int gu, const fmc_expert *ex, const fmc_expert *ex_host, int n_ex,
                     const fm_mat *w, const int8_t *xq, const float *xd, const float *xs, float *y, int hlo, int big);

/* fmc_experts_imma over the tiles of map (device [map_n], fmc_route_group's: (expert, tile), expert -1 for none)
 * rather than ex_host's counts, the call's rows from 0 (fmc_experts_routed's); 1 where queued, 0 where the grid is
 * too large */
int fmc_experts_imma_mapped(cudaStream_t s, int gu, const fmc_expert *ex, int n_ex, const int2 *map, int map_n,
                            int narrow, const fm_mat *w, const int8_t *xq, const float *xd, const float *xs, float *y,
                            int big);
/* cpu.h's condition for int8 activations: w's matmuls quantize x (groups of 32..256 columns) */
static inline int fmc_int8_path(const fm_mat *w) {
    return (w->dtype == FM_Q4 || w->dtype == FM_Q8) && w->int8_act && w->group_size > 0 && w->group_size % 32 == 0 &&
           w->group_size <= 256;
}
/* fmc_experts_routed's big for experts of this gate and down: the experts of at least this many tokens take the
 * tensor cores (FMC_IMMA_MIN_EXPERT_T or its override), 0 where they cannot (no int8 activations, shapes, device,
 * FLASHMOE_CUDA_IMMA=0) */
int fmc_experts_imma_routed_min(const fm_mat *gate, const fm_mat *down);
/* the tokens of a token tile of the grouped tensor-core kernels (fmc_route_group's bn), in 8-token tiles or not */
int fmc_experts_imma_tile(int narrow);
/* whether a routed call of n choices over n_ex experts takes 8-token tiles: FLASHMOE_CUDA_IMMA_NARROW=1, or =auto
 * where experts of n / n_ex tokens would pad to 1.5x as many in 16-token tiles (fmc_experts_imma_min's rule, on the
 * even spread: the counts are the device's) */
int fmc_experts_imma_routed_narrow(int n, int n_ex);

/* ---- attention.cu */
/* Floats of scratch fmc_attention needs (its flash-decoding partials) for this call. */
size_t fmc_attention_scratch_floats(int T, int pos0, int nh, int hd);
/* ... the most that takes where one token's partials fit the cap on a slice's (any context up to 2^22 positions
 * at 64 heads of 256) */
size_t fmc_attention_scratch_cap_floats(void);
/* fm_cpu_attention: causal attention of T queries at positions pos0.. over k_cache, v_cache [ctx, nkv, hd]
 * holding positions [0, pos0 + T); q, out [T, nh, hd]. */
fm_status fmc_attention(cudaStream_t s, float *out, const float *q, const float *k_cache, const float *v_cache, int T,
                        int pos0, const int *dpos, int nh, int nkv, int hd, float scale, float *scratch);
/* The key positions are cut into blocks of this many: a call's launches (grid, scratch) are the same for every pos0
 * of one block (with T fixed), so a recorded call stays valid there with pos0 read from dpos. */
int fmc_attention_key_block(void);

/* ---- gated_delta.cu */
/* Floats of scratch fmc_gated_delta needs for this call (its chunked form's per-chunk matrices); 0 when every
 * token takes the recurrent form. */
size_t fmc_gated_delta_scratch_floats(int T, int pos0, int Hk, int Hv, int dk, int dv);
/* ... the most that takes where one chunk's records fit the cap on a slice's (64 MiB: any call of up to 7,000
 * tokens at 64 value heads in one slice) */
size_t fmc_gated_delta_scratch_cap_floats(void);
/* fm_cpu_gated_delta's map over T tokens at positions pos0..: q, k [T, Hk, dk]; v [T, Hv, dv]; g, beta
 * [T, Hv]; S [Hv, dk, dv] updated; out [T, Hv, dv]. Recurrent, or chunked in chunks that end at multiples of
 * FM_DELTANET_CHUNK positions as fm_cpu_gated_delta_chunk's (a 1-token chunk: the recurrent step). scratch:
 * fmc_gated_delta_scratch_floats(T, pos0, Hk, Hv, dk, dv) floats (NULL where that is 0). */
fm_status fmc_gated_delta(cudaStream_t s, float *out, float *S, const float *q, const float *k, const float *v,
                          const float *g, const float *beta, int T, int pos0, int Hk, int Hv, int dk, int dv,
                          float *scratch);

/* ---- route.cu */
/* fm_cpu_topk_softmax per token of logits [T, E]: idx, weights device [T, k]. With tab (device [E], the layer's
 * experts' matrices) also each choice i = t·k + j as an expert of one token for fmc_experts: ex[i] = tab[idx[i]] with
 * tok = &tok[i], tok[i] = t, n = 1, row0 = i (ex, tok device [T·k]; else NULL); and with shared (host: a shared
 * expert's matrices, else NULL) each token t's too, at i = T·k + t (ex, tok [T·(k + 1)]). */
fm_status fmc_route(cudaStream_t s, const float *logits, int T, int E, int k, int norm, int32_t *idx, float *weights,
                    const fmc_expert *tab, fmc_expert *ex, int32_t *tok, const fmc_expert *shared);

/* A prompt's choices grouped by expert on the device, as the host's group_by_expert groups them (no round trip):
 * idx device [T, k] (fmc_route's), tab device [E] the layer's experts. Writes ex device [E] (tab's entries with n
 * the expert's choices, row0 = the choices of the experts before it, tok = its tokens' list in tok), tok device
 * [T·k] (each expert's tokens in ascending order, in expert order), rows device [T·k] (choice i's row of ye) and
 * map device [map_n] (the token tiles of bn tokens of every expert of at least
 * big choices (0: none), in expert order, as (expert, tile); then (-1, 0) up to map_n, which is to be at least
 * fmc_route_group_tiles(T, k, E, big, bn, shared != NULL)). With shared (host: a shared expert's matrices, else
 * NULL) also ex[E]: it on every token (tok [T·k + T]: 0..T-1 after the choices'), rows [T·k, T·k + T) of ye, its
 * tiles after the routed experts'. */
fm_status fmc_route_group(cudaStream_t s, const int32_t *idx, int T, int k, int E, const fmc_expert *tab, int big,
                          int bn, const fmc_expert *shared, fmc_expert *ex, int32_t *tok, int32_t *rows, int2 *map,
                          int map_n);
/* The most token tiles of bn that T tokens' top k of E experts can make over the experts of at least big choices
 * (at most T·k: an expert's tiles are at most its choices), and with sh the shared expert's over T tokens */
static inline int fmc_route_group_tiles(int T, int k, int E, int big, int bn, int sh) {
    if (big < 1) return 0;
    const long long n = (long long)T * k, experts = n / big < E ? n / big : E;
    return (int)((n + (long long)(bn - 1) * experts) / bn) + (sh && T >= big ? (T + bn - 1) / bn : 0);
}

/* ---- eltwise.cu: the element-wise and row ops, each the fm_cpu_* / backend.h op of the same name */
fm_status fmc_rmsnorm(cudaStream_t s, float *out, const float *x, const float *w, int T, int n, float eps, int zc);
fm_status fmc_l2norm(cudaStream_t s, float *x, int T, int n, float eps, float scale);
/* dpos: NULL, or pos0 read from device memory when the kernel runs (a recorded step's, replayed later) */
fm_status fmc_rope(cudaStream_t s, float *x, int T, int heads, int hd, int rot, int pos0, const int *dpos, float theta);
fm_status fmc_silu_mul(cudaStream_t s, float *out, const float *gate, const float *up, size_t n);
fm_status fmc_sigmoid_mul(cudaStream_t s, float *out, const float *gate, const float *x, size_t n);
fm_status fmc_add(cudaStream_t s, float *x, const float *y, size_t n);
fm_status fmc_split_q_gate(cudaStream_t s, float *q, float *gate, const float *q2, int T, int nh, int hd);
fm_status fmc_kv_write(cudaStream_t s, float *cache, const float *src, int pos0, const int *dpos, int T, int row);
fm_status fmc_conv1d_silu(cudaStream_t s, float *out, const float *x, float *state, const float *w, int T, int C,
                          int K);
fm_status fmc_deltanet_split(cudaStream_t s, float *q, float *k, float *v, const float *conv, int T, int kd, int vd);
fm_status fmc_deltanet_gates(cudaStream_t s, float *b, float *a, const float *A_log, const float *dt_bias, int T,
                             int Hv);
fm_status fmc_gate_rows(cudaStream_t s, float *out, const float *g, int T, int n);
/* out[t] += Σ_j weights[t, j] · ye[row[t, j]]; row, weights device [T, k] */
fm_status fmc_moe_combine(cudaStream_t s, float *out, const float *ye, const int32_t *row, const float *weights, int T,
                          int k, int h);
/* dst[i, :] = src[rows[i], :], i < n; rows device [n] */
fm_status fmc_gather_rows(cudaStream_t s, float *dst, const float *src, const int32_t *rows, int n, int cols);
/* *out (device): the greedy token of x [n], the sampler's argmax (the lowest id holding the largest value, NaN
 * never, 0 when all are NaN); scratch: device, fmc_argmax_scratch_bytes(n) */
size_t fmc_argmax_scratch_bytes(int n);
fm_status fmc_argmax(cudaStream_t s, int32_t *out, const float *x, int n, void *scratch);

#ifdef __cplusplus
}
#endif

#endif /* FM_CUDA_KERNELS_H */
