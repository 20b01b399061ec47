/*
 * metal_ops.c — the Metal backend: the interface of ../backend.h as dispatches of the kernels of metal/
 * over the device layer of metal_device.h (Metal on Apple: metal_host.m; the CPU grid emulator in tests:
 * tests/metal_emu/device_emu.cpp). Everything here is plain C, so the argument structs, grids and buffer
 * bindings the GPU gets are the ones the emulated tests run.
 *
 * Memory is unified: every buffer is host memory the GPU reads in place. Ops are encoded in issue order
 * into the open command buffer; the host touches a buffer's bytes only after waiting for the command
 * buffers before it (to_host, from_host, copy, fill_zero, route), and an event is a committed command
 * buffer's serial. A kernel that cannot take an op's shape, or a failed command buffer, is an error that
 * finish() reports (the ops themselves return nothing): never a result computed without it.
 */
#include <stdlib.h>
#include <string.h>

#include "../../core/util.h"
#include "../backend.h"
#include "fm_metal_args.h"
#include "fm_metal_grid.h"
#include "metal_device.h"

enum { UPLOAD_MIN = 1 << 20, COMMIT_EVERY = 32 };

typedef struct {
    fm_mtl *d;
    fm_status err;   /* the first failure since the last finish() */
    uint64_t done;   /* every command buffer up to this serial has completed */
    int encoded;     /* dispatches in the open command buffer */
    /* Host arrays an op takes (token ids, expert token lists, routing rows and weights) are copied into
     * this arena, for the GPU to read when the op runs; it is reused from the start once every command
     * buffer has completed (after each router's sync, in practice). */
    uint8_t *upload;
    size_t upload_size, upload_used;
    /* attention's flash-decoding partials (fm_metal_attention_partial_floats), grown as needed */
    float *partial;
    size_t partial_size;
    /* GPU scratch that grows (after a wait: nothing in flight may use the old one): the int8 activations of
     * a matmul (xq, xd, xqs), and the routed experts' xe [n, H], h1, h2 [n, I]. Ops run in issue order, so
     * one op's use ends before the next one's begins. */
    void *xq_mem, *ffn_mem;
    size_t xq_size, ffn_size;
} metal_ctx;

const char *fm_mtl_kernel_name(fm_mtl_kernel k) {
    static const char *const names[FM_K_COUNT] = {
#define FM_MTL_NAME(id, name) name,
        FM_MTL_KERNELS(FM_MTL_NAME)
#undef FM_MTL_NAME
    };
    return (unsigned)k < FM_K_COUNT ? names[k] : "?";
}

/* Record the first failure (fm_fail has set the message), for finish() to report. */
static void metal_failed(metal_ctx *c, fm_status st) {
    if (c->err == FM_OK) c->err = st;
}

/* Send the open command buffer to the GPU; its serial. */
static uint64_t commit(metal_ctx *c) {
    c->encoded = 0;
    return fm_mtl_commit(c->d);
}

/* Commit what is encoded and wait for it: afterwards the host may read and write every buffer. */
static void sync_all(metal_ctx *c) {
    const uint64_t serial = commit(c);
    if (serial <= c->done) return;
    const fm_status st = fm_mtl_wait(c->d, serial);
    c->done = serial;
    c->upload_used = 0;
    if (st != FM_OK) metal_failed(c, st);
}

/* Room for `bytes` in the arena, for the ops encoded next: a host array copied in (upload) or an output the
 * host reads after a wait (route's); NULL (and the failure recorded) when out of memory. Valid until the next
 * call after a wait. */
static uint8_t *arena(metal_ctx *c, size_t bytes) {
    const size_t need = (bytes + 255) & ~(size_t)255;
    if (c->upload_used + need > c->upload_size) {
        sync_all(c); /* the arena is free again once nothing in flight reads it */
        c->upload_used = 0;
        if (need > c->upload_size) {
            const size_t size = need > UPLOAD_MIN ? need : UPLOAD_MIN;
            uint8_t *p = (uint8_t *)fm_mtl_alloc(c->d, size);
            if (!p) {
                metal_failed(c, fm_fail(FM_ERR_NOMEM, "metal backend: cannot allocate %zu bytes to upload to", size));
                return NULL;
            }
            if (c->upload) fm_mtl_free(c->d, c->upload, c->upload_size);
            c->upload = p, c->upload_size = size;
        }
    }
    uint8_t *dst = c->upload + c->upload_used;
    c->upload_used += need;
    return dst;
}

/* A copy of host bytes the GPU can read from the ops encoded next; NULL (and the failure recorded) when
 * out of memory. */
static const void *upload(metal_ctx *c, const void *host, size_t bytes) {
    uint8_t *dst = arena(c, bytes);
    if (dst) memcpy(dst, host, bytes);
    return dst;
}

