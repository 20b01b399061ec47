/*
 * backend_cpu.c — the CPU backend: the interface of ../backend.h over the kernels of cpu.h, host memory,
 * and the thread pool (threads.h). Ops finish before they return, so events are always complete.
 *
 * The routed experts: a decode step's experts, and most of a prefill chunk's (~C·k/E tokens each), are
 * too small to split one matmul over the pool (a barrier per matmul). Those run side by side, one per
 * pool task, each on the lane of scratch of the thread running it; bigger ones are split over the pool.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../../core/util.h"
#include "../backend.h"
#include "cpu.h"
#include "threads.h"

enum { LANE_TOKENS = 64 }; /* experts of up to this many tokens run one per thread */

typedef struct {
    int H, I, chunk;
    int lanes;          /* threads the lanes were laid out for */
    int lane_tokens;    /* the most tokens of one expert a thread computes alone */
    size_t lane_floats; /* one lane: xe [lane_tokens, H], then h1, h2 [lane_tokens, I] */
    float *lanes_mem;   /* [lanes, lane_floats] */
    float *xe, *h1, *h2; /* one expert split over the pool: [C, H], [C, I], [C, I] */
    fm_expert_work *order; /* [E] the side-by-side batch, biggest first */
} cpu_ctx;

static size_t cpu_workspace_floats(const fm_backend_params *p, int lanes, int lane_tokens) {
    const fm_config *c = p->config;
    if (c->num_experts <= 0) return 0;
    const size_t H = c->hidden_size, I = c->moe_intermediate_size, C = p->chunk;
    return (size_t)lanes * lane_tokens * (H + 2 * I) + C * (H + 2 * I);
}

static int lane_tokens_for(const fm_backend_params *p) { return p->chunk < LANE_TOKENS ? p->chunk : LANE_TOKENS; }

static size_t cpu_workspace_bytes(const fm_backend_params *p) {
    return cpu_workspace_floats(p, fm_threads_get(), lane_tokens_for(p)) * sizeof(float) +
           (size_t)(p->config->num_experts > 0 ? p->config->num_experts : 0) * sizeof(fm_expert_work);
}

static uint64_t cpu_memory_limit(const fm_backend_params *p) {
    (void)p;
    return 0;
}

static fm_status cpu_create(const fm_backend_params *p, void **out) {
    cpu_ctx *c = (cpu_ctx *)calloc(1, sizeof *c);
    if (!c) return fm_fail(FM_ERR_NOMEM, "cpu backend: out of memory");
    *out = c;
    const fm_config *cfg = p->config;
    if (cfg->num_experts <= 0) return FM_OK;
    c->H = cfg->hidden_size;
    c->I = cfg->moe_intermediate_size;
    c->chunk = p->chunk;
    c->lanes = fm_threads_get();
    c->lane_tokens = lane_tokens_for(p);
    c->lane_floats = (size_t)c->lane_tokens * ((size_t)c->H + 2 * (size_t)c->I);
    c->lanes_mem = (float *)fm_alloc(cpu_workspace_floats(p, c->lanes, c->lane_tokens) * sizeof(float));
    c->order = (fm_expert_work *)calloc((size_t)cfg->num_experts, sizeof(fm_expert_work));
    if (!c->lanes_mem || !c->order) return fm_fail(FM_ERR_NOMEM, "cpu backend: cannot allocate expert scratch");
    c->xe = c->lanes_mem + (size_t)c->lanes * c->lane_floats;
    c->h1 = c->xe + (size_t)p->chunk * c->H;
    c->h2 = c->h1 + (size_t)p->chunk * c->I;
    return FM_OK;
}

static void cpu_destroy(void *ctx) {
    cpu_ctx *c = (cpu_ctx *)ctx;
    if (!c) return;
    fm_free(c->lanes_mem);
    free(c->order);
    free(c);
}

/* ---------------------------------------------------------------- memory and events */

