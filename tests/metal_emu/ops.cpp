/*
 * ops.cpp — the backend's ops on the emulated GPU: what the Objective-C host will do for each (argument
 * struct, fm_metal_grid.h, buffer indices as in the shader), with the emulator's encoder in place of
 * MTLComputeCommandEncoder. Signatures as in backend.h / cpu.h.
 */
#include "ops.h"

#include <stdlib.h>
#include <string.h>

#include "emu.h"
#include "fm_metal_args.h"
#include "fm_metal_grid.h"

void fm_emu_add(float *x, const float *y, size_t n) {
    const fm_add_args a = {(uint32_t)n};
    fm_emu::encoder enc;
    enc.set_buffer(x, 0);
    enc.set_buffer(y, 1);
    enc.set_bytes(&a, sizeof a, 2);
    enc.dispatch("fm_add", fm_metal_grid_add(a.n));
}

void fm_emu_rmsnorm(float *out, const float *x, const float *w, int T, int n, float eps, int zero_centered) {
    const fm_rmsnorm_args a = {(uint32_t)n, eps, (uint32_t)(zero_centered != 0)};
    const fm_metal_grid g = fm_metal_grid_rmsnorm((uint32_t)T, a.n);
    fm_emu::encoder enc;
    enc.set_buffer(out, 0);
    enc.set_buffer(x, 1);
    enc.set_buffer(w, 2);
    enc.set_bytes(&a, sizeof a, 3);
    enc.set_threadgroup_memory_length(g.tg_bytes[0], 0);
    enc.dispatch("fm_rmsnorm", g);
}

/* Scratch the host allocates for an op (the backend will take it from its context): exact, so that ASan
 * sees an access past its end. */
template <class T> struct scratch {
    T *p;
    explicit scratch(size_t n) : p((T *)calloc(n + !n, sizeof(T))) {
        if (!p) fm_emu::fail("out of memory");
    }
    ~scratch() { free(p); }
    scratch(const scratch &) = delete;
    scratch &operator=(const scratch &) = delete;
};

/* The int8 activations (cpu.h) apply to q4/q8 with a group size that is a multiple of 32 up to 256, as on
 * the CPU; the Metal kernels take the powers of two among them (a group is a whole block of lanes). */
static bool int8_path(const fm_mat *w) {
    const int gs = w->group_size;
    if (!(w->dtype == FM_Q4 || w->dtype == FM_Q8) || !w->int8_act || gs % 32 || gs > 256) return false;
    if (gs & (gs - 1)) fm_emu::fail("matmul on int8 activations: group size %d is not 32, 64, 128 or 256", gs);
    return true;
}

void fm_emu_quantize_x(const float *x, int T, int cols, int gs, int8_t *xq, float *xd, float *xqs) {
    const fm_quantize_x_args a = {(uint32_t)cols, (uint32_t)gs};
    fm_emu::encoder enc;
    enc.set_buffer(x, 0);
    enc.set_buffer(xq, 1);
    enc.set_buffer(xd, 2);
    enc.set_buffer(xqs, 3);
    enc.set_bytes(&a, sizeof a, 4);
    enc.dispatch("fm_quantize_x", fm_metal_grid_quantize_x((uint32_t)T, a.cols / a.group_size));
}

