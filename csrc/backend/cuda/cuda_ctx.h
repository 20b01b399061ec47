/*
 * cuda_ctx.h — the CUDA backend's instance (cuda_ctx) and what its two halves share: cuda_ops.cu (the instance,
 * memory, events, the dense ops and the backend's table) and cuda_experts.cu (the expert tiers: the VRAM cache,
 * the host's share of the misses, moe_device, the recorded decode step, preload). Internal to them.
 */
#ifndef FM_CUDA_CTX_H
#define FM_CUDA_CTX_H

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "../backend.h"
#include "../../core/util.h" /* fm_now */
}
#include "cuda_kernels.h"

namespace fm_cuda {

constexpr size_t MiB = (size_t)1 << 20;
constexpr int EVENT_RING = 256;          /* record()'s events; an older one is waited for by a stream sync */
constexpr size_t UPLOAD_MIN = 4 * MiB;   /* host arrays an op takes: token ids, expert tokens, routing rows */
constexpr size_t DEFAULT_RESERVE = 1024 * MiB; /* left free on the device when no budget is given */
constexpr size_t VRAM_HEADROOM = 64 * MiB;     /* kept out of the VRAM expert cache for scratch that grows */
constexpr uint64_t PRELOAD_MARGIN = 512 * MiB; /* ... and by a preload at load, before any scratch has grown */
constexpr int DEV_T = 8;      /* moe_device: the most tokens a call (it runs each choice as an expert of one token) */
constexpr int DEV_K = 32;     /* ... and choices a token (fmc_route's MAX_K) */
constexpr int DEV_N = DEV_T * DEV_K;        /* ... so many choices a call */
constexpr int DEV_NX = DEV_T * (DEV_K + 1); /* ... and rows of experts with a shared expert's (folded) */

/* A copy the host reads after finish(): moe_device's choices, from pinned memory to the core's array. */
struct delivery {
    int32_t *dst;
    const int32_t *src;
    size_t n;
};

/* A grown-on-demand device buffer (only grows; the old one is freed after a sync). */
struct dbuf {
    void *p = nullptr;
    size_t size = 0;
};

struct cuda_ctx {
    int dev = 0;
    cudaStream_t s = nullptr;  /* compute */
    cudaStream_t cs = nullptr; /* expert copies into the VRAM cache */
    fm_status err = FM_OK;     /* the first failure since the last finish() */
    char err_msg[1024] = {};   /* ... and its message (later failures, often its echo, would overwrite it) */
    uint64_t budget = 0, used = 0; /* device bytes: the budget, and what this instance holds */
    const fm_config *cfg = nullptr;

    /* record()/wait(): event serials over a ring; the expert store's I/O threads wait too, hence the lock */
    pthread_mutex_t mu;
    cudaEvent_t ring[EVENT_RING] = {};
    uint64_t serial = 0, done = 0;

    /* host arrays for the ops: written into pinned memory, copied to the device arena on the stream; both
     * reused from the start once the stream has drained (after each router's sync or early wait, in practice) */
    uint8_t *up_host = nullptr, *up_dev = nullptr;
    size_t up_size = 0, up_used = 0;
    uint64_t uploads = 0; /* calls of upload so far */

    dbuf mm;   /* a matmul's int8 activations */
    /* ... of this x (T rows of cols, groups of gs, dtype's layout), still valid: no op has run since the matmul
     * that wrote them but matmuls reading x (q, k and v of one input; gate and up; in_proj_qkv and in_proj_z) */
    struct {
        const float *x;
        int T, cols, gs, dtype;
    } qx = {};
    /* the scratch of one op, never of two at once (ops run in issue order on one stream): attention's
     * partials, the chunked gated delta rule's per-chunk records */
    dbuf opbuf;
    dbuf ffn;  /* the experts' gathered rows and hidden states */
    dbuf route_dev;                 /* the router's [T, k] indices, then weights */
    uint8_t *route_host = nullptr;  /* the same, pinned, for the host to read */
    size_t route_host_size = 0;
    cudaEvent_t route_ev = nullptr; /* after route_begin's copy to route_host */
    struct {
        const float *logits;
        int T, E, k, norm;
        uint64_t uploads; /* c->uploads at route_begin */
    } route_pending = {};           /* route_begin's call (logits NULL: none) */

    /* the VRAM expert cache: n_slots of slot_bytes, LRU order as a doubly linked list (head: most recent) */
    int vram_ready = 0, n_slots = 0, key_space = 0;
    size_t slot_bytes = 0;
    uint8_t *pool = nullptr;
    int32_t *slot_key = nullptr, *key_slot = nullptr; /* [n_slots] key or -1; [key_space] slot or -1 */
    int *prev = nullptr, *next = nullptr, head = -1, tail = -1;
    unsigned char *locked = nullptr;   /* [n_slots] taken by the batch being issued (until its FFNs are issued) */
    unsigned char *pending = nullptr;  /* [n_slots] a copy in flight that compute has not yet waited on */
    cudaEvent_t *loaded = nullptr, *used_ev = nullptr; /* [n_slots] after its copy; after its last FFN */
    uint64_t hits = 0, misses = 0, bytes_in = 0;

