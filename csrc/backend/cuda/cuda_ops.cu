/*
 * cuda_ops.cu — the CUDA backend: the interface of ../backend.h on one NVIDIA GPU, over the kernels of
 * cuda_kernels.h: the instance, memory, events, the dense ops and the backend's table (cuda_ctx.h: the instance's
 * state and the helpers both halves use).
 *
 * Memory. Dense weights (copied in by wrap_host), sequence state and scratch live in device memory, all
 * counted against the instance's device budget (fm_backend_params.device_budget, the user's
 * gpu_memory_budget). Expert slots and staging are host memory pinned for the GPU (host_view gives the
 * same address): the expert store reads them from disk as on the CPU. They are the experts' host tier.
 *
 * Experts in three tiers: cuda_experts.cu.
 *
 * Ops queue on one compute stream in issue order, each kernel launched before the one before it ends where the
 * GPU is sm_90 or newer (programmatic dependent launch, launch.cuh; FLASHMOE_CUDA_PDL=0 turns it off). The one
 * device→host transfer of a layer is the router's top-k (route synchronises the compute stream). An op the
 * kernels cannot take, or a CUDA error, is recorded and reported by finish() (the ops return nothing): never a
 * result computed without it. finish() then empties the VRAM cache (vram_forget says why).
 */
#include <stdlib.h>
#include <string.h>

#include <new>

#include "cuda_ctx.h"
#include "launch.cuh"

namespace fm_cuda {

/* ---------------------------------------------------------------- instance */

size_t cuda_workspace_bytes(const fm_backend_params *p) {
    (void)p;
    return 2 * UPLOAD_MIN; /* host memory: the pinned upload arena and route's results */
}

uint64_t cuda_memory_limit(const fm_backend_params *p) {
    (void)p;
    return 0; /* host memory: the budget's alone (the device has its own, device_budget) */
}

fm_status cuda_create(const fm_backend_params *p, void **out) {
    cuda_ctx *c = new (std::nothrow) cuda_ctx();
    if (!c) return fm_fail(FM_ERR_NOMEM, "cuda backend: out of memory");
    *out = c;
    pthread_mutex_init(&c->mu, nullptr);
    c->cfg = p->config;
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        cudaGetLastError();
        return fm_fail(FM_ERR_DEVICE, "cuda backend: no CUDA device (the driver found none)");
    }
    const char *env = getenv("FLASHMOE_CUDA_DEVICE");
    c->dev = env && *env ? atoi(env) : 0;
    if (c->dev < 0 || c->dev >= n) return fm_fail(FM_ERR_INVALID, "cuda backend: FLASHMOE_CUDA_DEVICE=%d, but %d devices", c->dev, n);
    if (cudaSetDevice(c->dev) != cudaSuccess || cudaStreamCreateWithFlags(&c->s, cudaStreamNonBlocking) != cudaSuccess ||
        cudaStreamCreateWithFlags(&c->cs, cudaStreamNonBlocking) != cudaSuccess)
        return fm_fail(FM_ERR_DEVICE, "cuda backend: cannot open device %d: %s", c->dev, cudaGetErrorString(cudaGetLastError()));
    fmc_pdl_on(); /* decided now, on this device, outside any capture */
    for (int i = 0; i < EVENT_RING; i++)
        if (cudaEventCreateWithFlags(&c->ring[i], cudaEventDisableTiming) != cudaSuccess)
            return fm_fail(FM_ERR_DEVICE, "cuda backend: cannot create events");
    for (cudaEvent_t *e : {&c->hx_ev, &c->hy_ev, &c->gpu_ev, &c->route_ev})
        if (cudaEventCreateWithFlags(e, cudaEventDisableTiming) != cudaSuccess)
            return fm_fail(FM_ERR_DEVICE, "cuda backend: cannot create events");
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    c->budget = p->device_budget ? p->device_budget : (free_b > DEFAULT_RESERVE ? free_b - DEFAULT_RESERVE : free_b / 2);
    if (p->device_budget > free_b)
        return fm_fail(FM_ERR_BUDGET, "cuda backend: gpu_memory_budget %.1f MiB, but device %d has %.1f MiB free",
                       p->device_budget / (double)MiB, c->dev, free_b / (double)MiB);
    c->n_layers = p->config->num_hidden_layers;
    c->n_exp = p->config->num_experts > 0 ? p->config->num_experts : 0;
    c->key_space = c->n_layers * c->n_exp;
    if (cudaMallocHost((void **)&c->step_host, 4 * sizeof(int32_t)) != cudaSuccess) {
        cudaGetLastError();
        c->step_host = nullptr;
        return fm_fail(FM_ERR_NOMEM, "cuda backend: cannot pin host memory");
    }
    if (!(c->step_dev = (int32_t *)dmalloc(c, step_dev_bytes(c), "the decode step's token"))) return c->err;
    return FM_OK;
}