void fm_emu_matmul(const fm_mat *w, const float *x, int T, float *y) {
    const int rows = w->rows, cols = w->cols, gs = w->group_size;
    const fm_matmul_args a = {(uint32_t)rows, (uint32_t)cols, (uint32_t)(w->dtype == FM_Q4 || w->dtype == FM_Q8 ? gs : 0),
                              (uint32_t)(w->scale_bf16 != 0), (uint32_t)T};
    const fm_metal_grid g = fm_metal_grid_matmul(a.T, a.rows);
    const bool mm = fm_metal_matmul_tokens(a.T) > 1; /* the multi-token kernel, else the matvec */
    fm_emu::encoder enc;
    if (w->dtype == FM_F32 || w->dtype == FM_BF16) {
        enc.set_buffer(w->data, 0);
        enc.set_buffer(x, 1);
        enc.set_buffer(y, 2);
        enc.set_bytes(&a, sizeof a, 3);
        enc.dispatch(w->dtype == FM_F32 ? (mm ? "fm_mm_f32" : "fm_mv_f32") : (mm ? "fm_mm_bf16" : "fm_mv_bf16"), g);
        return;
    }
    const bool q4 = w->dtype == FM_Q4;
    if (int8_path(w)) {
        const uint32_t groups = a.cols / a.group_size;
        scratch<int8_t> xq((size_t)T * cols);
        scratch<float> xd((size_t)T * groups), xqs((size_t)T * groups);
        fm_emu_quantize_x(x, T, cols, gs, xq.p, xd.p, xqs.p);
        enc.set_buffer(w->data, 0);
        enc.set_buffer(w->scales, 1);
        enc.set_buffer(w->biases, 2);
        enc.set_buffer(xq.p, 3);
        enc.set_buffer(xd.p, 4);
        enc.set_buffer(xqs.p, 5);
        enc.set_buffer(y, 6);
        enc.set_bytes(&a, sizeof a, 7);
        enc.dispatch(q4 ? (mm ? "fm_qmm_q4_i8" : "fm_qmv_q4_i8") : (mm ? "fm_qmm_q8_i8" : "fm_qmv_q8_i8"), g);
        return;
    }
    if (cols % FM_QMV_VALUES_PER_LANE || gs % FM_QMV_VALUES_PER_LANE || gs <= 0 || cols % gs)
        fm_emu::fail("matmul q%d: cols %d and group_size %d must be multiples of %d, cols of group_size", q4 ? 4 : 8,
                     cols, gs, FM_QMV_VALUES_PER_LANE);
    enc.set_buffer(w->data, 0);
    enc.set_buffer(w->scales, 1);
    enc.set_buffer(w->biases, 2);
    enc.set_buffer(x, 3);
    enc.set_buffer(y, 4);
    enc.set_bytes(&a, sizeof a, 5);
    enc.dispatch(q4 ? (mm ? "fm_qmm_q4" : "fm_qmv_q4") : (mm ? "fm_qmm_q8" : "fm_qmv_q8"), g);
}

static void eltwise(const char *kernel, float *out, const float *gate, const float *b, int T, int n) {
    const fm_eltwise_args a = {(uint32_t)T * (uint32_t)n};
    fm_emu::encoder enc;
    enc.set_buffer(out, 0);
    enc.set_buffer(gate, 1);
    enc.set_buffer(b, 2);
    enc.set_bytes(&a, sizeof a, 3);
    enc.dispatch(kernel, fm_metal_grid_eltwise(a.n));
}

void fm_emu_silu_mul(float *out, const float *gate, const float *up, int T, int n) {
    eltwise("fm_silu_mul", out, gate, up, T, n);
}

void fm_emu_sigmoid_mul(float *out, const float *gate, const float *x, int T, int n) {
    eltwise("fm_sigmoid_mul", out, gate, x, T, n);
}

void fm_emu_l2norm(float *x, int T, int n, float eps, float scale) {
    const fm_l2norm_args a = {(uint32_t)n, eps, scale};
    const fm_metal_grid g = fm_metal_grid_l2norm((uint32_t)T, a.n);
    fm_emu::encoder enc;
    enc.set_buffer(x, 0);
    enc.set_bytes(&a, sizeof a, 1);
    enc.set_threadgroup_memory_length(g.tg_bytes[0], 0);
    enc.dispatch("fm_l2norm", g);
}

void fm_emu_rope(float *x, int T, int heads, int head_dim, int rot_dim, int pos0, float theta) {
    if (rot_dim % 2 || rot_dim > head_dim) fm_emu::fail("rope: rot_dim %d must be even and <= head_dim %d", rot_dim, head_dim);
    const fm_rope_args a = {(uint32_t)heads, (uint32_t)head_dim, (uint32_t)rot_dim, pos0, theta};
    fm_emu::encoder enc;
    enc.set_buffer(x, 0);
    enc.set_bytes(&a, sizeof a, 1);
    enc.dispatch("fm_rope", fm_metal_grid_rope((uint32_t)T, a.heads, a.rot_dim));
}

