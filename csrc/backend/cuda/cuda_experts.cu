/*
 * cuda_experts.cu — the CUDA backend's experts (cuda_ops.cu has the instance and the dense ops; cuda_ctx.h what
 * they share).
 *
 * Experts in three tiers. Above the host tier sits a VRAM cache of the experts themselves, keyed by
 * fm_expert_work.key (layer · num_experts + e) and sized at the first MoE layer from what the budget has
 * left: an expert found there computes at once; a miss is copied from its pinned host slot on a copy stream
 * of its own and its FFN waits on that copy's event alone (cudaStreamWaitEvent), so hits compute while the
 * misses' copies run and nothing synchronises the device per layer. A slot's next copy waits on the event
 * after the last FFN that read it. Below the host tier the expert store reads from disk, as everywhere.
 *
 * In decode, a share of the misses is computed by the host instead (the host's share, below); where the cache
 * holds every expert, a layer routes and computes on the device (moe_device) and a decode step is recorded as a
 * CUDA graph and replayed (step_begin / step_end). preload fills the cache at load.
 */
#include <stdlib.h>
#include <string.h>

#include "cuda_ctx.h"
#include "host_ffn.h"

namespace fm_cuda {

/* ---- the VRAM expert cache */

/* The span of host memory an expert's nine arrays (data, scales, biases of gate, up, down) lie in: its slot
 * of the expert store. */
struct span {
    uintptr_t lo, hi;
};
void span_add(span *s, const void *p, size_t bytes) {
    if (!p) return;
    const uintptr_t a = (uintptr_t)p;
    if (a < s->lo) s->lo = a;
    if (a + bytes > s->hi) s->hi = a + bytes;
}
span expert_span(const fm_expert_work *w) {
    span s = {UINTPTR_MAX, 0};
    const fm_mat *m[3] = {w->gate, w->up, w->down};
    for (const fm_mat *x : m) {
        span_add(&s, x->data, fm_tensor_data_bytes(x->dtype, x->rows, x->cols));
        if (x->dtype == FM_Q4 || x->dtype == FM_Q8) {
            const size_t sb = sizeof(uint16_t) * (size_t)x->rows * (size_t)(x->cols / x->group_size);
            span_add(&s, x->scales, sb);
            span_add(&s, x->biases, sb);
        }
    }
    return s;
}

/* m with its arrays moved from host span s to device base d */
fm_mat rebase(const fm_mat *m, span s, uint8_t *d) {
    fm_mat r = *m;
    r.data = d + ((uintptr_t)m->data - s.lo);
    if (m->scales) r.scales = (const uint16_t *)(d + ((uintptr_t)m->scales - s.lo));
    if (m->biases) r.biases = (const uint16_t *)(d + ((uintptr_t)m->biases - s.lo));
    return r;
}

void lru_unlink(cuda_ctx *c, int i) {
    if (c->prev[i] >= 0) c->next[c->prev[i]] = c->next[i];
    else c->head = c->next[i];
    if (c->next[i] >= 0) c->prev[c->next[i]] = c->prev[i];
    else c->tail = c->prev[i];
    c->prev[i] = c->next[i] = -1;
}
void lru_front(cuda_ctx *c, int i) {
    c->prev[i] = -1, c->next[i] = c->head;
    if (c->head >= 0) c->prev[c->head] = i;
    c->head = i;
    if (c->tail < 0) c->tail = i;
}


/* Sized at the first MoE layer, once the dense weights, state and scratch hold their device memory: as many
 * slots as the budget has room for (all the experts at most), less headroom for scratch that grows. On a
 * failure (recorded) nothing is kept: the next call tries again, as a fresh instance would. */
bool vram_init(cuda_ctx *c, size_t slot_bytes) {
    const size_t sb = (slot_bytes + 255) & ~(size_t)255;
    /* kept free: VRAM_HEADROOM, and what the one-op scratch may still grow to (attention's partials of a long
     * prompt's chunk at the end of the context, the gated delta rule's records of a long call: up to the larger
     * cap, 64 MiB, which the slots would otherwise have taken) */
    const size_t att = fmc_attention_scratch_cap_floats(), gd = fmc_gated_delta_scratch_cap_floats();
    const size_t cap = sizeof(float) * (att > gd ? att : gd);
    const uint64_t keep = VRAM_HEADROOM + (cap > c->opbuf.size ? cap - c->opbuf.size : 0);
    const uint64_t left = c->budget > c->used + keep ? c->budget - c->used - keep : 0;
    uint64_t n = left / sb;
    if (n > (uint64_t)c->key_space) n = (uint64_t)c->key_space;
    if (const char *env = getenv("FLASHMOE_CUDA_EXPERT_SLOTS")) /* tests: a cache of exactly this many */
        if (atoi(env) > 0 && (uint64_t)atoi(env) < n) n = (uint64_t)atoi(env);
    if (n < 1) {
        failed(c, fm_fail(FM_ERR_BUDGET, "cuda backend: gpu_memory_budget %.1f MiB leaves no room for one expert "
                          "(%.1f MiB) beside the dense weights, state and scratch (%.1f MiB)", c->budget / (double)MiB,
                          sb / (double)MiB, c->used / (double)MiB));
        return false;
    }
    c->vram_ready = 1, c->slot_bytes = sb, c->n_slots = (int)n;
    c->pool = (uint8_t *)dmalloc(c, c->slot_bytes * (size_t)n, "the VRAM expert cache");
    c->slot_key = (int32_t *)malloc(sizeof(int32_t) * n);
    c->key_slot = (int32_t *)malloc(sizeof(int32_t) * (size_t)c->key_space);
    c->prev = (int *)malloc(sizeof(int) * n), c->next = (int *)malloc(sizeof(int) * n);
    c->locked = (unsigned char *)calloc(n, 1), c->pending = (unsigned char *)calloc(n, 1);
    c->loaded = (cudaEvent_t *)calloc(n, sizeof(cudaEvent_t));
    c->used_ev = (cudaEvent_t *)calloc(n, sizeof(cudaEvent_t));
    bool good = c->pool != nullptr; /* else dmalloc recorded why */
    if (good && (!c->slot_key || !c->key_slot || !c->prev || !c->next || !c->locked || !c->pending || !c->loaded ||
                 !c->used_ev)) {
        failed(c, fm_fail(FM_ERR_NOMEM, "cuda backend: out of memory"));
        good = false;
    }
    for (int i = 0; good && i < c->n_slots; i++)
        if (cudaEventCreateWithFlags(&c->loaded[i], cudaEventDisableTiming) != cudaSuccess ||
            cudaEventCreateWithFlags(&c->used_ev[i], cudaEventDisableTiming) != cudaSuccess) {
            cudaGetLastError();
            failed(c, fm_fail(FM_ERR_DEVICE, "cuda backend: cannot create the expert cache's events"));
            good = false;
        }
    if (!good) {
        vram_free(c);
        return false;
    }
    for (int k = 0; k < c->key_space; k++) c->key_slot[k] = -1;
    for (int i = 0; i < c->n_slots; i++) {
        c->slot_key[i] = -1;
        c->prev[i] = c->next[i] = -1;
        cudaEventRecord(c->used_ev[i], c->s); /* "last used": now, so a first copy waits for nothing */
        lru_front(c, i);
    }
    const size_t tab_bytes = sizeof(fmc_expert) * (size_t)c->key_space;
    if (c->n_slots == c->key_space && device_route_on() && c->used + tab_bytes + dev_buf_bytes() <= c->budget) {
        c->tab_host = (fmc_expert *)calloc((size_t)c->key_space, sizeof(fmc_expert));
        c->layer_count = (int *)calloc((size_t)c->n_layers, sizeof(int));
        c->layer_ready = (unsigned char *)calloc((size_t)c->n_layers, 1);
        c->deliv = (delivery *)calloc((size_t)c->n_layers, sizeof(delivery));
        c->graph_deliv = (delivery *)calloc((size_t)c->n_layers, sizeof(delivery));
        c->tab_dev = (fmc_expert *)dmalloc(c, tab_bytes, "the experts' table");
        c->dev_buf = (uint8_t *)dmalloc(c, dev_buf_bytes(), "moe_device's arrays");
        if (cudaMallocHost((void **)&c->idx_pinned, sizeof(int32_t) * (size_t)c->n_layers * DEV_N) != cudaSuccess) {
            cudaGetLastError();
            c->idx_pinned = nullptr;
        }
        c->all_fit = c->tab_host && c->layer_count && c->layer_ready && c->deliv && c->graph_deliv && c->tab_dev &&
                     c->dev_buf && c->idx_pinned;
        if (c->all_fit) { /* the choices' rows 0, 1, ... for moe_combine */
            int32_t rows[DEV_N];
            for (int i = 0; i < DEV_N; i++) rows[i] = i;
            ok(c, cudaMemcpy(dev_arrays_of(c->dev_buf).rows, rows, sizeof rows, cudaMemcpyHostToDevice),
               "moe_device's rows");
        }
    }
    return true;
}

/* e's matrices all at 16-byte boundaries (a grouped call takes 16-byte loads where all of its experts' are) */
bool aligned16(const fmc_expert *e) {
    return ((uintptr_t)e->gate.data | (uintptr_t)e->up.data | (uintptr_t)e->down.data) % 16 == 0;
}

/* Expert key w->key is in slot i now (moe_device's tables): its entry; and once all of its layer's experts are in,
 * the layer's entries to the device, if they can run as one fmc_experts call (one kind, the same alignment). */
void tab_add(cuda_ctx *c, const fm_expert_work *w, span s, int i) {
    if (!c->all_fit) return;
    uint8_t *d = c->pool + (size_t)i * c->slot_bytes;
    fmc_expert *x = &c->tab_host[w->key];
    *x = {rebase(w->gate, s, d), rebase(w->up, s, d), rebase(w->down, s, d), nullptr, 1, 0};
    const int layer = w->key / c->n_exp;
    if (++c->layer_count[layer] < c->n_exp) return;
    const fmc_expert *t = c->tab_host + (size_t)layer * c->n_exp;
    for (int e = 1; e < c->n_exp; e++)
        if (!fmc_same_kind(&t[e].gate, &t[0].gate) || !fmc_same_kind(&t[e].up, &t[0].up) ||
            !fmc_same_kind(&t[e].down, &t[0].down) || aligned16(&t[e]) != aligned16(&t[0]))
            return;
    if (ok(c, cudaMemcpyAsync(c->tab_dev + (size_t)layer * c->n_exp, t, sizeof(fmc_expert) * c->n_exp,
                              cudaMemcpyHostToDevice, c->s), "the experts' table"))
        c->layer_ready[layer] = 1;
}

/* Expert key `key` left its slot: its layer routes on the host again (never when every expert fits). */
void tab_remove(cuda_ctx *c, int key) {
    if (!c->all_fit) return;
    const int layer = key / c->n_exp;
    c->layer_count[layer]--;
    if (c->layer_ready[layer]) c->mem_gen++; /* a recorded step reads its table */
    c->layer_ready[layer] = 0;
}

/* The cache as before vram_init (which the next call runs again): its memory and events released. */
void vram_free(cuda_ctx *c) {
    for (int i = 0; i < c->n_slots; i++) {
        if (c->loaded && c->loaded[i]) cudaEventDestroy(c->loaded[i]);
        if (c->used_ev && c->used_ev[i]) cudaEventDestroy(c->used_ev[i]);
    }
    free(c->loaded), free(c->used_ev), free(c->slot_key), free(c->key_slot), free(c->prev), free(c->next);
    free(c->locked), free(c->pending);
    dfree(c, c->pool, c->slot_bytes * (size_t)c->n_slots);
    c->loaded = c->used_ev = nullptr, c->slot_key = c->key_slot = nullptr, c->prev = c->next = nullptr;
    c->locked = c->pending = nullptr, c->pool = nullptr;
    c->vram_ready = 0, c->n_slots = 0, c->slot_bytes = 0, c->head = c->tail = -1;
    free(c->tab_host), free(c->layer_count), free(c->layer_ready), free(c->deliv), free(c->graph_deliv);
    dfree(c, (void *)c->tab_dev, sizeof(fmc_expert) * (size_t)c->key_space);
    dfree(c, c->dev_buf, dev_buf_bytes());
    if (c->idx_pinned) cudaFreeHost(c->idx_pinned);
    c->tab_host = c->tab_dev = nullptr, c->layer_count = nullptr, c->layer_ready = nullptr;
    c->deliv = c->graph_deliv = nullptr, c->dev_buf = nullptr, c->idx_pinned = nullptr;
    c->all_fit = false, c->n_deliv = c->graph_n_deliv = 0;
    c->mem_gen++; /* a recording's tables are gone */
}

/* After any failure, from finish() once the streams have drained: every slot emptied. A failure can leave a
 * batch's slots locked (cuda_experts returned before issuing their FFNs), keys on slots whose copy failed or
 * was never waited for; which slots hold their expert is not known, so none is trusted. The next calls copy
 * their experts again, as on a fresh instance (the counters go on). */
void vram_forget(cuda_ctx *c) {
    for (int i = 0; i < c->n_slots; i++) {
        if (c->slot_key[i] >= 0) c->key_slot[c->slot_key[i]] = -1;
        c->slot_key[i] = -1, c->locked[i] = 0, c->pending[i] = 0;
    }
    if (c->all_fit) { /* every layer routes on the host until its experts are all in again */
        memset(c->layer_count, 0, sizeof(int) * (size_t)c->n_layers);
        memset(c->layer_ready, 0, (size_t)c->n_layers);
        c->mem_gen++;
    }
    c->n_deliv = 0;
    c->host_share = 0.5f, c->host_carry = 0.0f; /* as a fresh instance's */
}

/* The VRAM slot of expert w for the batch being issued: a hit, or the least recently used unlocked slot with
 * the copy from its host slot queued on the copy stream (after the last FFN that read the slot). -1 when
 * every slot is locked by this batch (the caller issues the batch and tries again). */
int vram_slot(cuda_ctx *c, const fm_expert_work *w, span s) {
    int i = c->key_slot[w->key];
    if (i >= 0) {
        c->hits++;
    } else {
        i = c->tail;
        while (i >= 0 && c->locked[i]) i = c->prev[i];
        if (i < 0) return -1;
        if (c->slot_key[i] >= 0) {
            tab_remove(c, c->slot_key[i]);
            c->key_slot[c->slot_key[i]] = -1;
        }
        c->slot_key[i] = w->key, c->key_slot[w->key] = i;
        tab_add(c, w, s, i);
        uint8_t *dst = c->pool + (size_t)i * c->slot_bytes;
        ok(c, cudaStreamWaitEvent(c->cs, c->used_ev[i], 0), "expert copy order");
        ok(c, cudaMemcpyAsync(dst, (const void *)s.lo, s.hi - s.lo, cudaMemcpyHostToDevice, c->cs), "expert copy");
        ok(c, cudaEventRecord(c->loaded[i], c->cs), "expert copy event");
        c->pending[i] = 1;
        c->misses++;
        c->bytes_in += s.hi - s.lo;
    }
    c->locked[i] = 1;
    lru_unlink(c, i);
    lru_front(c, i);
    return i;
}

/* One expert's FFN on its tokens: their rows of xn gathered (one token is read in place), then
 * h1 = gate·x, h2 = up·x, h1 = silu(h1)·h2, rows [row0, row0 + n) of ye = down·h1. */
void expert_ffn(cuda_ctx *c, const fm_expert_work *w, const fm_mat *gate, const fm_mat *up, const fm_mat *down,
                const float *xn, float *ye, int H) {
    const size_t n = (size_t)w->n, I = (size_t)gate->rows;
    const size_t xe_floats = n > 1 ? n * (size_t)H : 0, need = sizeof(float) * (xe_floats + 2 * n * I);
    float *mem = (float *)grow(c, &c->ffn, need, "expert scratch");
    if (!mem) return;
    float *h1 = mem + xe_floats, *h2 = h1 + n * I;
    const float *x = xn + (size_t)w->tok[0] * H;
    if (n > 1) {
        const int32_t *tok = (const int32_t *)upload(c, w->tok, n * sizeof(int32_t));
        if (!tok) return;
        launched(c, fmc_gather_rows(c->s, mem, xn, tok, (int)n, H), "expert rows");
        x = mem;
    }
    cuda_matmul(c, gate, x, w->n, h1);
    cuda_matmul(c, up, x, w->n, h2);
    cuda_silu_mul(c, h1, h1, h2, w->n, (int)I);
    cuda_matmul(c, down, h1, w->n, ye + (size_t)w->row0 * H);
}

/* FLASHMOE_CUDA_GROUPED=0: each expert's FFN in launches of its own (expert_ffn), to compare with the grouped
 * calls (experts_grouped). Read once per process, at the first MoE layer. */
bool grouped_on() {
    static const bool on = env_on("FLASHMOE_CUDA_GROUPED");
    return on;
}

/* A grouped call's scratch for its rows (h [rows, I] and, on int8 activations, h's quantized rows) is kept under
 * this by cutting a batch's experts into calls: a prompt's segment (T·k rows) takes a few, decode one. With xn's
 * quantized rows (T·H bytes and a little) it stays inside VRAM_HEADROOM. */
constexpr size_t GROUP_ROWS_SCRATCH = 16 * MiB;

/* Bytes of expert scratch a grouped call of these matrices over T tokens of xn and `rows` rows of h takes: h,
 * then the int8 activations (T 0: the part that grows with rows). */
size_t h_bytes(const fm_mat *gate, int rows) {
    return (sizeof(float) * (size_t)rows * (size_t)gate->rows + 255) & ~(size_t)255;
}
size_t group_bytes(const fm_mat *gate, const fm_mat *down, int T, int rows) {
    return h_bytes(gate, rows) + fmc_experts_scratch_bytes(gate, down, T, rows);
}

/* A grouped call's fmc_expert array and token lists, buf [n fmc_expert | 256-aligned | the lists, in order], to the
 * device in one upload, each expert's tok pointed at its list there: the arena is first made to have room (upload()
 * starts it over when full, and grows it with an upload of this size when too small), so the copy lands where the
 * pointers say. The device array, or NULL on a failure (recorded). */
const fmc_expert *upload_experts(cuda_ctx *c, uint8_t *buf, int n, size_t bytes) {
    const size_t eb = (n * sizeof(fmc_expert) + 255) & ~(size_t)255, room = (bytes + 255) & ~(size_t)255;
    if (c->up_used + room > c->up_size) {
        sync_all(c);
        if (room > c->up_size) { /* too small: grown by an upload of this size, then started over */
            if (!upload(c, buf, bytes)) return nullptr;
            sync_all(c);
        }
    }
    uint8_t *d = c->up_dev + c->up_used; /* where upload() puts the next bytes */
    fmc_expert *ex = (fmc_expert *)buf;
    const int32_t *tok = (const int32_t *)(d + eb);
    for (int q = 0; q < n; q++) ex[q].tok = tok, tok += ex[q].n;
    const void *r = upload(c, buf, bytes);
    if (r && r != d) failed(c, fm_fail(FM_ERR_DEVICE, "cuda backend: the upload arena moved under the experts' lists"));
    return r == d ? (const fmc_expert *)d : nullptr;
}

/* The FFNs of work[js[0..n)] (n <= 64, each with tokens) in one fmc_experts call, each expert's matrices those of
 * its VRAM slot (slot[j - j0] >= 0, rebased from span sp[j - j0]) or read in place; T: xn's rows (1 + the largest
 * token). Where slots' copies are pending the call waits for all of them (the copies dominate, and one call saves
 * a launch set per miss), then marks each slot used. false where fmc_experts refuses these experts (matrices of
 * different shapes or dtypes, ...): nothing but the upload and those waits queued, and the caller runs them one by
 * one; true once issued, or on a failure (recorded). */
bool experts_grouped(cuda_ctx *c, const fm_expert_work *work, const int *js, int n, int j0, const int *slot,
                     const span *sp, const float *xn, int T, float *ye, int H) {
    size_t n_tok = 0;
    int lo = work[js[0]].row0, hi = lo; /* h holds the rows [lo, hi) of ye's */
    for (int q = 0; q < n; q++) {
        const fm_expert_work *w = &work[js[q]];
        n_tok += (size_t)w->n;
        if (w->row0 < lo) lo = w->row0;
        if (w->row0 + w->n > hi) hi = w->row0 + w->n;
    }
    const fm_mat *g0 = work[js[0]].gate, *d0 = work[js[0]].down;
    /* before the upload: grow may sync, which starts the arena over */
    uint8_t *mem = (uint8_t *)grow(c, &c->ffn, group_bytes(g0, d0, T, hi - lo), "expert scratch");
    if (!mem && c->err == FM_OK) return false; /* nothing to size (a shape fmc_experts refuses) */
    const size_t eb = (n * sizeof(fmc_expert) + 255) & ~(size_t)255, bytes = eb + n_tok * sizeof(int32_t);
    uint8_t *buf = mem ? (uint8_t *)malloc(bytes) : nullptr;
    if (mem && !buf) failed(c, fm_fail(FM_ERR_NOMEM, "cuda backend: out of memory"));
    const fmc_expert *dex = nullptr;
    fmc_expert *ex = (fmc_expert *)buf;
    if (buf) {
        int32_t *tok = (int32_t *)(buf + eb);
        for (int q = 0; q < n; q++) {
            const fm_expert_work *w = &work[js[q]];
            const int i = slot[js[q] - j0];
            if (i >= 0) {
                uint8_t *d = c->pool + (size_t)i * c->slot_bytes;
                const span s = sp[js[q] - j0];
                ex[q].gate = rebase(w->gate, s, d), ex[q].up = rebase(w->up, s, d), ex[q].down = rebase(w->down, s, d);
            } else {
                ex[q].gate = *w->gate, ex[q].up = *w->up, ex[q].down = *w->down;
            }
            ex[q].tok = nullptr, ex[q].n = w->n, ex[q].row0 = w->row0;
            memcpy(tok, w->tok, sizeof(int32_t) * (size_t)w->n);
            tok += w->n;
        }
        dex = upload_experts(c, buf, n, bytes);
    }
    for (int q = 0; q < n; q++) {
        const int i = slot[js[q] - j0];
        if (i >= 0 && c->pending[i]) {
            ok(c, cudaStreamWaitEvent(c->s, c->loaded[i], 0), "expert copy wait");
            c->pending[i] = 0;
        }
    }
    if (dex) {
        const fm_status st =
            fmc_experts(c->s, dex, ex, n, xn, T, H, (float *)mem, ye, hi - lo, mem + h_bytes(g0, hi - lo));
        if (st != FM_OK) {
            free(buf);
            return false;
        }
        launched(c, st, "experts");
    }
    free(buf);
    for (int q = 0; q < n; q++) {
        const int i = slot[js[q] - j0];
        if (i < 0) continue;
        ok(c, cudaEventRecord(c->used_ev[i], c->s), "expert use event");
        c->locked[i] = 0;
    }
    return true;
}

/* The FFNs of work[js[0..n)] one by one (expert_ffn), each after its slot's copy where one is pending. */
void experts_one_by_one(cuda_ctx *c, const fm_expert_work *work, const int *js, int n, int j0, const int *slot,
                        const span *sp, const float *xn, float *ye, int H) {
    for (int q = 0; q < n; q++) {
        const fm_expert_work *w = &work[js[q]];
        const int i = slot[js[q] - j0];
        if (i < 0) {
            expert_ffn(c, w, w->gate, w->up, w->down, xn, ye, H);
            continue;
        }
        if (c->pending[i]) {
            ok(c, cudaStreamWaitEvent(c->s, c->loaded[i], 0), "expert copy wait");
            c->pending[i] = 0;
        }
        uint8_t *d = c->pool + (size_t)i * c->slot_bytes;
        const span s = sp[js[q] - j0];
        const fm_mat g = rebase(w->gate, s, d), u = rebase(w->up, s, d), dn = rebase(w->down, s, d);
        expert_ffn(c, w, &g, &u, &dn, xn, ye, H);
        ok(c, cudaEventRecord(c->used_ev[i], c->s), "expert use event");
        c->locked[i] = 0;
    }
}

/* ---- the host's share of decode's VRAM misses (host_ffn.c: the CUDA kernels' bits, on the compute threads)
 *
 * In the pinned and disk settings decode is bound by the host→device link: every miss is copied before it computes.
 * A share of a call's misses is not copied: the CPU reads them from their host slots and computes their FFNs while
 * the GPU's copies and FFNs run, so the weights come over two paths at once (DRAM and PCIe); their rows then go to
 * ye on the compute stream, before anything that reads them. The share follows which side finished first (the GPU
 * → more for the host, the host → less), within [0.05, 0.95] of the candidates. */

/* FLASHMOE_CUDA_HOST_EXPERTS: 0 none; 1 every candidate (and, for tests, experts with no identity, read in place);
 * unset (or else) the share. Read at each call. */
enum { HOST_OFF, HOST_ALL, HOST_AUTO };
int host_mode() {
    const char *e = getenv("FLASHMOE_CUDA_HOST_EXPERTS");
    return e && strcmp(e, "0") == 0 ? HOST_OFF : e && strcmp(e, "1") == 0 ? HOST_ALL : HOST_AUTO;
}
constexpr int HOST_MAX_N = 4; /* tokens an expert at most: decode's calls (a prompt's experts are the GPU's) */

/* Whether the host may compute w: decode-sized, a VRAM miss once the cache is sized and cannot hold every expert
 * (where it can, a miss is a one-time fill), of matrices host_ffn replays */
bool host_candidate(const cuda_ctx *c, const fm_expert_work *w, int mode) {
    if (mode == HOST_OFF || w->n <= 0 || w->n > HOST_MAX_N) return false;
    if (w->key >= 0 && w->key < c->key_space) {
        if (!c->vram_ready || c->all_fit || c->key_slot[w->key] >= 0) return false; /* or a hit */
    } else if (mode != HOST_ALL) {
        return false;
    }
    return fmh_takes(w->gate, w->up, w->down);
}

/* *p grown to at least `bytes` of pinned host memory (after a sync: no copy reads the old one); false on failure
 * (recorded) */
bool grow_pinned(cuda_ctx *c, float **p, size_t *size, size_t bytes) {
    if (bytes <= *size) return true;
    sync_all(c);
    if (*p) cudaFreeHost(*p);
    *p = nullptr, *size = 0;
    if (cudaMallocHost((void **)p, bytes) != cudaSuccess) {
        cudaGetLastError();
        *p = nullptr;
        failed(c, fm_fail(FM_ERR_NOMEM, "cuda backend: cannot pin %zu bytes of host memory", bytes));
        return false;
    }
    *size = bytes;
    return true;
}

/* The host's experts of this call (on[j]): how many. Under HOST_AUTO the first share · candidates, the fraction
 * carried to the next call: a small share still gives the host an expert now and then, and so the measure that
 * can raise it again (rounded, a share under 1/2 of a call's candidates would stop there for good). */
int host_pick(cuda_ctx *c, const fm_expert_work *work, int n_work, int mode, unsigned char *on) {
    int cand = 0, n = 0;
    for (int j = 0; j < n_work; j++) cand += (on[j] = host_candidate(c, &work[j], mode));
    int want = cand;
    if (mode == HOST_AUTO) {
        const float owed = c->host_carry + c->host_share * (float)cand;
        want = (int)owed;
        c->host_carry = owed - (float)want;
    }
    for (int j = 0; j < n_work; j++)
        if (on[j]) on[j] = n < want, n += on[j];
    return n;
}

/* Before the GPU's work of the call: the pinned buffers sized, the last call's rows copied out of hy, and xn's T
 * rows (1 + the call's largest token) copied to hx on the compute stream (xn is complete there: the router read it). */
bool host_begin(cuda_ctx *c, const fm_expert_work *work, int n_work, const unsigned char *on, const float *xn, int T,
                int H) {
    size_t rows = 0;
    for (int j = 0; j < n_work; j++)
        if (on[j]) rows += (size_t)work[j].n;
    const size_t xb = sizeof(float) * (size_t)T * (size_t)H;
    if (!grow_pinned(c, &c->hx, &c->hx_size, xb) || !grow_pinned(c, &c->hy, &c->hy_size, sizeof(float) * rows * H))
        return false;
    return ok(c, cudaEventSynchronize(c->hy_ev), "host experts' rows") &&
           ok(c, cudaMemcpyAsync(c->hx, xn, xb, cudaMemcpyDeviceToHost, c->s), "host experts' activations") &&
           ok(c, cudaEventRecord(c->hx_ev, c->s), "host experts' activations");
}

/* After the GPU's work of the call is issued: the host's experts computed (once xn's rows have landed), the share
 * adjusted by whether the GPU's work had finished by then, and their rows copied into ye on the compute stream. */
void host_finish(cuda_ctx *c, const fm_expert_work *work, int n_work, const unsigned char *on, int n_host, float *ye,
                 int H, int mode) {
    if (!ok(c, cudaEventRecord(c->gpu_ev, c->s), "host experts' event")) return;
    fmh_job *jobs = (fmh_job *)malloc(sizeof(fmh_job) * (size_t)n_host);
    if (!jobs) {
        failed(c, fm_fail(FM_ERR_NOMEM, "cuda backend: out of memory"));
        return;
    }
    size_t off = 0;
    for (int j = 0, q = 0; j < n_work; j++)
        if (on[j]) {
            jobs[q++] = {work[j].gate, work[j].up, work[j].down, work[j].tok, work[j].n, c->hy + off};
            off += (size_t)work[j].n * H;
        }
    bool fine = ok(c, cudaEventSynchronize(c->hx_ev), "host experts' activations");
    if (fine && fmh_experts(jobs, n_host, c->hx, H, 1) != 0) {
        failed(c, fm_fail(FM_ERR_NOMEM, "cuda backend: out of memory (host experts)"));
        fine = false;
    }
    if (fine && mode == HOST_AUTO) {
        const cudaError_t e = cudaEventQuery(c->gpu_ev);
        if (e == cudaErrorNotReady) cudaGetLastError(); /* not an error: the GPU is still busy */
        else fine = ok(c, e, "host experts' event");
        const float share = c->host_share + (e == cudaSuccess ? -0.05f : 0.05f);
        c->host_share = share < 0.05f ? 0.05f : share > 0.95f ? 0.95f : share;
    }
    for (int j = 0, q = 0; fine && j < n_work; j++) { /* jobs[q]: the q-th of work[] on the host */
        if (!on[j]) continue;
        const size_t bytes = sizeof(float) * (size_t)jobs[q].n * H;
        fine = ok(c, cudaMemcpyAsync(ye + (size_t)work[j].row0 * H, jobs[q++].out, bytes, cudaMemcpyHostToDevice, c->s),
                  "host experts' rows");
    }
    if (fine && ok(c, cudaEventRecord(c->hy_ev, c->s), "host experts' rows")) c->host_experts += (uint64_t)n_host;
    free(jobs);
}

/* The GPU's experts of work[] (all but the host's, on[j]): batches of slots, misses' copies queued first */
void experts_issue(cuda_ctx *c, const fm_expert_work *work, int n_work, const float *xn, float *ye, int H, int T,
                   bool grouped, const unsigned char *on) {
    int slot_of[64];
    span spans[64];
    for (int j0 = 0; j0 < n_work && c->err == FM_OK;) {
        /* a batch: slots for as many experts as fit (at most 64), their misses' copies queued first */
        int j1 = j0;
        for (; j1 < n_work && j1 - j0 < 64; j1++) {
            const fm_expert_work *w = &work[j1];
            slot_of[j1 - j0] = -1;
            if (on && on[j1]) continue; /* the host's */
            if (w->n <= 0 || w->key < 0 || w->key >= c->key_space) continue; /* no identity: read in place */
            spans[j1 - j0] = expert_span(w);
            const size_t bytes = spans[j1 - j0].hi - spans[j1 - j0].lo;
            if (!c->vram_ready && !vram_init(c, bytes)) return;
            if (bytes > c->slot_bytes) {
                failed(c, fm_fail(FM_ERR_INVALID, "cuda backend: an expert of %zu bytes, the VRAM slots hold %zu",
                                  bytes, c->slot_bytes));
                return;
            }
            if ((slot_of[j1 - j0] = vram_slot(c, w, spans[j1 - j0])) < 0) break; /* every slot taken: issue these */
        }
        if (j1 == j0) { /* cannot happen with one slot or more: the batch's first expert always gets one */
            failed(c, fm_fail(FM_ERR_INVALID, "cuda backend: no VRAM expert slot"));
            return;
        }
        /* hits (and experts read in place) first: they compute while the misses' copies run; then the misses,
         * each once its copy has landed (grouped: a call waits for all of its experts' copies) */
        for (int pass = 0; pass < 2; pass++) {
            int js[64], n = 0;
            for (int j = j0; j < j1; j++) {
                const int i = slot_of[j - j0];
                if (work[j].n > 0 && !(on && on[j]) && (i >= 0 && c->pending[i]) == (pass == 1)) js[n++] = j;
            }
            if (!grouped) {
                experts_one_by_one(c, work, js, n, j0, slot_of, spans, xn, ye, H);
                continue;
            }
            /* grouped: by row of ye, cut where a call's rows (with those between, other calls') would take more
             * than GROUP_ROWS_SCRATCH; a call has one expert at least */
            for (int q = 1; q < n; q++)
                for (int r = q; r > 0 && work[js[r]].row0 < work[js[r - 1]].row0; r--) {
                    const int t = js[r];
                    js[r] = js[r - 1], js[r - 1] = t;
                }
            for (int q0 = 0, q1; q0 < n; q0 = q1) {
                const fm_expert_work *w0 = &work[js[q0]];
                int hi = w0->row0 + w0->n;
                for (q1 = q0 + 1; q1 < n; q1++) {
                    const int end = work[js[q1]].row0 + work[js[q1]].n, h1 = end > hi ? end : hi;
                    if (group_bytes(w0->gate, w0->down, 0, h1 - w0->row0) > GROUP_ROWS_SCRATCH) break;
                    hi = h1;
                }
                if (!experts_grouped(c, work, js + q0, q1 - q0, j0, slot_of, spans, xn, T, ye, H))
                    experts_one_by_one(c, work, js + q0, q1 - q0, j0, slot_of, spans, xn, ye, H);
            }
        }
        j0 = j1;
    }
}

void cuda_experts(void *ctx, const fm_expert_work *work, int n_work, const float *xn, float *ye, int H) {
    cuda_ctx *c = ctx_of(ctx);
    forget_q(c);
    if (no_sync(c)) return; /* its copies wait on events and streams a recording cannot hold */
    /* xn's rows, 1 + the largest token (grouped calls' int8 activations quantize them; the host's share copies them) */
    const bool grouped = grouped_on();
    int T = 0;
    for (int j = 0; j < n_work; j++)
        for (int i = 0; i < work[j].n; i++) {
            if (work[j].tok[i] < 0) {
                failed(c, fm_fail(FM_ERR_INVALID, "cuda backend: an expert's token %d", work[j].tok[i]));
                return;
            }
            if (work[j].tok[i] >= T) T = work[j].tok[i] + 1;
        }
    /* the host's share, chosen first (its experts take no slot), its activations on their way before the GPU's work */
    const int mode = host_mode();
    unsigned char *on = nullptr;
    int n_host = 0;
    if (mode != HOST_OFF) {
        if (!(on = (unsigned char *)calloc((size_t)n_work, 1))) {
            failed(c, fm_fail(FM_ERR_NOMEM, "cuda backend: out of memory"));
            return;
        }
        n_host = host_pick(c, work, n_work, mode, on);
        if (n_host && !host_begin(c, work, n_work, on, xn, T, H)) n_host = 0;
    }
    if (c->err == FM_OK) experts_issue(c, work, n_work, xn, ye, H, T, grouped, n_host ? on : nullptr);
    if (n_host && c->err == FM_OK) host_finish(c, work, n_work, on, n_host, ye, H, mode);
    free(on);
}

/* FLASHMOE_CUDA_SHARED_FOLD=0: moe_device never folds the shared expert in (the core runs it in launches of its
 * own), to compare. Read once. */
bool shared_fold_on() {
    static const bool on = env_on("FLASHMOE_CUDA_SHARED_FOLD");
    return on;
}

/* The shared expert sh as an expert of the layer whose expert 0 is t0, where it can run in the routed experts'
 * fmc_experts call: matrices of their kind (one kind a call: shared_expert_intermediate_size ==
 * moe_intermediate_size, the same quantization) and alignment (tab_add's rule), and a gate row on fp32
 * activations (fmc_shared_combine). false: the shared expert runs as ops of its own. */
bool fold_of(const fm_shared_expert *sh, const fmc_expert *t0, int h, fmc_expert *out) {
    if (!sh || !shared_fold_on()) return false;
    *out = {*sh->gate, *sh->up, *sh->down, nullptr, 1, 0};
    return fmc_same_kind(sh->gate, &t0->gate) && fmc_same_kind(sh->up, &t0->up) && fmc_same_kind(sh->down, &t0->down) &&
           aligned16(out) == aligned16(t0) && sh->gate_row->rows == 1 && sh->gate_row->cols == h &&
           fmc_matmul_scratch_bytes(sh->gate_row, 1) == 0;
}

/* The routed experts of a layer with no host round trip (backend.h): route_k also writes each choice as an
 * expert of one token (its matrices from the layer's table), fmc_experts runs them all, and the choices go to
 * pinned memory for finish() to hand over. Each choice's FFN is the bits the host path's grouped call gives it
 * (fm_mm's per-(row, token) arithmetic does not depend on the grouping). Folded (fold_of), route_k also writes the
 * shared expert on each token t as an expert of the call (row T·k + t of ye: the bits of the shared expert's own
 * matmuls, for the same reason), and fmc_shared_combine ends the layer in one kernel. That one replaces the 7 the
 * shared expert and the combine take as ops (9 on int8 activations): its gate's matvec, gate and up (after xn's
 * quantizer), silu_mul, down (after h's), gate_rows, moe_combine. */
/* The first moe_device call of a layer: the compute stream waits for its experts' copies, which may still be in
 * flight. */
void layer_wait(cuda_ctx *c, int layer) {
    if (c->layer_ready[layer] != 1) return;
    const size_t key0 = (size_t)layer * c->n_exp;
    for (int e = 0; e < c->n_exp; e++) {
        const int i = c->key_slot[key0 + e];
        if (c->pending[i]) {
            ok(c, cudaStreamWaitEvent(c->s, c->loaded[i], 0), "expert copy wait");
            c->pending[i] = 0;
        }
    }
    if (c->capturing) c->broken = true; /* a wait on a copy outside the recording */
    c->layer_ready[layer] = 2;
}

/* moe_device's end once the layer's experts are issued (decode's arrays or a prompt's: a.idx, a.rows, a.w device
 * [T, k]): the folded shared expert's combine where the experts ran (issued), the choices on their way to pin for
 * finish() to hand to idx, the counts; moe_device's return, 2 folded, else 1. */
template <class A>
int routed_end(cuda_ctx *c, const A &a, bool fold, bool issued, const fm_shared_expert *shared, const float *xn, int T,
               int k, int h, float *out, const float *ye, int32_t *pin, int32_t *idx) {
    if (fold && issued)
        launched(c, fmc_shared_combine(c->s, shared->gate_row, xn, T, out, ye, a.rows, a.w, k, h),
                 "the shared expert's combine");
    const size_t n = (size_t)T * k;
    if (ok(c, cudaMemcpyAsync(pin, a.idx, sizeof(int32_t) * n, cudaMemcpyDeviceToHost, c->s), "the choices to the host"))
        c->deliv[c->n_deliv++] = {idx, pin, n};
    c->hits += (uint64_t)n;
    c->folds += fold;
    c->last_T = T, c->last_k = k, c->last_rows = a.rows, c->last_w = a.w;
    return fold ? 2 : 1;
}

/* FLASHMOE_CUDA_DEVICE_PROMPTS=0: every prompt routes on the host, to compare; by default a prompt's layer whose
 * experts are all in VRAM routes on the device (moe_prompt: 128-token prompts x1.19, 2048 x1.02 on an H100,
 * bench/RESULTS.md session 21). Read at each call. */
bool device_prompts_on() { return env_on("FLASHMOE_CUDA_DEVICE_PROMPTS"); }

/* moe_device for a prompt's T > DEV_T tokens: fmc_route's choices grouped by expert on the device (fmc_route_group,
 * the host's grouping: each expert's tokens in order, its rows of ye after the experts before it), then one
 * fmc_experts_routed call for all of the layer's experts, the experts of many tokens on tensor cores in the tiles
 * the grouping mapped. So the host neither waits for the choices nor uploads lists, and the GPU never idles at the
 * layer's route. Folded (fold_of), the shared expert is one more expert of that call, on every token (rows T·k + t
 * of ye), and fmc_shared_combine ends the layer: its gate and up run on tensor cores with the routed experts'
 * rather than on fm_mm alone (a 512-row matrix is too few blocks for them), and eight launches fewer. 0 (nothing
 * issued) where it would not fit the budget, or while choices of an earlier call are still to be delivered into a
 * buffer it would have to grow; else 1, or 2 folded. */
int moe_prompt(cuda_ctx *c, int layer, const float *logits, int T, int E, int k, int norm, const float *xn, float *ye,
               int h, int32_t *idx, const fm_shared_expert *shared, float *out) {
    if (!device_prompts_on()) return 0;
    const fmc_expert *t0 = &c->tab_host[(size_t)layer * E];
    const fm_mat *g0 = &t0->gate, *d0 = &t0->down;
    fmc_expert sx = {};
    const bool fold = fold_of(shared, t0, h, &sx);
    const int n = T * k, rows = fold ? n + T : n;
    const int narrow = fmc_experts_imma_routed_narrow(n, E), bn = fmc_experts_imma_tile(narrow);
    const int big = aligned16(t0) ? fmc_experts_imma_routed_min(g0, d0) : 0;
    const size_t ffn_bytes = group_bytes(g0, d0, T, rows);
    const size_t pr_bytes = n > c->pr_cap ? prompt_bytes(n, E) : 0; /* E: c->n_exp, the model's */
    const size_t pin = (size_t)c->n_layers * (size_t)n;
    /* what growing the two device buffers would take, against the budget (the VRAM tier leaves VRAM_HEADROOM) */
    const size_t more = (ffn_bytes > c->ffn.size ? ffn_bytes - c->ffn.size : 0) +
                        (pr_bytes > c->pr.size ? pr_bytes - c->pr.size : 0);
    if (c->used + more > c->budget || (pin > c->pr_pinned_cap && c->n_deliv)) return 0;
    if (pin > c->pr_pinned_cap) {
        if (c->pr_pinned) cudaFreeHost(c->pr_pinned);
        c->pr_pinned = nullptr, c->pr_pinned_cap = 0;
        if (cudaMallocHost((void **)&c->pr_pinned, sizeof(int32_t) * pin) != cudaSuccess) {
            cudaGetLastError();
            c->pr_pinned = nullptr;
            return 0;
        }
        c->pr_pinned_cap = pin;
    }
    if (pr_bytes) {
        if (!grow(c, &c->pr, pr_bytes, "the prompt's routing arrays")) return 1; /* failure recorded */
        c->pr_cap = n;
    }
    uint8_t *mem = (uint8_t *)grow(c, &c->ffn, ffn_bytes, "expert scratch");
    if (!mem) return 1; /* failure recorded: finish() reports it */
    forget_q(c);
    layer_wait(c, layer);
    const prompt_arrays p = prompt_arrays_of(c->pr.p, c->pr_cap, E);
    const int map_n = fmc_route_group_tiles(T, k, E, big, bn, fold);
    launched(c, fmc_route(c->s, logits, T, E, k, norm, p.idx, p.w, nullptr, nullptr, nullptr, nullptr), "route");
    launched(c, fmc_route_group(c->s, p.idx, T, k, E, c->tab_dev + (size_t)layer * E, big, bn, fold ? &sx : nullptr,
                                p.ex, p.tok, p.rows, p.map, map_n), "route");
    launched(c, fmc_experts_routed(c->s, p.ex, t0, fold ? E + 1 : E, p.map, map_n, narrow, big, xn, T, h, (float *)mem,
                                   ye, rows, mem + h_bytes(g0, rows)), "experts");
    c->prompt_layers++;
    return routed_end(c, p, fold, true, shared, xn, T, k, h, out, ye, c->pr_pinned + (size_t)layer * n, idx);
}

int cuda_moe_device(void *ctx, int layer, const float *logits, int T, int E, int k, int norm, const float *xn, float *ye,
                    int h, int32_t *idx, const fm_shared_expert *shared, float *out) {
    cuda_ctx *c = ctx_of(ctx);
    if (!c->all_fit || c->err != FM_OK || T < 1 || k < 1 || k > DEV_K || k > E || E != c->n_exp || layer < 0 ||
        layer >= c->n_layers || !c->layer_ready[layer])
        return 0;
    if (T > DEV_T) return moe_prompt(c, layer, logits, T, E, k, norm, xn, ye, h, idx, shared, out);
    forget_q(c);
    const size_t key0 = (size_t)layer * E;
    layer_wait(c, layer);
    const int n = T * k;
    const dev_arrays d = dev_arrays_of(c->dev_buf);
    const fmc_expert *t0 = &c->tab_host[key0];
    fmc_expert sx = {};
    const bool fold = fold_of(shared, t0, h, &sx);
    const int n_ex = fold ? n + T : n;
    launched(c, fmc_route(c->s, logits, T, E, k, norm, d.idx, d.w, c->tab_dev + key0, d.ex, d.tok,
                          fold ? &sx : nullptr), "route");
    fmc_expert ex[DEV_NX]; /* the call's shape for fmc_experts' checks: the layer's expert 0 n times, then the shared */
    for (int i = 0; i < n_ex; i++) {
        ex[i] = i < n ? *t0 : sx;
        ex[i].tok = d.tok + i, ex[i].n = 1, ex[i].row0 = i;
    }
    const fm_mat *g0 = &ex[0].gate, *d0 = &ex[0].down;
    uint8_t *mem = (uint8_t *)grow(c, &c->ffn, group_bytes(g0, d0, T, n_ex), "expert scratch");
    if (mem)
        launched(c, fmc_experts(c->s, d.ex, ex, n_ex, xn, T, h, (float *)mem, ye, n_ex, mem + h_bytes(g0, n_ex)),
                 "experts");
    return routed_end(c, d, fold, mem != nullptr, shared, xn, T, k, h, out, ye, c->idx_pinned + (size_t)layer * DEV_N,
                      idx);
}

/* Drop the recording (it no longer matches the buffers, or a new one replaces it). */
void drop_graph(cuda_ctx *c) {
    if (c->graph) cudaGraphExecDestroy(c->graph);
    c->graph = nullptr;
}

/* A decode step (backend.h): replayed where the recording is still valid, else recorded when asked. */
int cuda_step_begin(void *ctx, int32_t token, int pos, int record) {
    cuda_ctx *c = ctx_of(ctx);
    forget_q(c);
    if (c->err != FM_OK || c->capturing) return 0;
    if (c->graph && (c->graph_gen != c->mem_gen || pos < c->graph_lo || pos >= c->graph_hi)) drop_graph(c);
    c->step_host[0] = token, c->step_host[1] = pos; /* the previous step has finished: nothing reads them now */
    if (c->graph) {
        const double t0 = fm_now();
        const bool launched_ok = ok(c, cudaGraphLaunch(c->graph, c->s), "replaying a decode step");
        c->launch_ns += (uint64_t)((fm_now() - t0) * 1e9);
        if (!launched_ok) return 0;
        memcpy(c->deliv, c->graph_deliv, sizeof(delivery) * (size_t)c->graph_n_deliv);
        c->n_deliv = c->graph_n_deliv;
        c->hits += c->graph_hits, c->folds += c->graph_folds;
        c->replays++;
        return 1;
    }
    if (!record || !graphs_on()) return 0;
    if (cudaStreamBeginCapture(c->s, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    c->capturing = true, c->broken = false;
    c->cap_pos = pos, c->cap_lo = 0, c->cap_hi = 0x7FFFFFFF;
    c->n_deliv = 0, c->graph_hits = c->hits, c->graph_folds = c->folds;
    ok(c, cudaMemcpyAsync(c->step_dev, c->step_host, 2 * sizeof(int32_t), cudaMemcpyHostToDevice, c->s), "step input");
    return 0;
}

int cuda_step_end(void *ctx) {
    cuda_ctx *c = ctx_of(ctx);
    forget_q(c);
    if (!c->capturing) return 1; /* the ops ran as issued */
    c->capturing = false;
    cudaGraph_t g = nullptr;
    const cudaError_t e = cudaStreamEndCapture(c->s, &g);
    cudaGraphExec_t x = nullptr;
    const bool good = e == cudaSuccess && g && !c->broken && c->err == FM_OK &&
                      cudaGraphInstantiate(&x, g, 0) == cudaSuccess;
    if (g) cudaGraphDestroy(g);
    cudaGetLastError();
    c->graph_hits = c->hits - c->graph_hits, c->graph_folds = c->folds - c->graph_folds;
    c->hits -= c->graph_hits, c->folds -= c->graph_folds; /* counted again when it runs */
    if (!good) { /* nothing ran: the core issues the step again, to run as issued */
        c->err = FM_OK, c->n_deliv = 0;
        return 0;
    }
    c->graph = x, c->graph_gen = c->mem_gen, c->graph_lo = c->cap_lo, c->graph_hi = c->cap_hi;
    memcpy(c->graph_deliv, c->deliv, sizeof(delivery) * (size_t)c->n_deliv);
    c->graph_n_deliv = c->n_deliv;
    c->recordings++;
    c->n_deliv = 0;
    return cuda_step_begin(ctx, c->step_host[0], c->cap_pos, 0); /* and run it */
}

/* Every expert into the VRAM cache at load (backend.h experts_preload), where the budget holds them all and
 * PRELOAD_MARGIN more: the scratch that grows at the first prompt (the matmuls' int8 activations, the grouped
 * experts' rows, attention's partials) then still fits. A budget that holds them only just keeps today's rule:
 * the cache is sized at first use, after that scratch. */
int cuda_experts_preload(void *ctx, const fm_expert_work *work, int n_work) {
    cuda_ctx *c = ctx_of(ctx);
    forget_q(c);
    if (n_work <= 0 || c->err != FM_OK || no_sync(c) || !device_route_on()) return 0;
    if (!c->vram_ready) {
        const span s0 = expert_span(&work[0]);
        const uint64_t sb = ((s0.hi - s0.lo) + 255) & ~(uint64_t)255;
        if (c->budget < c->used || c->budget - c->used < sb * (uint64_t)c->key_space + PRELOAD_MARGIN) return 0;
        if (!vram_init(c, s0.hi - s0.lo)) return 0;
    }
    if (!c->all_fit) return 0;
    int slots[64];
    for (int j0 = 0; j0 < n_work && c->err == FM_OK; j0 += 64) {
        const int n = n_work - j0 < 64 ? n_work - j0 : 64;
        for (int j = 0; j < n; j++) {
            const fm_expert_work *w = &work[j0 + j];
            const span s = expert_span(w);
            slots[j] = -1;
            if (w->key < 0 || w->key >= c->key_space) continue;
            if (s.hi - s.lo > c->slot_bytes) {
                failed(c, fm_fail(FM_ERR_INVALID, "cuda backend: an expert of %zu bytes, the VRAM slots hold %zu",
                                  (size_t)(s.hi - s.lo), c->slot_bytes));
                break;
            }
            slots[j] = vram_slot(c, w, s); /* every expert has a slot: never -1 */
        }
        ok(c, cudaStreamSynchronize(c->cs), "expert copies"); /* the host's memory is free again on return */
        for (int j = 0; j < n; j++)
            if (slots[j] >= 0) c->pending[slots[j]] = 0, c->locked[slots[j]] = 0;
    }
    return c->err == FM_OK;
}

} // namespace fm_cuda