void cuda_destroy(void *ctx) {
    cuda_ctx *c = ctx_of(ctx);
    if (!c) return;
    if (c->s) {
        cudaStreamSynchronize(c->cs);
        cudaStreamSynchronize(c->s);
    }
    vram_free(c);
    if (c->graph) cudaGraphExecDestroy(c->graph);
    if (c->step_dev) dfree(c, c->step_dev, step_dev_bytes(c));
    if (c->step_host) cudaFreeHost(c->step_host);
    dfree(c, c->mm.p, c->mm.size), dfree(c, c->opbuf.p, c->opbuf.size), dfree(c, c->ffn.p, c->ffn.size);
    dfree(c, c->up_dev, c->up_size), dfree(c, c->route_dev.p, c->route_dev.size), dfree(c, c->pr.p, c->pr.size);
    if (c->up_host) cudaFreeHost(c->up_host);
    if (c->pr_pinned) cudaFreeHost(c->pr_pinned);
    if (c->route_host) cudaFreeHost(c->route_host);
    for (int i = 0; i < EVENT_RING; i++)
        if (c->ring[i]) cudaEventDestroy(c->ring[i]);
    for (cudaEvent_t e : {c->hx_ev, c->hy_ev, c->gpu_ev, c->route_ev})
        if (e) cudaEventDestroy(e);
    if (c->hx) cudaFreeHost(c->hx);
    if (c->hy) cudaFreeHost(c->hy);
    if (c->s) cudaStreamDestroy(c->s);
    if (c->cs) cudaStreamDestroy(c->cs);
    pthread_mutex_destroy(&c->mu);
    delete c;
}

/* ---------------------------------------------------------------- memory and events */

bool host_kind(fm_mem_kind kind) { return kind == FM_MEM_EXPERT_SLOTS || kind == FM_MEM_STAGING; }

void *cuda_alloc(void *ctx, fm_mem_kind kind, size_t bytes) {
    cuda_ctx *c = ctx_of(ctx);
    forget_q(c);
    if (no_sync(c)) return nullptr;
    if (host_kind(kind)) { /* 2 MiB aligned for O_DIRECT and huge pages, then pinned for the copy engines */
        void *p = fm_alloc_weights(bytes);
        if (p && cudaHostRegister(p, bytes, cudaHostRegisterDefault) != cudaSuccess) {
            cudaGetLastError();
            fm_free(p);
            fm_fail(FM_ERR_NOMEM, "cuda backend: cannot pin %.1f MiB of host memory for the expert cache",
                    bytes / (double)MiB);
            return nullptr;
        }
        return p;
    }
    void *p = dmalloc(c, bytes, kind == FM_MEM_DENSE ? "the dense weights" : kind == FM_MEM_STATE ? "the sequence state"
                                                                                                   : "scratch");
    if (p && kind != FM_MEM_DENSE && cudaMemset(p, 0, bytes) != cudaSuccess) {
        dfree(c, p, bytes);
        return nullptr;
    }
    return p;
}

void cuda_free(void *ctx, fm_mem_kind kind, void *p, size_t bytes) {
    cuda_ctx *c = ctx_of(ctx);
    forget_q(c);
    if (!p || no_sync(c)) return;
    if (host_kind(kind)) {
        sync_all(c); /* nothing in flight may still copy from it */
        cudaHostUnregister(p);
        fm_free(p);
        return;
    }
    dfree(c, p, bytes);
}

void cuda_fill_zero(void *ctx, void *p, size_t bytes) {
    cuda_ctx *c = ctx_of(ctx);
    forget_q(c);
    ok(c, cudaMemsetAsync(p, 0, bytes, c->s), "fill_zero");
}