void fm_emu_split_q_gate(float *q, float *gate, const float *q2, int T, int nh, int hd) {
    const fm_split_q_gate_args a = {(uint32_t)T * (uint32_t)nh * (uint32_t)hd, (uint32_t)hd};
    fm_emu::encoder enc;
    enc.set_buffer(q, 0);
    enc.set_buffer(gate, 1);
    enc.set_buffer(q2, 2);
    enc.set_bytes(&a, sizeof a, 3);
    enc.dispatch("fm_split_q_gate", fm_metal_grid_eltwise(a.n));
}

void fm_emu_kv_write(float *cache, const float *src, int pos0, int T, int row) {
    const fm_kv_write_args a = {(uint32_t)T * (uint32_t)row, (uint32_t)row, (uint32_t)pos0};
    fm_emu::encoder enc;
    enc.set_buffer(cache, 0);
    enc.set_buffer(src, 1);
    enc.set_bytes(&a, sizeof a, 2);
    enc.dispatch("fm_kv_write", fm_metal_grid_eltwise(a.n));
}

void fm_emu_gate_rows(float *out, const float *g, int T, int n) {
    const fm_gate_rows_args a = {(uint32_t)T * (uint32_t)n, (uint32_t)n};
    fm_emu::encoder enc;
    enc.set_buffer(out, 0);
    enc.set_buffer(g, 1);
    enc.set_bytes(&a, sizeof a, 2);
    enc.dispatch("fm_gate_rows", fm_metal_grid_eltwise(a.total));
}

void fm_emu_deltanet_gates(float *b, float *ga, const float *A_log, const float *dt_bias, int T, int Hv) {
    const fm_deltanet_gates_args a = {(uint32_t)T * (uint32_t)Hv, (uint32_t)Hv};
    fm_emu::encoder enc;
    enc.set_buffer(b, 0);
    enc.set_buffer(ga, 1);
    enc.set_buffer(A_log, 2);
    enc.set_buffer(dt_bias, 3);
    enc.set_bytes(&a, sizeof a, 4);
    enc.dispatch("fm_deltanet_gates", fm_metal_grid_eltwise(a.n));
}

void fm_emu_deltanet_split(float *q, float *k, float *v, const float *conv, int T, int kd, int vd) {
    const fm_deltanet_split_args a = {(uint32_t)T * (2 * (uint32_t)kd + (uint32_t)vd), (uint32_t)kd, (uint32_t)vd};
    fm_emu::encoder enc;
    enc.set_buffer(q, 0);
    enc.set_buffer(k, 1);
    enc.set_buffer(v, 2);
    enc.set_buffer(conv, 3);
    enc.set_bytes(&a, sizeof a, 4);
    enc.dispatch("fm_deltanet_split", fm_metal_grid_eltwise(a.n));
}

void fm_emu_conv1d_silu(float *out, const float *x, float *state, const float *w, int T, int C, int K) {
    if (K < 1) fm_emu::fail("conv1d_silu: K %d must be >= 1", K);
    const fm_conv1d_args a = {(uint32_t)T, (uint32_t)C, (uint32_t)K};
    fm_emu::encoder enc;
    enc.set_buffer(out, 0);
    enc.set_buffer(x, 1);
    enc.set_buffer(state, 2);
    enc.set_buffer(w, 3);
    enc.set_bytes(&a, sizeof a, 4);
    enc.dispatch("fm_conv1d_silu", fm_metal_grid_conv1d(a.C));
}

void fm_emu_moe_combine(float *out, const float *ye, const int32_t *row, const float *w, int T, int k, int h) {
    const fm_moe_combine_args a = {(uint32_t)T * (uint32_t)h, (uint32_t)h, (uint32_t)k};
    fm_emu::encoder enc;
    enc.set_buffer(out, 0);
    enc.set_buffer(ye, 1);
    enc.set_buffer(row, 2);
    enc.set_buffer(w, 3);
    enc.set_bytes(&a, sizeof a, 4);
    enc.dispatch("fm_moe_combine", fm_metal_grid_eltwise(a.n));
}