static void *cpu_alloc(void *ctx, fm_mem_kind kind, size_t bytes) {
    (void)ctx;
    /* expert slots: 2 MiB aligned for O_DIRECT and huge pages (not zeroed: every byte is read into) */
    if (kind == FM_MEM_EXPERT_SLOTS || kind == FM_MEM_DENSE) return fm_alloc_weights(bytes);
    return fm_alloc(bytes);
}
static void cpu_free(void *ctx, fm_mem_kind kind, void *p, size_t bytes) { (void)ctx, (void)kind, (void)bytes; fm_free(p); }
static void cpu_fill_zero(void *ctx, void *p, size_t bytes) { (void)ctx; memset(p, 0, bytes); }
static void cpu_copy(void *ctx, void *dst, const void *src, size_t bytes) { (void)ctx; memcpy(dst, src, bytes); }
static void *cpu_host_view(void *ctx, void *p) { (void)ctx; return p; }
static void *cpu_wrap_host(void *ctx, void *host, size_t bytes) { (void)ctx, (void)bytes; return host; }
static void cpu_unwrap_host(void *ctx, void *p, size_t bytes) { (void)ctx, (void)p, (void)bytes; }
static fm_event cpu_record(void *ctx) { (void)ctx; return 0; }
static void cpu_wait(void *ctx, fm_event ev) { (void)ctx, (void)ev; }
static fm_status cpu_finish(void *ctx) { (void)ctx; return FM_OK; }
static void cpu_device_stats(void *ctx, uint64_t out[FM_DEVICE_STATS]) { (void)ctx, memset(out, 0, FM_DEVICE_STATS * sizeof *out); }

/* ---------------------------------------------------------------- ops */

static void cpu_matmul(void *ctx, const fm_mat *w, const float *x, int T, float *y) { (void)ctx; fm_cpu_matmul(w, x, T, y); }

static void cpu_embed(void *ctx, const fm_mat *w, const int32_t *ids, int T, float *out) {
    (void)ctx;
    for (int t = 0; t < T; t++) fm_cpu_get_row(w, ids[t], out + (size_t)t * w->cols);
}

static void cpu_rmsnorm(void *ctx, float *out, const float *x, const float *w, int T, int n, float eps, int zc) {
    (void)ctx;
    fm_cpu_rmsnorm(out, x, w, T, n, eps, zc);
}
static void cpu_l2norm(void *ctx, float *x, int T, int n, float eps, float scale) { (void)ctx; fm_cpu_l2norm(x, T, n, eps, scale); }
static void cpu_rope(void *ctx, float *x, int T, int heads, int hd, int rot, int pos0, float theta) {
    (void)ctx;
    fm_cpu_rope(x, T, heads, hd, rot, pos0, theta);
}
static void cpu_silu_mul(void *ctx, float *out, const float *g, const float *u, int T, int n) { (void)ctx; fm_cpu_silu_mul(out, g, u, T, n); }
static void cpu_sigmoid_mul(void *ctx, float *out, const float *g, const float *x, int T, int n) {
    (void)ctx;
    fm_cpu_sigmoid_mul(out, g, x, T, n);
}

static void cpu_add(void *ctx, float *x, const float *y, size_t n) {
    (void)ctx;
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}

static void cpu_split_q_gate(void *ctx, float *q, float *gate, const float *q2, int T, int nh, int hd) {
    (void)ctx;
    for (size_t th = 0; th < (size_t)T * nh; th++) {
        memcpy(q + th * hd, q2 + th * 2 * hd, sizeof(float) * hd);
        memcpy(gate + th * hd, q2 + th * 2 * hd + hd, sizeof(float) * hd);
    }
}

static void cpu_kv_write(void *ctx, float *cache, const float *src, int pos0, int T, int row) {
    (void)ctx;
    memcpy(cache + (size_t)pos0 * row, src, sizeof(float) * (size_t)T * row);
}

static void cpu_attention(void *ctx, float *out, const float *q, const float *kc, const float *vc, int T, int pos0, int nh,
                          int nkv, int hd, float scale) {
    (void)ctx;
    fm_cpu_attention(out, q, kc, vc, T, pos0, nh, nkv, hd, scale);
}