void cuda_copy(void *ctx, void *dst, const void *src, size_t bytes) {
    cuda_ctx *c = ctx_of(ctx);
    forget_q(c);
    ok(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, c->s), "copy");
}

void cuda_to_host(void *ctx, void *host, const void *src, size_t bytes) {
    cuda_ctx *c = ctx_of(ctx);
    if (no_sync(c)) return;
    const double t0 = fm_now(); /* a copy to pageable memory returns when the stream has run up to it */
    const bool copied = ok(c, cudaMemcpyAsync(host, src, bytes, cudaMemcpyDefault, c->s), "copy to the host");
    c->wait_ns += (uint64_t)((fm_now() - t0) * 1e9);
    if (copied) sync_all(c);
}

/* backend.h argmax: two kernels, then its 4 bytes to the host (a row of up to the vocabulary's size) */
void cuda_argmax(void *ctx, int32_t *out, const float *x, int n) {
    cuda_ctx *c = ctx_of(ctx);
    if (no_sync(c)) return; /* never recorded: the core asks after step_end */
    if (n > c->cfg->vocab_size) {
        failed(c, fm_fail(FM_ERR_INVALID, "cuda backend: argmax over %d values, more than the vocabulary's %d", n,
                          c->cfg->vocab_size));
        return;
    }
    launched(c, fmc_argmax(c->s, c->step_dev + 2, x, n, c->step_dev + 4), "argmax");
    cuda_to_host(ctx, c->step_host + 2, c->step_dev + 2, sizeof(int32_t));
    if (c->err == FM_OK) *out = c->step_host[2];
}

void cuda_from_host(void *ctx, void *dst, const void *host, size_t bytes) {
    cuda_ctx *c = ctx_of(ctx);
    forget_q(c);
    if (no_sync(c)) return;
    /* synchronous: the caller may reuse its buffer on return */
    if (ok(c, cudaMemcpyAsync(dst, host, bytes, cudaMemcpyDefault, c->s), "copy from the host")) sync_all(c);
}

void *cuda_host_view(void *ctx, void *p) {
    (void)ctx;
    cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        cudaGetLastError();
        return nullptr;
    }
    return a.type == cudaMemoryTypeHost ? p : nullptr; /* expert slots, staging: pinned host memory */
}

void *cuda_wrap_host(void *ctx, void *host, size_t bytes) {
    cuda_ctx *c = ctx_of(ctx);
    forget_q(c);
    void *d = dmalloc(c, bytes, "the dense weights");
    if (!d) return nullptr;
    if (cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice) != cudaSuccess) {
        fm_fail(FM_ERR_DEVICE, "cuda backend: copying the dense weights in: %s", cudaGetErrorString(cudaGetLastError()));
        dfree(c, d, bytes);
        return nullptr;
    }
    return d;
}

void cuda_unwrap_host(void *ctx, void *p, size_t bytes) {
    forget_q(ctx_of(ctx));
    dfree(ctx_of(ctx), p, bytes);
}

fm_event cuda_record(void *ctx) {
    cuda_ctx *c = ctx_of(ctx);
    if (no_sync(c)) return 0; /* an event recorded into a graph means nothing outside it */
    pthread_mutex_lock(&c->mu);
    const uint64_t ev = ++c->serial;
    ok(c, cudaEventRecord(c->ring[ev % EVENT_RING], c->s), "record");
    pthread_mutex_unlock(&c->mu);
    return ev;
}

/* Called by the compute thread and by the expert store's I/O threads. An event whose ring entry has been
 * recorded again since waits for that later point: later, so still safe. */
void cuda_wait(void *ctx, fm_event ev) {
    cuda_ctx *c = ctx_of(ctx);
    pthread_mutex_lock(&c->mu);
    if (ev <= c->done) {
        pthread_mutex_unlock(&c->mu);
        return;
    }
    const bool in_ring = c->serial - ev < EVENT_RING;
    cudaEvent_t e = c->ring[ev % EVENT_RING];
    pthread_mutex_unlock(&c->mu);
    const cudaError_t r = in_ring ? cudaEventSynchronize(e) : cudaStreamSynchronize(c->s);
    pthread_mutex_lock(&c->mu);
    if (r == cudaSuccess && ev > c->done) c->done = ev;
    pthread_mutex_unlock(&c->mu);
}