void fm_emu_embed(int bits, const void *data, const uint16_t *scales, const uint16_t *biases, int rows, int cols,
                  int group_size, int scale_bf16, const int32_t *ids, int T, float *out) {
    const int quant = bits == 4 || bits == 8;
    if (bits != 32 && bits != 16 && !quant) fm_emu::fail("embed: no kernel for %d-bit weights", bits);
    if (quant && (group_size <= 0 || cols % group_size || (bits == 4 && cols % 2)))
        fm_emu::fail("embed: cols %d must be a multiple of group_size %d (q4: even)", cols, group_size);
    const fm_embed_args a = {(uint32_t)rows, (uint32_t)cols, (uint32_t)(quant ? group_size : 0),
                             (uint32_t)(quant && scale_bf16)};
    fm_emu::encoder enc;
    enc.set_buffer(out, 0);
    enc.set_buffer(ids, 1); /* the host's ids, copied into a device buffer (here they already are one) */
    enc.set_bytes(&a, sizeof a, 2);
    enc.set_buffer(data, 3);
    if (quant) {
        enc.set_buffer(scales, 4);
        enc.set_buffer(biases, 5);
    }
    const char *k = bits == 32   ? "fm_embed_f32"
                    : bits == 16 ? "fm_embed_bf16"
                    : bits == 8  ? "fm_embed_q8"
                                 : "fm_embed_q4";
    enc.dispatch(k, fm_metal_grid_embed((uint32_t)T, a.cols));
}

void fm_emu_route(const float *logits, int T, int E, int k, int norm, int32_t *idx, float *weights) {
    if (k < 1 || k > E || k > FM_ROUTE_MAX_K)
        fm_emu::fail("route: k %d must be in [1, min(E %d, %d)]", k, E, FM_ROUTE_MAX_K);
    const fm_route_args a = {(uint32_t)E, (uint32_t)k, (uint32_t)(norm != 0)};
    fm_emu::encoder enc;
    enc.set_buffer(logits, 0);
    enc.set_buffer(idx, 1); /* idx and weights: device buffers the host copies back */
    enc.set_buffer(weights, 2);
    enc.set_bytes(&a, sizeof a, 3);
    enc.dispatch("fm_route", fm_metal_grid_route((uint32_t)T));
}

void fm_emu_attention(float *out, const float *q, const float *k_cache, const float *v_cache, int T, int pos0, int nh,
                      int nkv, int hd, float scale, int split) {
    if (hd < 1 || hd > FM_ATTN_MAX_HD) fm_emu::fail("attention: head_dim %d must be in 1..%d", hd, FM_ATTN_MAX_HD);
    if (nkv < 1 || nh % nkv) fm_emu::fail("attention: %d heads are not a multiple of %d KV heads", nh, nkv);
    if (T < 1) return;
    if (split < 0) split = fm_metal_attention_split((uint32_t)T, (uint32_t)nh, (uint32_t)hd, pos0);
    const fm_attention_args a = {(uint32_t)T, pos0, (uint32_t)nh, (uint32_t)nkv, (uint32_t)hd, scale,
                                 fm_metal_attention_chunks((uint32_t)T, pos0)};
    fm_emu::encoder enc;
    if (!split) {
        const fm_metal_grid g = fm_metal_grid_attention(a.T, a.nh, a.hd);
        enc.set_buffer(out, 0);
        enc.set_buffer(q, 1);
        enc.set_buffer(k_cache, 2);
        enc.set_buffer(v_cache, 3);
        enc.set_bytes(&a, sizeof a, 4);
        enc.set_threadgroup_memory_length(g.tg_bytes[0], 0);
        enc.dispatch("fm_attention", g);
        return;
    }
    /* flash-decoding: the chunks' partials to a scratch buffer (poisoned: a partial read before written,
     * or one of a chunk past a query's keys, shows as NaN), then merged */
    const size_t floats = (size_t)fm_metal_attention_partial_floats(a.T, a.nh, a.hd, pos0);
    float *partial = (float *)malloc(floats * sizeof(float));
    memset(partial, 0xFF, floats * sizeof(float));
    const fm_metal_grid g = fm_metal_grid_attention_split(a.T, a.nh, a.hd, pos0);
    enc.set_buffer(partial, 0);
    enc.set_buffer(q, 1);
    enc.set_buffer(k_cache, 2);
    enc.set_buffer(v_cache, 3);
    enc.set_bytes(&a, sizeof a, 4);
    enc.set_threadgroup_memory_length(g.tg_bytes[0], 0);
    enc.dispatch("fm_attention_split", g);
    fm_emu::encoder merge;
    merge.set_buffer(out, 0);
    merge.set_buffer(partial, 1);
    merge.set_bytes(&a, sizeof a, 2);
    merge.dispatch("fm_attention_merge", fm_metal_grid_attention_merge(a.T, a.nh, a.hd));
    free(partial);
}