static void cpu_conv1d_silu(void *ctx, float *out, const float *x, float *state, const float *w, int T, int C, int K) {
    (void)ctx;
    fm_cpu_conv1d_silu(out, x, state, w, T, C, K);
}

static void cpu_deltanet_split(void *ctx, float *q, float *k, float *v, const float *conv, int T, int kd, int vd) {
    (void)ctx;
    const size_t row = 2 * (size_t)kd + vd;
    for (size_t t = 0; t < (size_t)T; t++) {
        memcpy(q + t * kd, conv + t * row, sizeof(float) * kd);
        memcpy(k + t * kd, conv + t * row + kd, sizeof(float) * kd);
        memcpy(v + t * vd, conv + t * row + 2 * kd, sizeof(float) * vd);
    }
}

static void cpu_deltanet_gates(void *ctx, float *b, float *a, const float *A_log, const float *dt_bias, int T, int Hv) {
    (void)ctx;
    for (int t = 0; t < T; t++)
        for (int h = 0; h < Hv; h++) {
            const size_t i = (size_t)t * Hv + h;
            b[i] = fm_sigmoid(b[i]);
            a[i] = -expf(A_log[h]) * fm_softplus(a[i] + dt_bias[h]);
        }
}

static void cpu_gated_delta(void *ctx, float *out, float *S, const float *q, const float *k, const float *v,
                            const float *g, const float *beta, int T, int pos0, int Hk, int Hv, int dk, int dv) {
    (void)ctx;
    /* Prefill: the chunked form, faster from 2 tokens on, best in chunks of 16 on AVX2 (bench/RESULTS.md,
     * 2026-11-28), aligned to absolute positions; decode (T = 1): the recurrent form, which the chunked
     * form also takes for a 1-token chunk. */
    if (T >= 2)
        fm_cpu_gated_delta_chunk(out, S, q, k, v, g, beta, T, Hk, Hv, dk, dv, FM_DELTANET_CHUNK, pos0);
    else
        fm_cpu_gated_delta(out, S, q, k, v, g, beta, T, Hk, Hv, dk, dv);
}

static void cpu_route(void *ctx, const float *logits, int T, int E, int k, int norm, int32_t *idx, float *w) {
    (void)ctx;
    for (int t = 0; t < T; t++)
        fm_cpu_topk_softmax(logits + (size_t)t * E, E, k, norm, idx + (size_t)t * k, w + (size_t)t * k);
}

static void cpu_gate_rows(void *ctx, float *out, const float *g, int T, int n) {
    (void)ctx;
    for (int t = 0; t < T; t++) {
        const float s = fm_sigmoid(g[t]);
        for (int i = 0; i < n; i++) out[(size_t)t * n + i] *= s;
    }
}

static void cpu_moe_combine(void *ctx, float *out, const float *ye, const int32_t *row, const float *wt, int T, int k,
                            int h) {
    (void)ctx;
    /* a fixed order (token, choice), whatever order the experts were computed in */
    for (int t = 0; t < T; t++)
        for (int j = 0; j < k; j++) {
            const float w = wt[(size_t)t * k + j];
            const float *y = ye + (size_t)row[(size_t)t * k + j] * h;
            float *o = out + (size_t)t * h;
            for (int i = 0; i < h; i++) o[i] += w * y[i];
        }
}

/* One expert on its n tokens: gather them from xn into xe [n, H] (one token is read in place), then
 * its rows of ye = down(silu(gate x) * up x) with h1, h2 [n, I]. */
static void expert_ffn(const fm_expert_work *w, const float *xn, float *ye, int H, float *xe, float *h1, float *h2) {
    const float *x = xn + (size_t)w->tok[0] * H;
    if (w->n > 1) {
        for (int r = 0; r < w->n; r++) memcpy(xe + (size_t)r * H, xn + (size_t)w->tok[r] * H, sizeof(float) * H);
        x = xe;
    }
    fm_cpu_matmul(w->gate, x, w->n, h1);
    fm_cpu_matmul(w->up, x, w->n, h2);
    fm_cpu_silu_mul(h1, h1, h2, w->n, w->gate->rows);
    fm_cpu_matmul(w->down, h1, w->n, ye + (size_t)w->row0 * H);
}