fm_status cuda_finish(void *ctx) {
    cuda_ctx *c = ctx_of(ctx);
    sync_all(c);
    c->route_pending.logits = nullptr; /* a route_begin no route took up is dropped */
    ok(c, cudaGetLastError(), "a kernel");
    for (int i = 0; i < c->n_deliv; i++) /* moe_device's choices, landed in pinned memory */
        memcpy(c->deliv[i].dst, c->deliv[i].src, sizeof(int32_t) * c->deliv[i].n);
    c->n_deliv = 0;
    const fm_status st = c->err;
    c->err = FM_OK;
    if (st != FM_OK) {
        vram_forget(c); /* both streams have drained (or the device is lost) */
        fm_fail(st, "%s", c->err_msg);
    }
    return st;
}

void cuda_device_stats(void *ctx, uint64_t out[FM_DEVICE_STATS]) {
    const cuda_ctx *c = ctx_of(ctx);
    out[0] = (uint64_t)c->n_slots, out[1] = c->hits, out[2] = c->misses, out[3] = c->bytes_in;
    out[4] = c->replays, out[5] = c->recordings, out[6] = c->folds;
    out[7] = c->launch_ns, out[8] = c->wait_ns, out[9] = c->host_experts, out[10] = c->prompt_layers;
}

/* ---------------------------------------------------------------- ops */

void cuda_matmul(void *ctx, const fm_mat *w, const float *x, int T, float *y) {
    cuda_ctx *c = ctx_of(ctx);
    if (T <= 0 || w->rows <= 0) return;
    const size_t need = fmc_matmul_scratch_bytes(w, T);
    const void *buf = c->mm.p;
    void *scratch = need ? grow(c, &c->mm, need, "matmul scratch") : nullptr;
    if (need && !scratch) return;
    const bool have_q = need && scratch == buf && c->qx.x == x && c->qx.T == T && c->qx.cols == w->cols &&
                        c->qx.gs == w->group_size && c->qx.dtype == (int)w->dtype;
    const auto prev = c->qx;
    launched(c, fmc_matmul(c->s, w, x, T, y, scratch, have_q), "matmul"); /* forgets them */
    const size_t y_bytes = sizeof(float) * (size_t)T * w->rows;
    if (need && !overlaps(y, y_bytes, x, sizeof(float) * (size_t)T * w->cols))
        c->qx = {x, T, w->cols, w->group_size, (int)w->dtype}; /* x's, in the scratch now */
    else if (!need && prev.x && !overlaps(y, y_bytes, prev.x, sizeof(float) * (size_t)prev.T * prev.cols))
        c->qx = prev; /* a matmul on fp32 activations left the scratch and their x alone */
}

/* In a recording, where an op's pos0 is to come from: the step's position in device memory, which step_begin
 * writes before each replay. NULL when not recording. */
const int *dev_pos(cuda_ctx *c, int pos0, int T) {
    if (!c->capturing) return nullptr;
    if (pos0 != c->cap_pos || T != 1) c->broken = true; /* not the step step_begin was told of */
    return c->step_dev + 1;
}

void cuda_embed(void *ctx, const fm_mat *w, const int32_t *ids, int T, float *out) {
    cuda_ctx *c = ctx_of(ctx);
    if (T <= 0) return; /* ids were checked by the caller (the core's forward, the op tests) */
    if (c->capturing && (T != 1 || ids[0] != c->step_host[0])) c->broken = true;
    const int32_t *d = c->capturing ? c->step_dev : (const int32_t *)upload(c, ids, sizeof(int32_t) * (size_t)T);
    if (d) launched(c, fmc_embed(c->s, w, d, T, out), "embed");
}