    /* the host's share of decode's misses (host_experts): xn's rows and the host's FFN rows, pinned; events after
     * the copy of xn, after the copies of the rows into ye, and after the GPU's experts of the call */
    float *hx = nullptr, *hy = nullptr;
    size_t hx_size = 0, hy_size = 0;
    cudaEvent_t hx_ev = nullptr, hy_ev = nullptr, gpu_ev = nullptr;
    float host_share = 0.5f; /* of the candidates, under FLASHMOE_CUDA_HOST_EXPERTS=auto */
    float host_carry = 0.0f; /* the fraction of an expert the share has owed the host so far (host_pick) */
    uint64_t host_experts = 0;

    /* moe_device: where the cache holds every expert of the model (n_slots == key_space: nothing is ever evicted),
     * each layer's E experts as fmc_expert entries in VRAM, on the device once all of them are in */
    bool all_fit = false;
    int n_layers = 0, n_exp = 0;
    fmc_expert *tab_host = nullptr, *tab_dev = nullptr; /* [key_space] */
    int *layer_count = nullptr;                         /* [layers] experts of the layer in the cache */
    unsigned char *layer_ready = nullptr; /* [layers] 1: its table is on the device; 2: and its copies waited for */
    uint8_t *dev_buf = nullptr;  /* moe_device's device arrays (dev_arrays) */
    int32_t *idx_pinned = nullptr; /* [layers, DEV_N] the choices, for the host */
    delivery *deliv = nullptr;     /* [layers] copies for finish() to make */
    int n_deliv = 0;
    int last_T = 0, last_k = 0;    /* the last moe_device's, for moe_combine with no rows */
    const int32_t *last_rows = nullptr; /* ... and its choices' rows of ye and weights (device) */
    const float *last_w = nullptr;
    uint64_t folds = 0;            /* layers whose shared expert moe_device folded in */
    /* moe_device on a prompt (moe_prompt): its device arrays (prompt_arrays, for pr_cap choices of n_exp experts),
     * and the choices in pinned memory for the host ([layers, pr_pinned_cap]) */
    dbuf pr;
    int pr_cap = 0;
    int32_t *pr_pinned = nullptr;
    size_t pr_pinned_cap = 0;
    uint64_t prompt_layers = 0; /* MoE layers of prompts routed on the device */