typedef struct {
    const cpu_ctx *c;
    const fm_expert_work *work;
    const float *xn;
    float *ye;
} lane_job;

static void lane_task(void *ctx, int j) {
    const lane_job *J = (const lane_job *)ctx;
    const cpu_ctx *c = J->c;
    float *xe = c->lanes_mem + (size_t)fm_thread_index() * c->lane_floats;
    const size_t tokens = c->lane_tokens;
    expert_ffn(&J->work[j], J->xn, J->ye, c->H, xe, xe + tokens * c->H, xe + tokens * (c->H + c->I));
}

static void cpu_experts(void *ctx, const fm_expert_work *work, int n_work, const float *xn, float *ye, int H) {
    cpu_ctx *c = (cpu_ctx *)ctx;
    const int threads = fm_threads_get(), lanes_ok = threads > 1 && threads <= c->lanes;
    int n_small = 0;
    for (int j = 0; j < n_work; j++) {
        if (lanes_ok && work[j].n <= c->lane_tokens) { /* insertion sort by tokens, descending, so the last
                                                        * task to finish is short */
            int at = n_small++;
            for (; at > 0 && c->order[at - 1].n < work[j].n; at--) c->order[at] = c->order[at - 1];
            c->order[at] = work[j];
        } else { /* split over the pool, at most a chunk of its tokens at a time (a prompt's expert may have
                  * more: the MoE runs on a whole segment) */
            for (int t0 = 0; t0 < work[j].n; t0 += c->chunk) {
                fm_expert_work piece = work[j];
                piece.tok += t0;
                piece.row0 += t0;
                piece.n = work[j].n - t0 < c->chunk ? work[j].n - t0 : c->chunk;
                expert_ffn(&piece, xn, ye, H, c->xe, c->h1, c->h2);
            }
        }
    }
    if (n_small == 1) {
        expert_ffn(&c->order[0], xn, ye, H, c->xe, c->h1, c->h2);
    } else if (n_small > 1) {
        lane_job J = {c, c->order, xn, ye};
        fm_parallel_for(n_small, lane_task, &J);
    }
}

/* backend.h argmax: the sampler's own */
static void cpu_argmax(void *ctx, int32_t *out, const float *x, int n) {
    (void)ctx;
    *out = fm_argmax_f32(x, n);
}

static const fm_backend_ops cpu_ops = {
    .name = "cpu",
    .workspace_bytes = cpu_workspace_bytes,
    .memory_limit = cpu_memory_limit,
    .create = cpu_create,
    .destroy = cpu_destroy,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .fill_zero = cpu_fill_zero,
    .copy = cpu_copy,
    .to_host = cpu_copy,
    .from_host = cpu_copy,
    .host_view = cpu_host_view,
    .wrap_host = cpu_wrap_host,
    .unwrap_host = cpu_unwrap_host,
    .record = cpu_record,
    .wait = cpu_wait,
    .finish = cpu_finish,
    .device_stats = cpu_device_stats,
    .matmul = cpu_matmul,
    .embed = cpu_embed,
    .rmsnorm = cpu_rmsnorm,
    .l2norm = cpu_l2norm,
    .rope = cpu_rope,
    .silu_mul = cpu_silu_mul,
    .sigmoid_mul = cpu_sigmoid_mul,
    .add = cpu_add,
    .split_q_gate = cpu_split_q_gate,
    .kv_write = cpu_kv_write,
    .attention = cpu_attention,
    .conv1d_silu = cpu_conv1d_silu,
    .deltanet_split = cpu_deltanet_split,
    .deltanet_gates = cpu_deltanet_gates,
    .gated_delta = cpu_gated_delta,
    .route = cpu_route,
    .gate_rows = cpu_gate_rows,
    .experts = cpu_experts,
    .moe_combine = cpu_moe_combine,
    .argmax = cpu_argmax,
};

const fm_backend_ops *fm_backend_cpu(void) { return &cpu_ops; }