void cuda_rmsnorm(void *ctx, float *out, const float *x, const float *w, int T, int n, float eps, int zc) {
    launched(ctx_of(ctx), fmc_rmsnorm(ctx_of(ctx)->s, out, x, w, T, n, eps, zc), "rmsnorm");
}
void cuda_l2norm(void *ctx, float *x, int T, int n, float eps, float scale) {
    launched(ctx_of(ctx), fmc_l2norm(ctx_of(ctx)->s, x, T, n, eps, scale), "l2norm");
}
void cuda_rope(void *ctx, float *x, int T, int heads, int hd, int rot, int pos0, float theta) {
    cuda_ctx *c = ctx_of(ctx);
    launched(c, fmc_rope(c->s, x, T, heads, hd, rot, pos0, dev_pos(c, pos0, T), theta), "rope");
}
void cuda_silu_mul(void *ctx, float *out, const float *g, const float *u, int T, int n) {
    launched(ctx_of(ctx), fmc_silu_mul(ctx_of(ctx)->s, out, g, u, (size_t)T * n), "silu_mul");
}
void cuda_sigmoid_mul(void *ctx, float *out, const float *g, const float *x, int T, int n) {
    launched(ctx_of(ctx), fmc_sigmoid_mul(ctx_of(ctx)->s, out, g, x, (size_t)T * n), "sigmoid_mul");
}
void cuda_add(void *ctx, float *x, const float *y, size_t n) {
    launched(ctx_of(ctx), fmc_add(ctx_of(ctx)->s, x, y, n), "add");
}
void cuda_split_q_gate(void *ctx, float *q, float *gate, const float *q2, int T, int nh, int hd) {
    launched(ctx_of(ctx), fmc_split_q_gate(ctx_of(ctx)->s, q, gate, q2, T, nh, hd), "split_q_gate");
}
void cuda_kv_write(void *ctx, float *cache, const float *src, int pos0, int T, int row) {
    cuda_ctx *c = ctx_of(ctx);
    launched(c, fmc_kv_write(c->s, cache, src, pos0, dev_pos(c, pos0, T), T, row), "kv_write");
}
void cuda_attention(void *ctx, float *out, const float *q, const float *kc, const float *vc, int T, int pos0, int nh,
                    int nkv, int hd, float scale) {
    cuda_ctx *c = ctx_of(ctx);
    if (T <= 0) return;
    const size_t floats = fmc_attention_scratch_floats(T, pos0, nh, hd);
    float *part = floats ? (float *)grow(c, &c->opbuf, floats * sizeof(float), "attention partials") : nullptr;
    if (floats && !part) return;
    const int *dpos = dev_pos(c, pos0, T);
    if (dpos) { /* the launches are those of every position of pos0's key block */
        const int kb = fmc_attention_key_block(), lo = pos0 / kb * kb;
        if (lo > c->cap_lo) c->cap_lo = lo;
        if (lo + kb < c->cap_hi) c->cap_hi = lo + kb;
    }
    launched(c, fmc_attention(c->s, out, q, kc, vc, T, pos0, dpos, nh, nkv, hd, scale, part), "attention");
}
void cuda_conv1d_silu(void *ctx, float *out, const float *x, float *state, const float *w, int T, int C, int K) {
    launched(ctx_of(ctx), fmc_conv1d_silu(ctx_of(ctx)->s, out, x, state, w, T, C, K), "conv1d_silu");
}
void cuda_deltanet_split(void *ctx, float *q, float *k, float *v, const float *conv, int T, int kd, int vd) {
    launched(ctx_of(ctx), fmc_deltanet_split(ctx_of(ctx)->s, q, k, v, conv, T, kd, vd), "deltanet_split");
}
void cuda_deltanet_gates(void *ctx, float *b, float *a, const float *A_log, const float *dt_bias, int T, int Hv) {
    launched(ctx_of(ctx), fmc_deltanet_gates(ctx_of(ctx)->s, b, a, A_log, dt_bias, T, Hv), "deltanet_gates");
}
void cuda_gated_delta(void *ctx, float *out, float *S, const float *q, const float *k, const float *v, const float *g,
                      const float *beta, int T, int pos0, int Hk, int Hv, int dk, int dv) {
    cuda_ctx *c = ctx_of(ctx);
    if (T <= 0) return;
    const size_t floats = fmc_gated_delta_scratch_floats(T, pos0, Hk, Hv, dk, dv); /* 0: the recurrent form */
    float *rec = floats ? (float *)grow(c, &c->opbuf, floats * sizeof(float), "the gated delta rule's scratch")
                        : nullptr;
    if (floats && !rec) return;
    launched(c, fmc_gated_delta(c->s, out, S, q, k, v, g, beta, T, pos0, Hk, Hv, dk, dv, rec), "gated_delta");
}
void cuda_gate_rows(void *ctx, float *out, const float *g, int T, int n) {
    launched(ctx_of(ctx), fmc_gate_rows(ctx_of(ctx)->s, out, g, T, n), "gate_rows");
}