    /* step_begin/step_end: one decode step recorded as a CUDA graph and replayed while still valid: the same
     * buffers (mem_gen: bumped by every reallocation a recording may point into) and a position whose key block
     * is the recording's (attention's grid and scratch; rope, kv_write and attention read pos from step_dev) */
    uint64_t mem_gen = 0;
    /* [4] token, pos, argmax's token, unused: pinned; device, then argmax's scratch (step_dev_bytes) */
    int32_t *step_host = nullptr, *step_dev = nullptr;
    bool capturing = false, broken = false;  /* recording; and something in it could not be recorded */
    int cap_pos = 0, cap_lo = 0, cap_hi = 0; /* the recorded position, the positions it is valid for */
    cudaGraphExec_t graph = nullptr;
    uint64_t graph_gen = 0, graph_hits = 0, graph_folds = 0; /* and the counts a replay adds */
    int graph_lo = 0, graph_hi = 0;
    delivery *graph_deliv = nullptr; /* [layers] the recording's deliveries */
    int graph_n_deliv = 0;
    uint64_t replays = 0, recordings = 0;
    uint64_t launch_ns = 0, wait_ns = 0; /* host time in graph launches, and blocked on the GPU (syncs, copies out) */
};

inline cuda_ctx *ctx_of(void *p) { return (cuda_ctx *)p; }

/* Records st, the status of an fm_fail just made, unless a failure is recorded already: the first is the cause
 * (a failed call's error comes back from cudaGetLastError at the next launch). finish() reports it. */
inline void failed(cuda_ctx *c, fm_status st) {
    if (c->err != FM_OK) return;
    c->err = st;
    snprintf(c->err_msg, sizeof c->err_msg, "%s", fm_last_error());
}

/* A CUDA call's error recorded (as FM_ERR_DEVICE, with what failed); 1 when it succeeded. */
inline bool ok(cuda_ctx *c, cudaError_t e, const char *what) {
    if (e == cudaSuccess) return true;
    failed(c, fm_fail(FM_ERR_DEVICE, "cuda backend: %s: %s", what, cudaGetErrorString(e)));
    return false;
}

inline bool overlaps(const void *a, size_t an, const void *b, size_t bn) {
    return (uintptr_t)a < (uintptr_t)b + bn && (uintptr_t)b < (uintptr_t)a + an;
}

/* Any op but a matmul may write a matmul's x: its int8 activations are to be computed again. */
inline void forget_q(cuda_ctx *c) { c->qx.x = nullptr; }

/* After an op's launches: its status (a refused shape) or a launch error recorded. */
inline void launched(cuda_ctx *c, fm_status st, const char *op) {
    forget_q(c);
    if (st != FM_OK) failed(c, st);
    else ok(c, cudaGetLastError(), op);
}

/* Device memory counted against the budget; NULL (with fm_fail) when over it or out of memory. */
inline void *dmalloc(cuda_ctx *c, size_t bytes, const char *what) {
    if (c->used + bytes > c->budget) {
        failed(c, fm_fail(FM_ERR_BUDGET, "cuda backend: %s needs %.1f MiB of GPU memory, and gpu_memory_budget has "
                          "%.1f of %.1f MiB left", what, bytes / (double)MiB, (c->budget - c->used) / (double)MiB,
                          c->budget / (double)MiB));
        return nullptr;
    }
    void *p = nullptr;
    if (cudaMalloc(&p, bytes ? bytes : 1) != cudaSuccess) {
        cudaGetLastError();
        failed(c, fm_fail(FM_ERR_NOMEM, "cuda backend: cannot allocate %.1f MiB of GPU memory for %s",
                          bytes / (double)MiB, what));
        return nullptr;
    }
    c->used += bytes;
    return p;
}

/* step_dev's bytes: 4 int32 (step_host's), then argmax's scratch for a row of the vocabulary */
inline size_t step_dev_bytes(const cuda_ctx *c) {
    return 4 * sizeof(int32_t) + fmc_argmax_scratch_bytes(c->cfg->vocab_size);
}

inline void dfree(cuda_ctx *c, void *p, size_t bytes) {
    if (!p) return;
    cudaFree(p); /* synchronises the device: nothing in flight still reads it */
    c->used -= bytes;
}

/* While a step is recorded nothing may wait for the device, allocate or free: what would has the recording
 * dropped instead (step_end reports it, and the core issues the step again, run as issued). 1 when recording. */
inline bool no_sync(cuda_ctx *c) {
    if (c->capturing) c->broken = true;
    return c->capturing;
}

/* Everything queued has finished: the upload arena is free again. */
inline void sync_all(cuda_ctx *c) {
    if (no_sync(c)) return;
    const double t0 = fm_now();
    ok(c, cudaStreamSynchronize(c->cs), "copy stream");
    ok(c, cudaStreamSynchronize(c->s), "compute stream");
    c->wait_ns += (uint64_t)((fm_now() - t0) * 1e9);
    pthread_mutex_lock(&c->mu);
    c->done = c->serial;
    pthread_mutex_unlock(&c->mu);
    c->up_used = 0;
}

/* b grown to at least `bytes`; NULL (failure recorded) when it cannot be. */
inline void *grow(cuda_ctx *c, dbuf *b, size_t bytes, const char *what) {
    if (bytes <= b->size) return b->p;
    if (no_sync(c)) return nullptr;
    c->mem_gen++;
    sync_all(c);
    dfree(c, b->p, b->size);
    b->p = nullptr, b->size = 0;
    if (!(b->p = dmalloc(c, bytes, what))) return nullptr; /* dmalloc recorded why */
    b->size = bytes;
    return b->p;
}

/* A device copy of host bytes for the ops queued next; NULL (failure recorded) when out of memory. */
inline void *upload(cuda_ctx *c, const void *host, size_t bytes) {
    if (no_sync(c)) return nullptr; /* a recording's copy would read the arena when replayed, long after */
    const size_t need = (bytes + 255) & ~(size_t)255;
    if (c->up_used + need > c->up_size) {
        sync_all(c);
        if (need > c->up_size) {
            const size_t size = need > UPLOAD_MIN ? need : UPLOAD_MIN;
            void *h = nullptr, *d = dmalloc(c, size, "the upload arena");
            if (!d) return nullptr; /* dmalloc recorded why */
            if (cudaMallocHost(&h, size) != cudaSuccess) {
                cudaGetLastError();
                dfree(c, d, size);
                failed(c, fm_fail(FM_ERR_NOMEM, "cuda backend: cannot pin %zu bytes of host memory to upload from", size));
                return nullptr;
            }
            if (c->up_host) cudaFreeHost(c->up_host);
            dfree(c, c->up_dev, c->up_size);
            c->mem_gen++;
            c->up_host = (uint8_t *)h, c->up_dev = (uint8_t *)d, c->up_size = size;
        }
    }
    uint8_t *h = c->up_host + c->up_used, *d = c->up_dev + c->up_used;
    c->up_used += need, c->uploads++;
    memcpy(h, host, bytes);
    return ok(c, cudaMemcpyAsync(d, h, bytes, cudaMemcpyHostToDevice, c->s), "upload") ? d : nullptr;
}

/* moe_device's device arrays, in dev_buf: its fmc_experts call's experts and their tokens, each choice's index and
 * weight, and the choices' rows of ye (0, 1, ...: for moe_combine) */
struct dev_arrays {
    fmc_expert *ex; /* [DEV_NX] */
    int32_t *tok;   /* [DEV_NX] */
    int32_t *idx;   /* [DEV_N] */
    float *w;       /* [DEV_N] */
    int32_t *rows;  /* [DEV_N] */
};
inline size_t dev_buf_bytes() { return (sizeof(fmc_expert) + sizeof(int32_t)) * DEV_NX + 3 * sizeof(int32_t) * DEV_N; }
inline dev_arrays dev_arrays_of(uint8_t *p) {
    dev_arrays d;
    d.ex = (fmc_expert *)p;
    d.tok = (int32_t *)(d.ex + DEV_NX);
    d.idx = d.tok + DEV_NX;
    d.w = (float *)(d.idx + DEV_N);
    d.rows = (int32_t *)(d.w + DEV_N);
    return d;
}

/* moe_prompt's device arrays, in pr, for up to n choices (of T <= n tokens): their indices, weights, rows of ye and
 * the experts' token lists (the shared expert's after them, where folded in); the layer's E experts and the shared
 * one; the tensor-core kernels' tile map (fmc_route_group) */
struct prompt_arrays {
    int32_t *idx; /* [n] */
    float *w;     /* [n] */
    int32_t *rows, *tok; /* [n], [2n] */
    fmc_expert *ex;      /* [E + 1] */
    int2 *map;           /* [2n]: fmc_route_group_tiles is at most n + T */
};
inline size_t prompt_ints_bytes(int n) { return (5 * sizeof(int32_t) * (size_t)n + 255) & ~(size_t)255; }
inline size_t prompt_bytes(int n, int E) {
    return prompt_ints_bytes(n) + sizeof(fmc_expert) * (size_t)(E + 1) + sizeof(int2) * 2 * (size_t)n;
}
inline prompt_arrays prompt_arrays_of(void *p, int n, int E) {
    prompt_arrays a;
    a.idx = (int32_t *)p, a.w = (float *)(a.idx + n), a.rows = (int32_t *)(a.w + n), a.tok = a.rows + n;
    a.ex = (fmc_expert *)((uint8_t *)p + prompt_ints_bytes(n));
    a.map = (int2 *)(a.ex + E + 1);
    return a;
}

/* A switch to compare with: false where the environment sets `name` to 0. */
inline bool env_on(const char *name) {
    const char *e = getenv(name);
    return !(e && strcmp(e, "0") == 0);
}

/* FLASHMOE_CUDA_DEVICE_ROUTE=0: every layer routes on the host (moe_device declines). Read once. */
inline bool device_route_on() {
    static const bool on = env_on("FLASHMOE_CUDA_DEVICE_ROUTE");
    return on;
}

/* FLASHMOE_CUDA_GRAPHS=0: decode steps run as issued, never recorded and replayed. Read once. */
inline bool graphs_on() {
    static const bool on = env_on("FLASHMOE_CUDA_GRAPHS");
    return on;
}

/* cuda_ops.cu's, for cuda_experts.cu */
void cuda_matmul(void *ctx, const fm_mat *w, const float *x, int T, float *y);
void cuda_silu_mul(void *ctx, float *out, const float *g, const float *u, int T, int n);

/* cuda_experts.cu's: the VRAM cache's end (cuda_destroy) and its reset after a failure (cuda_finish), and the
 * table's expert ops */
void vram_free(cuda_ctx *c);
void vram_forget(cuda_ctx *c);
void cuda_experts(void *ctx, const fm_expert_work *work, int n_work, const float *xn, float *ye, int H);
int cuda_moe_device(void *ctx, int layer, const float *logits, int T, int E, int k, int norm, const float *xn,
                    float *ye, int h, int32_t *idx, const fm_shared_expert *shared, float *out);
int cuda_step_begin(void *ctx, int32_t token, int pos, int record);
int cuda_step_end(void *ctx);
int cuda_experts_preload(void *ctx, const fm_expert_work *work, int n_work);

} // namespace fm_cuda

#endif /* FM_CUDA_CTX_H */