void fm_emu_gated_delta(float *out, float *S, const float *q, const float *k, const float *v, const float *g,
                        const float *beta, int T, int pos0, int Hk, int Hv, int dk, int dv) {
    (void)pos0; /* the recurrent form: the same bits however the tokens are split into calls */
    if (dk < 1 || dk > FM_GDN_MAX_DK) fm_emu::fail("gated_delta: dk %d must be in 1..%d", dk, FM_GDN_MAX_DK);
    if (Hk < 1 || Hv % Hk) fm_emu::fail("gated_delta: %d value heads are not a multiple of %d key heads", Hv, Hk);
    if (T < 1) return;
    const fm_gated_delta_args a = {(uint32_t)T, (uint32_t)Hk, (uint32_t)Hv, (uint32_t)dk, (uint32_t)dv};
    fm_emu::encoder enc;
    enc.set_buffer(out, 0);
    enc.set_buffer(S, 1);
    enc.set_buffer(q, 2);
    enc.set_buffer(k, 3);
    enc.set_buffer(v, 4);
    enc.set_buffer(g, 5);
    enc.set_buffer(beta, 6);
    enc.set_bytes(&a, sizeof a, 7);
    enc.dispatch("fm_gated_delta", fm_metal_grid_gated_delta(a.Hv, a.dv));
}

/* One expert: its tokens' rows of xn gathered into xe (a single token is read in place), then
 * h1 = gate·x, h2 = up·x, h1 = silu(h1)·h2, rows [row0, row0 + n) of ye = down·h1: the matmul kernels, each
 * token computed as alone (batch invariance). The token list is the host's: copied into a buffer the GPU
 * reads (here plain memory, as shared memory on Apple Silicon). */
void fm_emu_experts(const fm_expert_work *work, int n_work, const float *xn, float *ye, int H) {
    for (int e = 0; e < n_work; e++) {
        const fm_expert_work *w = &work[e];
        const int n = w->n, I = w->gate->rows;
        scratch<float> xe(n > 1 ? (size_t)n * H : 0), h1((size_t)n * I), h2((size_t)n * I);
        const float *x = xn + (size_t)w->tok[0] * H;
        if (n > 1) {
            scratch<int32_t> tok((size_t)n);
            memcpy(tok.p, w->tok, sizeof(int32_t) * n);
            const fm_gather_args a = {(uint32_t)n, (uint32_t)H};
            fm_emu::encoder enc;
            enc.set_buffer(xe.p, 0);
            enc.set_buffer(xn, 1);
            enc.set_buffer(tok.p, 2);
            enc.set_bytes(&a, sizeof a, 3);
            enc.dispatch("fm_gather_rows", fm_metal_grid_gather(a.n, a.cols));
            x = xe.p;
        }
        fm_emu_matmul(w->gate, x, n, h1.p);
        fm_emu_matmul(w->up, x, n, h2.p);
        fm_emu_silu_mul(h1.p, h1.p, h2.p, n, I);
        fm_emu_matmul(w->down, h1.p, n, ye + (size_t)w->row0 * H);
    }
}