/* The router's top-k on the device into route_dev, then its [T, k] indices and weights copied to pinned
 * route_host; false (failure recorded) when it could not be issued. */
bool route_issue(cuda_ctx *c, const float *logits, int T, int E, int k, int norm) {
    const size_t n = (size_t)T * k, bytes = n * (sizeof(int32_t) + sizeof(float));
    uint8_t *d = (uint8_t *)grow(c, &c->route_dev, bytes, "the router's output");
    if (!d) return false;
    if (bytes > c->route_host_size) {
        if (c->route_host) cudaFreeHost(c->route_host);
        c->route_host = nullptr, c->route_host_size = 0;
        if (cudaMallocHost((void **)&c->route_host, bytes) != cudaSuccess) {
            cudaGetLastError();
            failed(c, fm_fail(FM_ERR_NOMEM, "cuda backend: cannot allocate %zu bytes for the router's output", bytes));
            return false;
        }
        c->route_host_size = bytes;
    }
    launched(c, fmc_route(c->s, logits, T, E, k, norm, (int32_t *)d, (float *)(d + n * sizeof(int32_t)), nullptr,
                          nullptr, nullptr, nullptr), "route");
    return c->err == FM_OK && ok(c, cudaMemcpyAsync(c->route_host, d, bytes, cudaMemcpyDeviceToHost, c->s), "route");
}

/* FLASHMOE_CUDA_ROUTE_EARLY=1: route_begin issues a prompt's choices ahead of its shared expert (off until
 * measured: bench/RESULTS.md, session 20). Read at each call. */
int cuda_route_begin(void *ctx, const float *logits, int T, int E, int k, int norm) {
    cuda_ctx *c = ctx_of(ctx);
    c->route_pending.logits = nullptr;
    const char *env = getenv("FLASHMOE_CUDA_ROUTE_EARLY");
    if (T <= 0 || !env || strcmp(env, "1") != 0 || no_sync(c)) return 0;
    if (!route_issue(c, logits, T, E, k, norm) || !ok(c, cudaEventRecord(c->route_ev, c->s), "route")) return 0;
    c->route_pending = {logits, T, E, k, norm, c->uploads};
    return 1;
}

/* The router's choices to the host (the layer's one synchronisation): after route_begin with the same arguments,
 * a wait for its copy alone; else issued and waited for with everything before them. */
void cuda_route(void *ctx, const float *logits, int T, int E, int k, int norm, int32_t *idx, float *weights) {
    cuda_ctx *c = ctx_of(ctx);
    const auto p = c->route_pending; /* consumed by this call whatever it does */
    c->route_pending.logits = nullptr;
    if (T <= 0) return;
    if (no_sync(c)) { /* the recording is dropped; until then the core gets valid (made-up) choices */
        for (int i = 0; i < T * k; i++) idx[i] = i % k, weights[i] = 0.0f;
        return;
    }
    if (p.logits && p.logits == logits && p.T == T && p.E == E && p.k == k && p.norm == norm) {
        const double t0 = fm_now();
        if (!ok(c, cudaEventSynchronize(c->route_ev), "route")) return;
        c->wait_ns += (uint64_t)((fm_now() - t0) * 1e9);
        /* every op before the copy has run: the upload arena is free again unless the ops since uploaded */
        if (c->uploads == p.uploads) c->up_used = 0;
    } else {
        if (!route_issue(c, logits, T, E, k, norm)) return;
        sync_all(c);
        if (c->err != FM_OK) return;
    }
    const size_t n = (size_t)T * k;
    memcpy(idx, c->route_host, n * sizeof(int32_t));
    memcpy(weights, c->route_host + n * sizeof(int32_t), n * sizeof(float));
}