/* *mem grown to at least `bytes` (GPU memory); NULL (and the failure recorded) when out of memory. */
static void *scratch(metal_ctx *c, void **mem, size_t *size, size_t bytes) {
    if (bytes <= *size) return *mem;
    sync_all(c); /* no command buffer in flight may still use the old one */
    if (*mem) fm_mtl_free(c->d, *mem, *size);
    *size = 0;
    *mem = fm_mtl_alloc(c->d, bytes);
    if (!*mem) {
        metal_failed(c, fm_fail(FM_ERR_NOMEM, "metal backend: cannot allocate %zu bytes of scratch", bytes));
        return NULL;
    }
    *size = bytes;
    return *mem;
}

static size_t max3(size_t a, size_t b, size_t c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

/* What the instance allocates for itself, at most, for calls of up to a segment of tokens: the upload
 * arena (a segment's routing tables fit it), int8 activations of the widest matmul input, the experts'
 * gathered rows and hidden states, attention's flash-decoding partials (at most FM_ATTN_SPLIT_MAX_FLOATS). */
static size_t metal_workspace_bytes(const fm_backend_params *p) {
    const fm_config *c = p->config;
    const size_t S = (size_t)(p->segment > p->chunk ? p->segment : p->chunk), H = (size_t)c->hidden_size;
    const size_t I = max3((size_t)c->moe_intermediate_size, (size_t)c->shared_expert_intermediate_size,
                          (size_t)c->intermediate_size);
    const size_t in = max3(H, I, max3((size_t)c->linear_num_value_heads * c->linear_value_head_dim,
                                      (size_t)c->num_attention_heads * c->head_dim, 0));
    const size_t xq = S * in + 2 * S * (in / 32 + 1) * 4 + 768;
    const size_t ffn = c->num_experts > 0 ? S * (H + 2 * I) * 4 + 768 : 0;
    return UPLOAD_MIN + xq + ffn + (size_t)FM_ATTN_SPLIT_MAX_FLOATS * sizeof(float);
}

static uint64_t metal_memory_limit(const fm_backend_params *p) {
    (void)p;
    return fm_mtl_working_set_limit(NULL);
}

static fm_status metal_create(const fm_backend_params *p, void **out) {
    (void)p;
    metal_ctx *c = (metal_ctx *)calloc(1, sizeof *c);
    if (!c) return fm_fail(FM_ERR_NOMEM, "metal backend: out of memory");
    *out = c;
    return fm_mtl_open(&c->d);
}

static void metal_destroy(void *ctx) {
    metal_ctx *c = (metal_ctx *)ctx;
    if (!c) return;
    if (c->d) {
        sync_all(c);
        if (c->upload) fm_mtl_free(c->d, c->upload, c->upload_size);
        if (c->partial) fm_mtl_free(c->d, c->partial, c->partial_size);
        if (c->xq_mem) fm_mtl_free(c->d, c->xq_mem, c->xq_size);
        if (c->ffn_mem) fm_mtl_free(c->d, c->ffn_mem, c->ffn_size);
        fm_mtl_close(c->d);
    }
    free(c);
}

/* ---------------------------------------------------------------- memory and events */

static void *metal_alloc(void *ctx, fm_mem_kind kind, size_t bytes) {
    (void)kind;
    return fm_mtl_alloc(((metal_ctx *)ctx)->d, bytes);
}
static void metal_free(void *ctx, fm_mem_kind kind, void *p, size_t bytes) {
    (void)kind;
    metal_ctx *c = (metal_ctx *)ctx;
    if (!p) return;
    sync_all(c); /* no command buffer in flight may still use it */
    fm_mtl_free(c->d, p, bytes);
}
static void metal_fill_zero(void *ctx, void *p, size_t bytes) {
    sync_all((metal_ctx *)ctx);
    memset(p, 0, bytes);
}
static void metal_copy(void *ctx, void *dst, const void *src, size_t bytes) {
    sync_all((metal_ctx *)ctx);
    memcpy(dst, src, bytes);
}
/* backend.h argmax: the sampler's own, on the host over the logits where the GPU wrote them (unified memory: no
 * copy either way) */
static void metal_argmax(void *ctx, int32_t *out, const float *x, int n) {
    sync_all((metal_ctx *)ctx);
    *out = fm_argmax_f32(x, n);
}
static void *metal_host_view(void *ctx, void *p) {
    (void)ctx;
    return p; /* unified memory; the store writes a slot only after the event of its last use */
}
static void *metal_wrap_host(void *ctx, void *host, size_t bytes) {
    return fm_mtl_wrap(((metal_ctx *)ctx)->d, host, bytes) == 0 ? host : NULL;
}
static void metal_unwrap_host(void *ctx, void *p, size_t bytes) {
    metal_ctx *c = (metal_ctx *)ctx;
    sync_all(c);
    fm_mtl_unwrap(c->d, p, bytes);
}
static fm_event metal_record(void *ctx) { return commit((metal_ctx *)ctx); }
static void metal_wait(void *ctx, fm_event ev) {
    metal_ctx *c = (metal_ctx *)ctx;
    if (ev <= c->done) return;
    const fm_status st = fm_mtl_wait(c->d, ev);
    c->done = ev;
    if (st != FM_OK) metal_failed(c, st);
}
static fm_status metal_finish(void *ctx) {
    metal_ctx *c = (metal_ctx *)ctx;
    sync_all(c);
    const fm_status st = c->err;
    c->err = FM_OK;
    return st;
}

static void metal_device_stats(void *ctx, uint64_t out[FM_DEVICE_STATS]) {
    (void)ctx;
    memset(out, 0, FM_DEVICE_STATS * sizeof *out); /* unified memory: the host's expert cache is the GPU's */
}

/* ---------------------------------------------------------------- ops */

/* Bind the arguments struct at index i and dispatch. */
static void run(metal_ctx *c, fm_mtl_kernel k, const void *args, size_t len, int i, fm_metal_grid g) {
    fm_mtl_set_bytes(c->d, i, args, len);
    fm_mtl_dispatch(c->d, k, &g);
    /* Send work to the GPU while the host encodes the rest (MLX commits every few dozen ops): an open
     * command buffer runs nothing. */
    if (++c->encoded >= COMMIT_EVERY) commit(c);
}

/* y[T, rows] = x · Wᵀ: the matvec kernels for one token, the multi-token ones (FM_MM_TOKENS per threadgroup)
 * from FM_MM_MIN_TOKENS on, both computing each token in the same order (batch invariance,
 * fm_metal_matmul_tokens). q4/q8 on int8 activations where w->int8_act and the group size is a multiple of 32
 * up to 256, as on the CPU (cpu.h): x quantized first (quantize_x), then the integer kernels. */
static void metal_matmul(void *ctx, const fm_mat *w, const float *x, int T, float *y) {
    metal_ctx *c = (metal_ctx *)ctx;
    if (T <= 0 || w->rows <= 0) return;
    const int quant = w->dtype == FM_Q4 || w->dtype == FM_Q8, q4 = w->dtype == FM_Q4, gs = w->group_size;
    const fm_matmul_args a = {(uint32_t)w->rows, (uint32_t)w->cols, (uint32_t)(quant ? gs : 0),
                              (uint32_t)(quant && w->scale_bf16), (uint32_t)T};
    const fm_metal_grid g = fm_metal_grid_matmul(a.T, a.rows);
    const int mm = fm_metal_matmul_tokens(a.T) > 1;
    if (!quant) {
        fm_mtl_set_buffer(c->d, 0, w->data);
        fm_mtl_set_buffer(c->d, 1, x);
        fm_mtl_set_buffer(c->d, 2, y);
        const fm_mtl_kernel k = w->dtype == FM_F32 ? (mm ? FM_K_MM_F32 : FM_K_MV_F32) : (mm ? FM_K_MM_BF16 : FM_K_MV_BF16);
        run(c, k, &a, sizeof a, 3, g);
        return;
    }
    if (w->int8_act && gs % 32 == 0 && gs > 0 && gs <= 256) {
        if (gs & (gs - 1)) {
            metal_failed(c, fm_fail(FM_ERR_INVALID, "metal backend: matmul on int8 activations in groups of %d (the "
                                    "kernel takes 32, 64, 128 or 256)", gs));
            return;
        }
        /* xq [T, cols] int8, then xd and xqs [T, groups] fp32, each part 256-byte aligned */
        const size_t groups = (size_t)w->cols / (size_t)gs, n = (size_t)T * (size_t)w->cols;
        const size_t off_d = (n + 255) & ~(size_t)255, off_s = off_d + ((T * groups * 4 + 255) & ~(size_t)255);
        uint8_t *xq = (uint8_t *)scratch(c, &c->xq_mem, &c->xq_size, off_s + T * groups * 4);
        if (!xq) return;
        const fm_quantize_x_args qa = {(uint32_t)w->cols, (uint32_t)gs};
        fm_mtl_set_buffer(c->d, 0, x);
        fm_mtl_set_buffer(c->d, 1, xq);
        fm_mtl_set_buffer(c->d, 2, xq + off_d);
        fm_mtl_set_buffer(c->d, 3, xq + off_s);
        run(c, FM_K_QUANTIZE_X, &qa, sizeof qa, 4, fm_metal_grid_quantize_x(a.T, (uint32_t)groups));
        fm_mtl_set_buffer(c->d, 0, w->data);
        fm_mtl_set_buffer(c->d, 1, w->scales);
        fm_mtl_set_buffer(c->d, 2, w->biases);
        fm_mtl_set_buffer(c->d, 3, xq);
        fm_mtl_set_buffer(c->d, 4, xq + off_d);
        fm_mtl_set_buffer(c->d, 5, xq + off_s);
        fm_mtl_set_buffer(c->d, 6, y);
        const fm_mtl_kernel k = q4 ? (mm ? FM_K_QMM_Q4_I8 : FM_K_QMV_Q4_I8) : (mm ? FM_K_QMM_Q8_I8 : FM_K_QMV_Q8_I8);
        run(c, k, &a, sizeof a, 7, g);
        return;
    }
    if (w->cols % FM_QMV_VALUES_PER_LANE || gs <= 0 || gs % FM_QMV_VALUES_PER_LANE || w->cols % gs) {
        metal_failed(c, fm_fail(FM_ERR_INVALID, "metal backend: matmul of %d columns in groups of %d (the kernel "
                                "needs multiples of %d)", w->cols, gs, FM_QMV_VALUES_PER_LANE));
        return;
    }
    fm_mtl_set_buffer(c->d, 0, w->data);
    fm_mtl_set_buffer(c->d, 1, w->scales);
    fm_mtl_set_buffer(c->d, 2, w->biases);
    fm_mtl_set_buffer(c->d, 3, x);
    fm_mtl_set_buffer(c->d, 4, y);
    run(c, q4 ? (mm ? FM_K_QMM_Q4 : FM_K_QMV_Q4) : (mm ? FM_K_QMM_Q8 : FM_K_QMV_Q8), &a, sizeof a, 5, g);
}

static void metal_silu_mul(void *ctx, float *out, const float *g, const float *u, int T, int n);

/* Each expert on its tokens: their rows of xn gathered into xe (one token is read in place; the token list is
 * the host's, copied into the arena), then h1 = gate·x, h2 = up·x, h1 = silu(h1)·h2, and rows [row0, row0 + n)
 * of ye = down·h1, through the matmul kernels above (each token computed as alone: batch invariance). One
 * scratch for every expert, sized for the largest; the experts run one after another in issue order. */
/* An expert's scratch: its gathered rows xe (none for one token, read in place), then h1 and h2, each part
 * 256-byte aligned; *h_bytes the size of h1 (and h2), the result the offset of h1. */
static size_t ffn_layout(const fm_expert_work *w, int H, size_t *h_bytes) {
    const size_t n = (size_t)w->n;
    *h_bytes = (n * (size_t)w->gate->rows * 4 + 255) & ~(size_t)255;
    return n > 1 ? (n * (size_t)H * 4 + 255) & ~(size_t)255 : 0;
}

static void metal_experts(void *ctx, const fm_expert_work *work, int n_work, const float *xn, float *ye, int H) {
    metal_ctx *c = (metal_ctx *)ctx;
    size_t need = 0, h_bytes;
    for (int e = 0; e < n_work; e++) {
        const size_t xe_bytes = ffn_layout(&work[e], H, &h_bytes);
        if (xe_bytes + 2 * h_bytes > need) need = xe_bytes + 2 * h_bytes;
    }
    if (!need) return;
    uint8_t *mem = (uint8_t *)scratch(c, &c->ffn_mem, &c->ffn_size, need);
    if (!mem) return;
    for (int e = 0; e < n_work; e++) {
        const fm_expert_work *w = &work[e];
        if (w->n <= 0) continue;
        const size_t n = (size_t)w->n, I = (size_t)w->gate->rows, xe_bytes = ffn_layout(w, H, &h_bytes);
        float *h1 = (float *)(mem + xe_bytes), *h2 = (float *)(mem + xe_bytes + h_bytes);
        const float *x = xn + (size_t)w->tok[0] * H;
        if (n > 1) {
            const void *tok = upload(c, w->tok, n * sizeof *w->tok);
            if (!tok) return;
            const fm_gather_args a = {(uint32_t)n, (uint32_t)H};
            fm_mtl_set_buffer(c->d, 0, mem);
            fm_mtl_set_buffer(c->d, 1, xn);
            fm_mtl_set_buffer(c->d, 2, tok);
            run(c, FM_K_GATHER_ROWS, &a, sizeof a, 3, fm_metal_grid_gather(a.n, a.cols));
            x = (const float *)mem;
        }
        metal_matmul(c, w->gate, x, w->n, h1);
        metal_matmul(c, w->up, x, w->n, h2);
        metal_silu_mul(c, h1, h1, h2, w->n, (int)I);
        metal_matmul(c, w->down, h1, w->n, ye + (size_t)w->row0 * H);
    }
}

static void metal_rmsnorm(void *ctx, float *out, const float *x, const float *w, int T, int n, float eps, int zc) {
    metal_ctx *c = (metal_ctx *)ctx;
    if (T <= 0) return;
    const fm_rmsnorm_args a = {(uint32_t)n, eps, (uint32_t)(zc != 0)};
    fm_mtl_set_buffer(c->d, 0, out);
    fm_mtl_set_buffer(c->d, 1, x);
    fm_mtl_set_buffer(c->d, 2, w);
    run(c, FM_K_RMSNORM, &a, sizeof a, 3, fm_metal_grid_rmsnorm((uint32_t)T, a.n));
}

static void metal_l2norm(void *ctx, float *x, int T, int n, float eps, float scale) {
    metal_ctx *c = (metal_ctx *)ctx;
    if (T <= 0) return;
    const fm_l2norm_args a = {(uint32_t)n, eps, scale};
    fm_mtl_set_buffer(c->d, 0, x);
    run(c, FM_K_L2NORM, &a, sizeof a, 1, fm_metal_grid_l2norm((uint32_t)T, a.n));
}

static void metal_rope(void *ctx, float *x, int T, int heads, int hd, int rot, int pos0, float theta) {
    metal_ctx *c = (metal_ctx *)ctx;
    if (T <= 0 || rot <= 0) return;
    const fm_rope_args a = {(uint32_t)heads, (uint32_t)hd, (uint32_t)rot, pos0, theta};
    fm_mtl_set_buffer(c->d, 0, x);
    run(c, FM_K_ROPE, &a, sizeof a, 1, fm_metal_grid_rope((uint32_t)T, a.heads, a.rot_dim));
}

static void eltwise(metal_ctx *c, fm_mtl_kernel k, float *out, const float *gate, const float *b, int T, int n) {
    if (T <= 0 || n <= 0) return;
    const fm_eltwise_args a = {(uint32_t)T * (uint32_t)n};
    fm_mtl_set_buffer(c->d, 0, out);
    fm_mtl_set_buffer(c->d, 1, gate);
    fm_mtl_set_buffer(c->d, 2, b);
    run(c, k, &a, sizeof a, 3, fm_metal_grid_eltwise(a.n));
}
static void metal_silu_mul(void *ctx, float *out, const float *g, const float *u, int T, int n) {
    eltwise((metal_ctx *)ctx, FM_K_SILU_MUL, out, g, u, T, n);
}
static void metal_sigmoid_mul(void *ctx, float *out, const float *g, const float *x, int T, int n) {
    eltwise((metal_ctx *)ctx, FM_K_SIGMOID_MUL, out, g, x, T, n);
}

static void metal_add(void *ctx, float *x, const float *y, size_t n) {
    metal_ctx *c = (metal_ctx *)ctx;
    if (!n) return;
    const fm_add_args a = {(uint32_t)n};
    fm_mtl_set_buffer(c->d, 0, x);
    fm_mtl_set_buffer(c->d, 1, y);
    run(c, FM_K_ADD, &a, sizeof a, 2, fm_metal_grid_add(a.n));
}

static void metal_split_q_gate(void *ctx, float *q, float *gate, const float *q2, int T, int nh, int hd) {
    metal_ctx *c = (metal_ctx *)ctx;
    if (T <= 0 || nh <= 0 || hd <= 0) return;
    const fm_split_q_gate_args a = {(uint32_t)T * (uint32_t)nh * (uint32_t)hd, (uint32_t)hd};
    fm_mtl_set_buffer(c->d, 0, q);
    fm_mtl_set_buffer(c->d, 1, gate);
    fm_mtl_set_buffer(c->d, 2, q2);
    run(c, FM_K_SPLIT_Q_GATE, &a, sizeof a, 3, fm_metal_grid_eltwise(a.n));
}

static void metal_kv_write(void *ctx, float *cache, const float *src, int pos0, int T, int row) {
    metal_ctx *c = (metal_ctx *)ctx;
    if (T <= 0 || row <= 0) return;
    const fm_kv_write_args a = {(uint32_t)T * (uint32_t)row, (uint32_t)row, (uint32_t)pos0};
    fm_mtl_set_buffer(c->d, 0, cache);
    fm_mtl_set_buffer(c->d, 1, src);
    run(c, FM_K_KV_WRITE, &a, sizeof a, 2, fm_metal_grid_eltwise(a.n));
}

static void metal_conv1d_silu(void *ctx, float *out, const float *x, float *state, const float *w, int T, int C,
                              int K) {
    metal_ctx *c = (metal_ctx *)ctx;
    if (T <= 0 || C <= 0) return;
    if (K < 1) {
        metal_failed(c, fm_fail(FM_ERR_INVALID, "metal backend: conv1d_silu of kernel size %d", K));
        return;
    }
    const fm_conv1d_args a = {(uint32_t)T, (uint32_t)C, (uint32_t)K};
    fm_mtl_set_buffer(c->d, 0, out);
    fm_mtl_set_buffer(c->d, 1, x);
    fm_mtl_set_buffer(c->d, 2, state); /* K = 1: an empty state, any address */
    fm_mtl_set_buffer(c->d, 3, w);
    run(c, FM_K_CONV1D_SILU, &a, sizeof a, 4, fm_metal_grid_conv1d(a.C));
}

static void metal_deltanet_split(void *ctx, float *q, float *k, float *v, const float *conv, int T, int kd, int vd) {
    metal_ctx *c = (metal_ctx *)ctx;
    if (T <= 0 || 2 * kd + vd <= 0) return;
    const fm_deltanet_split_args a = {(uint32_t)T * (2 * (uint32_t)kd + (uint32_t)vd), (uint32_t)kd, (uint32_t)vd};
    fm_mtl_set_buffer(c->d, 0, q);
    fm_mtl_set_buffer(c->d, 1, k);
    fm_mtl_set_buffer(c->d, 2, v);
    fm_mtl_set_buffer(c->d, 3, conv);
    run(c, FM_K_DELTANET_SPLIT, &a, sizeof a, 4, fm_metal_grid_eltwise(a.n));
}

static void metal_deltanet_gates(void *ctx, float *b, float *ga, const float *A_log, const float *dt_bias, int T,
                                 int Hv) {
    metal_ctx *c = (metal_ctx *)ctx;
    if (T <= 0 || Hv <= 0) return;
    const fm_deltanet_gates_args a = {(uint32_t)T * (uint32_t)Hv, (uint32_t)Hv};
    fm_mtl_set_buffer(c->d, 0, b);
    fm_mtl_set_buffer(c->d, 1, ga);
    fm_mtl_set_buffer(c->d, 2, A_log);
    fm_mtl_set_buffer(c->d, 3, dt_bias);
    run(c, FM_K_DELTANET_GATES, &a, sizeof a, 4, fm_metal_grid_eltwise(a.n));
}

static void metal_gate_rows(void *ctx, float *out, const float *g, int T, int n) {
    metal_ctx *c = (metal_ctx *)ctx;
    if (T <= 0 || n <= 0) return;
    const fm_gate_rows_args a = {(uint32_t)T * (uint32_t)n, (uint32_t)n};
    fm_mtl_set_buffer(c->d, 0, out);
    fm_mtl_set_buffer(c->d, 1, g);
    run(c, FM_K_GATE_ROWS, &a, sizeof a, 2, fm_metal_grid_eltwise(a.total));
}

/* row and weights are the host's: copied into the arena for the kernel */
static void metal_moe_combine(void *ctx, float *out, const float *ye, const int32_t *row, const float *wt, int T, int k,
                              int h) {
    metal_ctx *c = (metal_ctx *)ctx;
    if (T <= 0 || k <= 0 || h <= 0) return;
    /* one piece of the arena for both: a second arena() may wait and start the arena over, on the first */
    const size_t n = (size_t)T * (size_t)k, off = (n * sizeof *row + 255) & ~(size_t)255;
    uint8_t *row_d = arena(c, off + n * sizeof *wt);
    if (!row_d) return;
    uint8_t *wt_d = row_d + off;
    memcpy(row_d, row, n * sizeof *row);
    memcpy(wt_d, wt, n * sizeof *wt);
    const fm_moe_combine_args a = {(uint32_t)T * (uint32_t)h, (uint32_t)h, (uint32_t)k};
    fm_mtl_set_buffer(c->d, 0, out);
    fm_mtl_set_buffer(c->d, 1, ye);
    fm_mtl_set_buffer(c->d, 2, row_d);
    fm_mtl_set_buffer(c->d, 3, wt_d);
    run(c, FM_K_MOE_COMBINE, &a, sizeof a, 4, fm_metal_grid_eltwise(a.n));
}

/* ids are the host's: copied into the arena for the kernel (an id outside [0, rows) gives a NaN row) */
static void metal_embed(void *ctx, const fm_mat *w, const int32_t *ids, int T, float *out) {
    metal_ctx *c = (metal_ctx *)ctx;
    if (T <= 0 || w->cols <= 0) return;
    const int quant = w->dtype == FM_Q8 || w->dtype == FM_Q4;
    if (quant && (w->group_size <= 0 || w->cols % w->group_size || (w->dtype == FM_Q4 && w->cols % 2))) {
        metal_failed(c, fm_fail(FM_ERR_INVALID, "metal backend: embed of %d columns in groups of %d", w->cols,
                                w->group_size));
        return;
    }
    const void *ids_d = upload(c, ids, (size_t)T * sizeof *ids);
    if (!ids_d) return;
    const fm_embed_args a = {(uint32_t)w->rows, (uint32_t)w->cols, (uint32_t)(quant ? w->group_size : 0),
                             (uint32_t)(quant && w->scale_bf16)};
    fm_mtl_set_buffer(c->d, 0, out);
    fm_mtl_set_buffer(c->d, 1, ids_d);
    fm_mtl_set_buffer(c->d, 3, w->data);
    if (quant) {
        fm_mtl_set_buffer(c->d, 4, w->scales);
        fm_mtl_set_buffer(c->d, 5, w->biases);
    }
    const fm_mtl_kernel k = w->dtype == FM_F32    ? FM_K_EMBED_F32
                            : w->dtype == FM_BF16 ? FM_K_EMBED_BF16
                            : w->dtype == FM_Q8   ? FM_K_EMBED_Q8
                                                  : FM_K_EMBED_Q4;
    run(c, k, &a, sizeof a, 2, fm_metal_grid_embed((uint32_t)T, a.cols));
}

/* idx and weights land on the host: the kernel writes them into the arena, and the host waits for it and
 * copies them out (the layer's one device → host transfer, backend.h) */
static void metal_route(void *ctx, const float *logits, int T, int E, int k, int norm, int32_t *idx, float *weights) {
    metal_ctx *c = (metal_ctx *)ctx;
    if (T <= 0) return;
    if (k < 1 || k > E || k > FM_ROUTE_MAX_K) {
        metal_failed(c, fm_fail(FM_ERR_INVALID, "metal backend: route of top %d of %d experts (the kernel takes k "
                                "<= %d)", k, E, FM_ROUTE_MAX_K));
        return;
    }
    const size_t n = (size_t)T * (size_t)k, off = (n * sizeof *idx + 255) & ~(size_t)255;
    uint8_t *idx_d = arena(c, off + n * sizeof *weights); /* one piece: see moe_combine */
    if (!idx_d) return;
    uint8_t *w_d = idx_d + off;
    const fm_route_args a = {(uint32_t)E, (uint32_t)k, (uint32_t)(norm != 0)};
    fm_mtl_set_buffer(c->d, 0, logits);
    fm_mtl_set_buffer(c->d, 1, idx_d);
    fm_mtl_set_buffer(c->d, 2, w_d);
    run(c, FM_K_ROUTE, &a, sizeof a, 3, fm_metal_grid_route((uint32_t)T));
    sync_all(c); /* (the arena's contents stay until the next op takes room in it) */
    memcpy(idx, idx_d, n * sizeof *idx);
    memcpy(weights, w_d, n * sizeof *weights);
}

/* Causal attention over the KV cache: one threadgroup per (head, token) walking the keys in chunks of
 * FM_ATTN_CHUNK, or, for a few queries over a long context (fm_metal_attention_split), one threadgroup
 * per chunk into a partials buffer and a merge. Both give the same bits (metal/attention.metal). */
static void metal_attention(void *ctx, float *out, const float *q, const float *k_cache, const float *v_cache, int T,
                            int pos0, int nh, int nkv, int hd, float scale) {
    metal_ctx *c = (metal_ctx *)ctx;
    if (T <= 0) return;
    if (hd < 1 || hd > FM_ATTN_MAX_HD || nkv < 1 || nh % nkv || pos0 < 0) {
        metal_failed(c, fm_fail(FM_ERR_INVALID, "metal backend: attention of %d heads over %d KV heads, head_dim %d "
                                "from position %d (the kernel takes head_dim 1..%d, heads a multiple of KV heads)",
                                nh, nkv, hd, pos0, FM_ATTN_MAX_HD));
        return;
    }
    const fm_attention_args a = {(uint32_t)T, pos0, (uint32_t)nh, (uint32_t)nkv, (uint32_t)hd, scale,
                                 fm_metal_attention_chunks((uint32_t)T, pos0)};
    if (!fm_metal_attention_split(a.T, a.nh, a.hd, pos0)) {
        fm_mtl_set_buffer(c->d, 0, out);
        fm_mtl_set_buffer(c->d, 1, q);
        fm_mtl_set_buffer(c->d, 2, k_cache);
        fm_mtl_set_buffer(c->d, 3, v_cache);
        run(c, FM_K_ATTENTION, &a, sizeof a, 4, fm_metal_grid_attention(a.T, a.nh, a.hd));
        return;
    }
    const size_t bytes = (size_t)fm_metal_attention_partial_floats(a.T, a.nh, a.hd, pos0) * sizeof(float);
    if (bytes > c->partial_size) {
        sync_all(c); /* no command buffer in flight may still use the old one */
        if (c->partial) fm_mtl_free(c->d, c->partial, c->partial_size);
        c->partial_size = 0;
        if (!(c->partial = (float *)fm_mtl_alloc(c->d, bytes))) {
            metal_failed(c, fm_fail(FM_ERR_NOMEM, "metal backend: cannot allocate %zu bytes for attention", bytes));
            return;
        }
        c->partial_size = bytes;
    }
    fm_mtl_set_buffer(c->d, 0, c->partial);
    fm_mtl_set_buffer(c->d, 1, q);
    fm_mtl_set_buffer(c->d, 2, k_cache);
    fm_mtl_set_buffer(c->d, 3, v_cache);
    run(c, FM_K_ATTENTION_SPLIT, &a, sizeof a, 4, fm_metal_grid_attention_split(a.T, a.nh, a.hd, pos0));
    fm_mtl_set_buffer(c->d, 0, out);
    fm_mtl_set_buffer(c->d, 1, c->partial);
    run(c, FM_K_ATTENTION_MERGE, &a, sizeof a, 2, fm_metal_grid_attention_merge(a.T, a.nh, a.hd));
}

/* The gated delta rule, the recurrent form for every T (metal/gated_delta.metal): one token after
 * another, so the same bits however the tokens are split into calls, at multiples of FM_DELTANET_CHUNK
 * or anywhere else; pos0 is not needed. */
static void metal_gated_delta(void *ctx, float *out, float *S, const float *q, const float *k, const float *v,
                              const float *g, const float *beta, int T, int pos0, int Hk, int Hv, int dk, int dv) {
    metal_ctx *c = (metal_ctx *)ctx;
    (void)pos0;
    if (T <= 0) return;
    if (dk < 1 || dk > FM_GDN_MAX_DK || dv < 1 || Hk < 1 || Hv % Hk) {
        metal_failed(c, fm_fail(FM_ERR_INVALID, "metal backend: gated delta of %d value heads over %d key heads, dk %d, "
                                "dv %d (the kernel takes dk 1..%d, value heads a multiple of key heads)",
                                Hv, Hk, dk, dv, FM_GDN_MAX_DK));
        return;
    }
    const fm_gated_delta_args a = {(uint32_t)T, (uint32_t)Hk, (uint32_t)Hv, (uint32_t)dk, (uint32_t)dv};
    fm_mtl_set_buffer(c->d, 0, out);
    fm_mtl_set_buffer(c->d, 1, S);
    fm_mtl_set_buffer(c->d, 2, q);
    fm_mtl_set_buffer(c->d, 3, k);
    fm_mtl_set_buffer(c->d, 4, v);
    fm_mtl_set_buffer(c->d, 5, g);
    fm_mtl_set_buffer(c->d, 6, beta);
    run(c, FM_K_GATED_DELTA, &a, sizeof a, 7, fm_metal_grid_gated_delta(a.Hv, a.dv));
}

static const fm_backend_ops metal_ops = {
    .name = "metal",
    .workspace_bytes = metal_workspace_bytes,
    .memory_limit = metal_memory_limit,
    .create = metal_create,
    .destroy = metal_destroy,
    .alloc = metal_alloc,
    .free = metal_free,
    .fill_zero = metal_fill_zero,
    .copy = metal_copy,
    .to_host = metal_copy,
    .from_host = metal_copy,
    .host_view = metal_host_view,
    .wrap_host = metal_wrap_host,
    .unwrap_host = metal_unwrap_host,
    .record = metal_record,
    .wait = metal_wait,
    .finish = metal_finish,
    .device_stats = metal_device_stats,
    .matmul = metal_matmul,
    .embed = metal_embed,
    .rmsnorm = metal_rmsnorm,
    .l2norm = metal_l2norm,
    .rope = metal_rope,
    .silu_mul = metal_silu_mul,
    .sigmoid_mul = metal_sigmoid_mul,
    .add = metal_add,
    .split_q_gate = metal_split_q_gate,
    .kv_write = metal_kv_write,
    .conv1d_silu = metal_conv1d_silu,
    .deltanet_split = metal_deltanet_split,
    .deltanet_gates = metal_deltanet_gates,
    .route = metal_route,
    .gate_rows = metal_gate_rows,
    .experts = metal_experts,
    .moe_combine = metal_moe_combine,
    .attention = metal_attention,
    .gated_delta = metal_gated_delta,
    .argmax = metal_argmax,
};

const fm_backend_ops *fm_backend_metal(void) { return &metal_ops; }