void cuda_moe_combine(void *ctx, float *out, const float *ye, const int32_t *row, const float *wt, int T, int k, int h) {
    cuda_ctx *c = ctx_of(ctx);
    if (T <= 0 || k <= 0) return;
    if (!row) { /* after moe_device: its rows (t·k + j) and weights, on the device */
        if (T != c->last_T || k != c->last_k) {
            failed(c, fm_fail(FM_ERR_INVALID, "cuda backend: moe_combine of %d x %d choices after moe_device's %d x %d",
                              T, k, c->last_T, c->last_k));
            return;
        }
        launched(c, fmc_moe_combine(c->s, out, ye, c->last_rows, c->last_w, T, k, h), "moe_combine");
        return;
    }
    /* one upload of both tables: a second could restart the arena and overwrite the first before it is read */
    const size_t n = (size_t)T * k;
    uint8_t *both = (uint8_t *)malloc(n * (sizeof(int32_t) + sizeof(float)));
    if (!both) {
        failed(c, fm_fail(FM_ERR_NOMEM, "cuda backend: out of memory"));
        return;
    }
    memcpy(both, row, n * sizeof(int32_t));
    memcpy(both + n * sizeof(int32_t), wt, n * sizeof(float));
    const uint8_t *d = (const uint8_t *)upload(c, both, n * (sizeof(int32_t) + sizeof(float)));
    free(both);
    if (d) launched(c, fmc_moe_combine(c->s, out, ye, (const int32_t *)d, (const float *)(d + n * sizeof(int32_t)),
                                       T, k, h), "moe_combine");
}

} // namespace fm_cuda

#ifndef FLASHMOE_CUDA_EMU /* the emulator launches plainly (launch.cuh) */
namespace {
__global__ void pdl_probe() { fmc_pdl_wait(), fmc_pdl_trigger(); }
} // namespace

/* FLASHMOE_CUDA_PDL=0: every kernel launched plainly, never with programmatic dependent launch (launch.cuh). On
 * only where the code the device runs was built for sm_90 or newer (it holds the kernels' griddepcontrol.wait; the
 * device then is sm_90 too: a build for sm_80 alone runs on an H100 without it) and the runtime records PDL into
 * graphs (CUDA 12.3). Read once: cuda_create asks first, before anything is captured. */
bool fmc_pdl_on() {
    static const bool on = [] {
        if (CUDART_VERSION < 12030 || !fm_cuda::env_on("FLASHMOE_CUDA_PDL")) return false;
        cudaFuncAttributes fa;
        if (cudaFuncGetAttributes(&fa, pdl_probe) != cudaSuccess) {
            cudaGetLastError();
            return false;
        }
        return fa.ptxVersion >= 90;
    }();
    return on;
}
#endif

namespace fm_cuda {

const fm_backend_ops cuda_ops = {
    "cuda",
    cuda_workspace_bytes,
    cuda_memory_limit,
    cuda_create,
    cuda_destroy,
    cuda_alloc,
    cuda_free,
    cuda_fill_zero,
    cuda_copy,
    cuda_to_host,
    cuda_from_host,
    cuda_host_view,
    cuda_wrap_host,
    cuda_unwrap_host,
    cuda_record,
    cuda_wait,
    cuda_finish,
    cuda_device_stats,
    cuda_matmul,
    cuda_embed,
    cuda_rmsnorm,
    cuda_l2norm,
    cuda_rope,
    cuda_silu_mul,
    cuda_sigmoid_mul,
    cuda_add,
    cuda_split_q_gate,
    cuda_kv_write,
    cuda_attention,
    cuda_conv1d_silu,
    cuda_deltanet_split,
    cuda_deltanet_gates,
    cuda_gated_delta,
    cuda_route,
    cuda_gate_rows,
    cuda_experts,
    cuda_moe_combine,
    cuda_moe_device,
    cuda_step_begin,
    cuda_step_end,
    cuda_experts_preload,
    cuda_argmax,
    cuda_route_begin,
};

} // namespace fm_cuda

extern "C" const fm_backend_ops *fm_backend_cuda(void) { return &fm_cuda::cuda_ops; }

/* 1 when this machine has a CUDA device (backend.c's default: CUDA where one is found). */
extern "C" int fm_cuda_available(void) {
    int n = 0;
    const bool yes = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
    cudaGetLastError();
    return yes;
}
