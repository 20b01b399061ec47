/*
 * model.c — loading a model from a load spec, the sequence state, the chunked forward driver
 * (embedding → architecture layers → final norm → lm_head) and generation.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../io/packed.h"
#include "model.h"
#include "util.h"

enum { LOGIT_ROWS = 4 }; /* lm_head rows computed at a time into backend memory, then copied to the host */
/* The most tokens of a prompt run layer by layer (a segment): each routed expert the segment uses is
 * read once per layer, whatever the budget. Its buffers grow with it: [S, H] three times and the
 * experts' outputs [S·k, H] (134 MB at 2048 tokens of the 35B shape). */
enum { SEGMENT_TOKENS = 2048 };

/* ---------------------------------------------------------------- weight binding */

static const fm_tensor_desc *find_tensor(const fm_load_spec *spec, const char *name) {
    for (int i = 0; i < spec->n_dense; i++)
        if (strcmp(spec->dense[i].name, name) == 0) return &spec->dense[i];
    return NULL;
}

static const char *dtype_name(fm_dtype d) {
    static const char *names[] = {"f32", "bf16", "q8", "q4"};
    return (unsigned)d < 4 ? names[d] : "?";
}

/* [offset, offset + n) lies inside [lo, hi), written so that offset + n cannot wrap around. */
static int fits(uint64_t offset, uint64_t n, uint64_t lo, uint64_t hi) {
    return offset >= lo && hi >= lo && n <= hi - lo && offset - lo <= hi - lo - n;
}

/* Check that a tensor lies inside the dense payload and has the size its dtype and shape imply. */
static fm_status check_extent(const fm_model *m, const fm_tensor_desc *d) {
    const uint64_t lo = FM_PREAMBLE_SIZE, hi = FM_PREAMBLE_SIZE + m->dense_size;
    const int64_t rows = d->shape[0], cols = d->ndim == 2 ? d->shape[1] : 1;
    if ((unsigned)d->dtype > FM_Q4)
        return fm_fail(FM_ERR_FORMAT, "tensor %s: unknown dtype %d", d->name, (int)d->dtype);
    if ((unsigned)d->scale_bf16 > 1 || (d->scale_bf16 && d->dtype != FM_Q4 && d->dtype != FM_Q8))
        return fm_fail(FM_ERR_FORMAT, "tensor %s: scale_bf16 %d on a %s tensor", d->name, d->scale_bf16,
                       dtype_name(d->dtype));
    const uint64_t want = fm_tensor_data_bytes(d->dtype, rows, cols);
    if (d->nbytes != want || !fits(d->offset, d->nbytes, lo, hi))
        return fm_fail(FM_ERR_FORMAT, "tensor %s: %llu bytes at offset %llu do not fit dense.bin (%s %lldx%lld needs %llu)",
                       d->name, (unsigned long long)d->nbytes, (unsigned long long)d->offset, dtype_name(d->dtype),
                       (long long)rows, (long long)cols, (unsigned long long)want);
    if (d->dtype == FM_Q4 || d->dtype == FM_Q8) {
        if (d->group_size <= 0 || cols % d->group_size || (d->dtype == FM_Q4 && d->group_size % 2))
            return fm_fail(FM_ERR_FORMAT, "tensor %s: group size %d does not divide %lld columns", d->name,
                           d->group_size, (long long)cols);
        const uint64_t sb = fm_tensor_scale_bytes(d->dtype, rows, cols, d->group_size);
        if (!fits(d->scales_offset, sb, lo, hi) || !fits(d->biases_offset, sb, lo, hi))
            return fm_fail(FM_ERR_FORMAT, "tensor %s: scales or biases lie outside dense.bin", d->name);
    }
    return FM_OK;
}

static const uint8_t *dense_at(const fm_model *m, uint64_t offset) { return m->dense + (offset - FM_PREAMBLE_SIZE); }

/* Find the tensor named by fmt/ap and check its shape ([rows] when cols == 0, else [rows, cols]) and
 * its extent in the dense file. */
static fm_status lookup(fm_model *m, const fm_load_spec *spec, int rows, int cols, const fm_tensor_desc **out,
                        const char *fmt, va_list ap) {
    char name[FM_MAX_NAME + 32];
    vsnprintf(name, sizeof name, fmt, ap);
    const fm_tensor_desc *d = find_tensor(spec, name);
    if (!d) return fm_fail(FM_ERR_FORMAT, "tensor %s is missing from the model", name);
    const int ndim = cols ? 2 : 1;
    if (d->ndim != ndim || d->shape[0] != rows || (cols && d->shape[1] != cols))
        return fm_fail(FM_ERR_FORMAT, "tensor %s has shape [%lld, %lld] (%d-D), the config implies [%d, %d] (%d-D)",
                       name, (long long)d->shape[0], (long long)(d->ndim == 2 ? d->shape[1] : 0), d->ndim, rows,
                       cols, ndim);
    *out = d;
    return check_extent(m, d);
}

fm_status fm_bind_mat(fm_model *m, const fm_load_spec *spec, fm_mat *out, int rows, int cols, const char *fmt, ...) {
    const fm_tensor_desc *d = NULL;
    va_list ap;
    va_start(ap, fmt);
    fm_status st = lookup(m, spec, rows, cols, &d, fmt, ap);
    va_end(ap);
    if (st != FM_OK) return st;
    fm_mat_view(d, m->dense, FM_PREAMBLE_SIZE, spec->int8_activations, out); /* lookup checked [rows, cols] */
    return FM_OK;
}

/* An f32 vector [rows] (cols == 0) or matrix [rows, cols]. */
fm_status fm_bind_f32(fm_model *m, const fm_load_spec *spec, const float **out, int rows, int cols, const char *fmt,
                      ...) {
    const fm_tensor_desc *d = NULL;
    va_list ap;
    va_start(ap, fmt);
    fm_status st = lookup(m, spec, rows, cols, &d, fmt, ap);
    va_end(ap);
    if (st != FM_OK) return st;
    if (d->dtype != FM_F32) return fm_fail(FM_ERR_FORMAT, "tensor %s is %s, expected f32", d->name, dtype_name(d->dtype));
    *out = (const float *)dense_at(m, d->offset);
    return FM_OK;
}

/* ---------------------------------------------------------------- config, state and scratch */

static fm_status check_config(const fm_config *c) {
    /* Sizes far above any real model's, small enough that products of a few of them (heads x head_dim x
     * tokens x 4 bytes) stay within 64 bits; python/flashmoe/reader.py has the same bound. */
    enum { MAX_DIM = 1 << 24 };
#define DIM(f, lo) \
    if (c->f < (lo) || c->f > MAX_DIM) \
        return fm_fail(FM_ERR_INVALID, "config: " #f " must be in %d..%d, got %d", (lo), MAX_DIM, c->f)
    DIM(vocab_size, 1); DIM(hidden_size, 1); DIM(num_hidden_layers, 1); DIM(num_attention_heads, 1);
    DIM(num_key_value_heads, 1); DIM(head_dim, 1); DIM(linear_conv_kernel_dim, 1); DIM(linear_key_head_dim, 1);
    DIM(linear_value_head_dim, 1); DIM(linear_num_key_heads, 1); DIM(linear_num_value_heads, 1);
    DIM(num_experts, 0); DIM(num_experts_per_tok, 0); DIM(moe_intermediate_size, 0);
    DIM(shared_expert_intermediate_size, 0); DIM(intermediate_size, 0);
#undef DIM
    /* NaN, infinity, zero or a negative value here would load and give NaN or silently wrong logits. */
    if (!(isfinite(c->rms_norm_eps) && c->rms_norm_eps > 0))
        return fm_fail(FM_ERR_INVALID, "config: rms_norm_eps %g must be finite and > 0", c->rms_norm_eps);
    if (!(isfinite(c->rope_theta) && c->rope_theta > 0))
        return fm_fail(FM_ERR_INVALID, "config: rope_theta %g must be finite and > 0", c->rope_theta);
    if (!(c->partial_rotary_factor > 0 && c->partial_rotary_factor <= 1)) /* false for NaN */
        return fm_fail(FM_ERR_INVALID, "config: partial_rotary_factor %g must be in (0, 1]", c->partial_rotary_factor);
    if (c->linear_conv_kernel_dim > FM_MAX_CONV_KERNEL) /* the conv keeps its taps on the stack (ops.c) */
        return fm_fail(FM_ERR_INVALID, "config: linear_conv_kernel_dim %d, at most %d supported",
                       c->linear_conv_kernel_dim, FM_MAX_CONV_KERNEL);
    if (c->num_hidden_layers > FM_MAX_LAYERS)
        return fm_fail(FM_ERR_INVALID, "config: %d layers, at most %d supported", c->num_hidden_layers, FM_MAX_LAYERS);
    if (c->num_attention_heads % c->num_key_value_heads)
        return fm_fail(FM_ERR_INVALID, "config: num_attention_heads %d not a multiple of num_key_value_heads %d",
                       c->num_attention_heads, c->num_key_value_heads);
    if (c->linear_num_value_heads % c->linear_num_key_heads)
        return fm_fail(FM_ERR_INVALID, "config: linear_num_value_heads %d not a multiple of linear_num_key_heads %d",
                       c->linear_num_value_heads, c->linear_num_key_heads);
    const int rot = (int)(c->head_dim * c->partial_rotary_factor); /* as blocks.c and HF compute it */
    if (rot % 2 || rot > c->head_dim)
        return fm_fail(FM_ERR_INVALID, "config: rotary dim %d (head_dim %d x partial_rotary_factor %g) must be even",
                       rot, c->head_dim, c->partial_rotary_factor);
    for (int l = 0; l < c->num_hidden_layers; l++) {
        if (c->layer_is_moe[l] && (c->num_experts <= 0 || c->num_experts_per_tok <= 0 ||
                                   c->num_experts_per_tok > c->num_experts || c->moe_intermediate_size <= 0 ||
                                   c->shared_expert_intermediate_size <= 0))
            return fm_fail(FM_ERR_INVALID, "config: layer %d is MoE but the expert sizes are invalid", l);
        if (!c->layer_is_moe[l] && c->intermediate_size <= 0)
            return fm_fail(FM_ERR_INVALID, "config: layer %d has a dense MLP but intermediate_size is %d", l,
                           c->intermediate_size);
    }
    return FM_OK;
}

/* Scratch for segments of S tokens whose mixers run C at a time, in two regions: the activations in
 * backend memory (dev) and the routing tables in host memory (host). Lays them out when the pointers are
 * given; returns the bytes of each region. */
static void layout_scratch(fm_model *m, uint8_t *dev, uint8_t *host, size_t *dev_bytes, size_t *host_bytes) {
    const fm_config *c = &m->c;
    const size_t C = (size_t)m->chunk, S = (size_t)m->segment, H = c->hidden_size, V = c->vocab_size;
    const size_t key_dim = (size_t)c->linear_num_key_heads * c->linear_key_head_dim;
    const size_t vdim = (size_t)c->linear_num_value_heads * c->linear_value_head_dim;
    const size_t conv_dim = 2 * key_dim + vdim, Hv = c->linear_num_value_heads;
    const size_t qd = (size_t)c->num_attention_heads * c->head_dim, kvd = (size_t)c->num_key_value_heads * c->head_dim;
    const size_t E = c->num_experts > 0 ? c->num_experts : 1, k = c->num_experts_per_tok > 0 ? c->num_experts_per_tok : 1;
    const size_t inter = c->shared_expert_intermediate_size > c->intermediate_size ? c->shared_expert_intermediate_size
                                                                                   : c->intermediate_size;
    /* ye's rows a token: its k choices, and where the backend has moe_device the shared expert's (folded in) */
    const size_t ye_k = k + (m->be.op && m->be.op->moe_device ? 1 : 0);
    const size_t logit_rows = C < LOGIT_ROWS ? C : LOGIT_ROWS;
    fm_scratch *s = &m->s;
    /* Elements of 4 bytes (fm_expert and fm_expert_work: whole 4-byte words). A layer's mixer (DeltaNet or
     * attention) reads xn and writes out, then its MoE does the same: each one's buffers are dead once it
     * returns, so the three groups share one region of the backend's memory. */
    enum { OWN, DELTANET, ATTENTION, MOE, HOST, N_GROUPS };
    struct { void **p; size_t n; int group; } parts[] = {
        {(void **)&s->x, S * H, OWN}, {(void **)&s->xn, S * H, OWN}, {(void **)&s->out, S * H, OWN},
        {(void **)&s->logits_out, logit_rows * V, OWN},
        {(void **)&s->qkv, C * conv_dim, DELTANET}, {(void **)&s->conv, C * conv_dim, DELTANET},
        {(void **)&s->z, C * vdim, DELTANET}, {(void **)&s->b, C * Hv, DELTANET}, {(void **)&s->a, C * Hv, DELTANET},
        {(void **)&s->core, C * vdim, DELTANET},
        {(void **)&s->q2, C * 2 * qd, ATTENTION}, {(void **)&s->q, C * qd, ATTENTION},
        {(void **)&s->gate, C * qd, ATTENTION}, {(void **)&s->k, C * kvd, ATTENTION},
        {(void **)&s->v, C * kvd, ATTENTION}, {(void **)&s->att, C * qd, ATTENTION},
        {(void **)&s->logits, S * E, MOE}, {(void **)&s->sg, S, MOE}, {(void **)&s->h1, C * inter, MOE},
        {(void **)&s->h2, C * inter, MOE}, {(void **)&s->ye, S * ye_k * H, MOE},
        {(void **)&s->topk, S * k, HOST}, {(void **)&s->topw, S * k, HOST}, {(void **)&s->tok, S * k, HOST},
        {(void **)&s->row, S * k, HOST}, {(void **)&s->ecount, E + 1, HOST}, {(void **)&s->eoff, E + 1, HOST},
        {(void **)&s->need, E, HOST}, {(void **)&s->held, E, HOST}, {(void **)&s->held_e, E, HOST},
        {(void **)&s->ready, E, HOST}, {(void **)&s->ptopk, S * k, HOST}, {(void **)&s->pw, S * k, HOST},
        {(void **)&s->pred, E, HOST}, {(void **)&s->mark, E, HOST},
        {(void **)&s->views, E * (sizeof(fm_expert) / 4), HOST},
        {(void **)&s->work, E * (sizeof(fm_expert_work) / 4), HOST},
    };
    const size_t n_parts = sizeof parts / sizeof parts[0];
    size_t used[N_GROUPS] = {0}, own = 0, shared = 0; /* OWN first, then the shared region */
    for (size_t i = 0; i < n_parts; i++)
        if (parts[i].group == OWN) own += (parts[i].n * 4 + 63) & ~(size_t)63;
    for (size_t i = 0; i < n_parts; i++) {
        const int g = parts[i].group;
        if (g == HOST) {
            if (host) *parts[i].p = host + used[g];
        } else if (dev) {
            *parts[i].p = dev + (g == OWN ? 0 : own) + used[g];
        }
        used[g] += (parts[i].n * 4 + 63) & ~(size_t)63;
        if (g != OWN && g != HOST && used[g] > shared) shared = used[g];
    }
    *dev_bytes = own + shared;
    *host_bytes = used[HOST];
}

static size_t scratch_bytes(fm_model *m) {
    size_t dev, host;
    layout_scratch(m, NULL, NULL, &dev, &host);
    return dev + host + m->be_workspace;
}

/* Bytes of one layer's sequence state: DeltaNet conv state [K-1, conv_dim] and recurrent state
 * [Hv, dk, dv]; attention K and V caches [ctx, nkv, hd] each. */
static size_t conv_state_bytes(const fm_config *c) {
    const size_t conv_dim = 2 * (size_t)c->linear_num_key_heads * c->linear_key_head_dim +
                            (size_t)c->linear_num_value_heads * c->linear_value_head_dim;
    return (size_t)(c->linear_conv_kernel_dim - 1) * conv_dim * sizeof(float);
}
static size_t recurrent_state_bytes(const fm_config *c) {
    return (size_t)c->linear_num_value_heads * c->linear_key_head_dim * c->linear_value_head_dim * sizeof(float);
}
static size_t kv_cache_bytes(const fm_config *c, int ctx) {
    return (size_t)ctx * c->num_key_value_heads * c->head_dim * sizeof(float);
}

/* A backend allocation failed: the backend's own reason where it recorded one (finish() reports it, its
 * message standing: CUDA's gpu_memory_budget, say), else FM_ERR_NOMEM saying what could not be had. */
static fm_status alloc_failed(fm_model *m, const char *what) {
    const fm_status st = FM_OP(&m->be, finish);
    return st != FM_OK ? st : fm_fail(FM_ERR_NOMEM, "%s backend: cannot allocate %s", m->be.op->name, what);
}

static float *alloc_state_buf(fm_model *m, size_t bytes) {
    return (float *)FM_OP(&m->be, alloc, FM_MEM_STATE, bytes);
}

static fm_status alloc_state(fm_model *m) {
    const fm_config *c = &m->c;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        fm_layer *L = &m->layers[l];
        if (L->full_attention) {
            L->k_cache = alloc_state_buf(m, kv_cache_bytes(c, m->ctx));
            L->v_cache = alloc_state_buf(m, kv_cache_bytes(c, m->ctx));
            if (!L->k_cache || !L->v_cache) {
                char what[96];
                snprintf(what, sizeof what, "layer %d's KV cache for %d tokens", l, m->ctx);
                return alloc_failed(m, what);
            }
        } else {
            L->conv_state = alloc_state_buf(m, conv_state_bytes(c));
            L->S = alloc_state_buf(m, recurrent_state_bytes(c));
            if (!L->conv_state || !L->S) {
                char what[64];
                snprintf(what, sizeof what, "layer %d's DeltaNet state", l);
                return alloc_failed(m, what);
            }
        }
    }
    return FM_OK;
}

static void free_state(fm_model *m) {
    const fm_config *c = &m->c;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        fm_layer *L = &m->layers[l];
        void *bufs[4] = {L->conv_state, L->S, L->k_cache, L->v_cache};
        const size_t sizes[4] = {conv_state_bytes(c), recurrent_state_bytes(c), kv_cache_bytes(c, m->ctx),
                                 kv_cache_bytes(c, m->ctx)};
        for (int i = 0; i < 4; i++)
            if (bufs[i]) FM_OP(&m->be, free, FM_MEM_STATE, bufs[i], sizes[i]);
    }
}

void fm_model_reset(fm_model *m) {
    const fm_config *c = &m->c;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        fm_layer *L = &m->layers[l];
        /* The KV cache needs no clearing: attention never reads past the current position. */
        if (L->conv_state) FM_OP(&m->be, fill_zero, L->conv_state, conv_state_bytes(c));
        if (L->S) FM_OP(&m->be, fill_zero, L->S, recurrent_state_bytes(c));
    }
    memset(m->dev_routed, 0, sizeof(int32_t) * (size_t)c->num_hidden_layers);
    m->host_free_steps = 0;
    m->pos = 0;
}

/* ---------------------------------------------------------------- load / free */

static double mib(uint64_t b) { return (double)b / (1024.0 * 1024.0); }

/* Check the expert blob layout against the config (the C API does not trust its caller). */
static fm_status check_experts(const fm_load_spec *spec) {
    const int I = spec->config.moe_intermediate_size, H = spec->config.hidden_size;
    const fm_tensor_desc *ed[3] = {&spec->expert_gate, &spec->expert_up, &spec->expert_down};
    const int shapes[3][2] = {{I, H}, {I, H}, {H, I}};
    const uint64_t blob = spec->expert_blob_size;
    for (int i = 0; i < 3; i++) {
        const fm_tensor_desc *d = ed[i];
        const int quant = d->dtype == FM_Q4 || d->dtype == FM_Q8;
        if ((unsigned)d->dtype > FM_Q4)
            return fm_fail(FM_ERR_FORMAT, "expert %s: unknown dtype %d", d->name, (int)d->dtype);
        if ((unsigned)d->scale_bf16 > 1 || (d->scale_bf16 && !quant))
            return fm_fail(FM_ERR_FORMAT, "expert %s: scale_bf16 %d on a %s tensor", d->name, d->scale_bf16,
                           dtype_name(d->dtype));
        if (d->ndim != 2 || d->shape[0] != shapes[i][0] || d->shape[1] != shapes[i][1])
            return fm_fail(FM_ERR_FORMAT, "expert %s has shape [%lld, %lld], the config implies [%d, %d]", d->name,
                           (long long)d->shape[0], (long long)d->shape[1], shapes[i][0], shapes[i][1]);
        /* before fm_tensor_scale_bytes divides by it */
        if (quant && (d->group_size <= 0 || d->shape[1] % d->group_size || (d->dtype == FM_Q4 && d->group_size % 2)))
            return fm_fail(FM_ERR_FORMAT, "expert %s: group size %d does not divide %lld columns", d->name,
                           d->group_size, (long long)d->shape[1]);
        const uint64_t sb = fm_tensor_scale_bytes(d->dtype, d->shape[0], d->shape[1], d->group_size);
        if (!fits(d->offset, fm_tensor_data_bytes(d->dtype, d->shape[0], d->shape[1]), 0, blob) ||
            (quant && (!fits(d->scales_offset, sb, 0, blob) || !fits(d->biases_offset, sb, 0, blob))))
            return fm_fail(FM_ERR_FORMAT, "expert %s does not fit the %llu-byte blob", d->name, (unsigned long long)blob);
    }
    if (spec->expert_stride < blob || spec->expert_stride % FM_PREAMBLE_SIZE)
        return fm_fail(FM_ERR_FORMAT, "expert stride %llu is not a 16 KiB multiple >= blob size %llu",
                       (unsigned long long)spec->expert_stride, (unsigned long long)blob);
    const uint64_t n = (uint64_t)spec->config.num_experts; /* a layer's file: preamble + n * stride bytes */
    if (n > 0 && spec->expert_stride > (UINT64_MAX - FM_PREAMBLE_SIZE) / n)
        return fm_fail(FM_ERR_FORMAT, "expert stride %llu is too large for a file of %llu experts",
                       (unsigned long long)spec->expert_stride, (unsigned long long)n);
    return FM_OK;
}

/* Split the memory budget: dense weights, KV cache, DeltaNet state and scratch first, the rest is the
 * expert cache. The smallest workable cache holds one layer's working set (k experts of a token). */
static fm_status plan_memory(fm_model *m, const fm_load_spec *spec, int n_moe) {
    const fm_config *c = &m->c;
    fm_memory *mem = &m->mem;
    uint64_t kv = 0, state = 0;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        if (c->layer_is_full_attention[l])
            kv += 2 * (uint64_t)kv_cache_bytes(c, m->ctx);
        else
            state += (uint64_t)(conv_state_bytes(c) + recurrent_state_bytes(c));
    }
    const uint64_t overhead = 16ull << 20; /* thread stacks in use, tables, generation buffers */
    if (spec->dense_size < FM_PREAMBLE_SIZE)
        return fm_fail(FM_ERR_FORMAT, "%s: %llu bytes, less than its %d-byte preamble", spec->dense_path,
                       (unsigned long long)spec->dense_size, FM_PREAMBLE_SIZE);
    mem->dense = spec->dense_size - FM_PREAMBLE_SIZE;
    mem->kv_cache = kv;
    mem->state = state;
    mem->scratch = scratch_bytes(m) + overhead;
    mem->experts_total = n_moe * c->num_experts;
    const uint64_t stride = n_moe ? fm_expert_store_slot_bytes(spec) : 0;
    const uint64_t fixed = mem->dense + kv + state + mem->scratch;
    const int k = c->num_experts_per_tok;
    if (spec->memory_budget) {
        mem->budget = spec->memory_budget;
    } else { /* no budget given: half of physical RAM, and never less than the minimum */
        long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
        mem->budget = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page / 2 : 8ull << 30;
        if (mem->budget < fixed + (uint64_t)k * stride) mem->budget = fixed + (uint64_t)k * stride;
    }
    const uint64_t need = fixed + (n_moe ? (uint64_t)k * stride : 0);
    mem->minimum = need;
    if (m->be_limit) { /* a GPU that may keep only so much resident (Metal: the wired limit) */
        if (need > m->be_limit || (spec->memory_budget && spec->memory_budget > m->be_limit))
            return fm_fail(FM_ERR_BUDGET,
                           "the %s backend may hold %.1f MiB (the GPU's recommended working set; on macOS the "
                           "sysctl iogpu.wired_limit_mb raises it), less than %s %.1f MiB", m->be.op->name,
                           mib(m->be_limit), need > m->be_limit ? "the least this model needs," : "memory_budget",
                           mib(need > m->be_limit ? need : spec->memory_budget));
        if (mem->budget > m->be_limit) mem->budget = m->be_limit; /* the default budget: what the GPU holds */
    }
    if (mem->budget < need)
        return fm_fail(FM_ERR_BUDGET,
                       "memory budget %.1f MiB is too small: dense weights %.1f MiB + KV cache %.1f MiB (%d tokens) + "
                       "DeltaNet state %.1f MiB + scratch %.1f MiB + one layer's %d experts %.1f MiB need at least "
                       "%llu bytes (%.2f MiB)", mib(mem->budget), mib(mem->dense), mib(kv), m->ctx, mib(state),
                       mib(mem->scratch), k, mib((uint64_t)k * stride), (unsigned long long)need,
                       ceil(mib(need) * 100.0) / 100.0);
    if (!n_moe) return FM_OK;
    uint64_t slots = (mem->budget - fixed) / stride;
    if (spec->cache_policy == FM_CACHE_PAGECACHE) { /* no engine cache: staging for two layers' reads */
        const uint64_t staging = 2 * (uint64_t)k;
        if (slots > staging) slots = staging;
    }
    if (spec->expert_cache_slots > 0 && (uint64_t)spec->expert_cache_slots < slots) slots = spec->expert_cache_slots;
    if (slots > (uint64_t)mem->experts_total) slots = (uint64_t)mem->experts_total;
    mem->expert_slots = (int)slots;
    mem->expert_cache = slots * stride;
    return FM_OK;
}

/* The model struct with its layer table and memory plan, nothing large allocated yet. */
static fm_status model_create(const fm_load_spec *spec, fm_model **out, int *n_moe_out) {
    *out = NULL;
    fm_status st = check_config(&spec->config);
    if (st != FM_OK) return st;
    fm_model *m = (fm_model *)calloc(1, sizeof *m);
    if (!m) return fm_fail(FM_ERR_NOMEM, "model: out of memory");
    *out = m;
    m->c = spec->config;
    switch (m->c.arch) {
    case FM_ARCH_QWEN3_5_MOE: m->arch = &fm_arch_qwen3_5_moe; break;
    case FM_ARCH_QWEN3_NEXT: m->arch = &fm_arch_qwen3_next; break;
    default: return fm_fail(FM_ERR_INVALID, "unknown architecture id %d", (int)spec->config.arch);
    }
    m->ctx = spec->context_length > 0 ? spec->context_length : 4096;
    /* Chunks are whole DeltaNet chunks (backend.h: the calls of a prompt are cut at multiples of it), and
     * a segment is whole chunks: up to SEGMENT_TOKENS, or the context if shorter. */
    const int chunk = spec->prefill_chunk > 0 ? spec->prefill_chunk : 128;
    m->chunk = (chunk + FM_DELTANET_CHUNK - 1) / FM_DELTANET_CHUNK * FM_DELTANET_CHUNK;
    const int segment = m->ctx < SEGMENT_TOKENS ? m->ctx : SEGMENT_TOKENS;
    m->segment = segment <= m->chunk ? m->chunk : (segment + m->chunk - 1) / m->chunk * m->chunk;
    const fm_backend_ops *ops = fm_backend_find(spec->backend);
    if (!ops) return FM_ERR_INVALID; /* fm_backend_find said which */
    const char *missing = fm_backend_missing_op(ops);
    if (missing) return fm_fail(FM_ERR_INVALID, "the %s backend has no op %s yet: it cannot run a model", ops->name, missing);
    const fm_backend_params bp = {&m->c, m->chunk, m->segment, spec->gpu_memory_budget};
    m->be.op = ops;
    m->be_workspace = ops->workspace_bytes(&bp);
    m->be_limit = ops->memory_limit(&bp);
    m->prefetch = spec->prefetch && spec->cache_policy != FM_CACHE_PAGECACHE;
    const int L = m->c.num_hidden_layers;
    m->layers = (fm_layer *)calloc((size_t)L, sizeof(fm_layer));
    m->usage = (uint64_t *)calloc((size_t)L * (size_t)(m->c.num_experts > 0 ? m->c.num_experts : 1), sizeof(uint64_t));
    m->dev_routed = (int32_t *)calloc((size_t)L, sizeof(int32_t));
    /* the choices of the layers the backend routes: a segment's where it routes prompts too */
    const size_t dev_T = ops->moe_device ? (size_t)m->segment : 1;
    m->dev_idx = (int32_t *)calloc((size_t)L * dev_T * (size_t)(m->c.num_experts_per_tok > 0 ? m->c.num_experts_per_tok : 1),
                                   sizeof(int32_t));
    if (!m->layers || !m->usage || !m->dev_routed || !m->dev_idx) return fm_fail(FM_ERR_NOMEM, "model: out of memory");
    int n_moe = 0;
    for (int l = L - 1, next = -1; l >= 0; l--) {
        m->layers[l].full_attention = m->c.layer_is_full_attention[l];
        m->layers[l].moe = m->c.layer_is_moe[l];
        m->layers[l].next_moe = next;
        if (m->layers[l].moe) {
            next = l;
            n_moe++;
        }
    }
    *n_moe_out = m->n_moe = n_moe;
    if (n_moe && (st = check_experts(spec)) != FM_OK) return st;
    return plan_memory(m, spec, n_moe);
}

fm_status fm_model_plan(const fm_load_spec *spec, fm_memory *out) {
    fm_model *m = NULL;
    int n_moe = 0;
    memset(out, 0, sizeof *out);
    fm_status st = model_create(spec, &m, &n_moe);
    if (m) *out = m->mem;
    fm_model_free(m);
    return st;
}

fm_status fm_model_load(const fm_load_spec *spec, fm_model **out) {
    *out = NULL;
    fm_model *m = NULL;
    int n_moe = 0;
    fm_status st = model_create(spec, &m, &n_moe);
    if (st != FM_OK) goto fail;
    const int V = m->c.vocab_size, H = m->c.hidden_size;

    const fm_backend_params bp = {&m->c, m->chunk, m->segment, spec->gpu_memory_budget};
    if ((st = fm_backend_open(m->be.op, &bp, &m->be)) != FM_OK) goto fail;
    const uint32_t *dense_crc = spec->verify_checksums && spec->has_dense_checksum ? &spec->dense_checksum : NULL;
    if ((st = fm_packed_read_dense(spec->dense_path, spec->dense_size, dense_crc, &m->dense_host)) != FM_OK) goto fail;
    m->dense_size = spec->dense_size - FM_PREAMBLE_SIZE;
    if (!(m->dense = (uint8_t *)FM_OP(&m->be, wrap_host, m->dense_host, m->dense_size))) {
        char what[64];
        snprintf(what, sizeof what, "the dense weights (%zu bytes)", (size_t)m->dense_size);
        st = alloc_failed(m, what);
        goto fail;
    }
    if ((st = fm_bind_mat(m, spec, &m->embed, V, H, "embed_tokens.weight")) != FM_OK) goto fail;
    if ((st = fm_bind_f32(m, spec, &m->norm, H, 0, "norm.weight")) != FM_OK) goto fail;
    if (m->c.tie_word_embeddings)
        m->lm_head = m->embed;
    else if ((st = fm_bind_mat(m, spec, &m->lm_head, V, H, "lm_head.weight")) != FM_OK)
        goto fail;
    if ((st = m->arch->bind(m, spec)) != FM_OK) goto fail;
    if (n_moe && (st = fm_expert_store_init(&m->experts, spec, m->mem.expert_slots, &m->be)) != FM_OK) goto fail;
    if ((st = alloc_state(m)) != FM_OK) goto fail;
    if (!(m->seq = (int32_t *)malloc(sizeof(int32_t) * (size_t)m->ctx))) {
        st = fm_fail(FM_ERR_NOMEM, "cannot allocate the token list for a context of %d", m->ctx);
        goto fail;
    }
    size_t dev_bytes, host_bytes;
    layout_scratch(m, NULL, NULL, &dev_bytes, &host_bytes);
    m->scratch_mem = FM_OP(&m->be, alloc, FM_MEM_SCRATCH, dev_bytes);
    m->host_scratch = fm_alloc(host_bytes);
    if (!m->scratch_mem || !m->host_scratch) {
        char what[64];
        snprintf(what, sizeof what, "scratch for chunks of %d tokens", m->chunk);
        st = alloc_failed(m, what);
        goto fail;
    }
    layout_scratch(m, (uint8_t *)m->scratch_mem, (uint8_t *)m->host_scratch, &dev_bytes, &host_bytes);
    if ((st = fm_preload_device_experts(m)) != FM_OK) goto fail;
    *out = m;
    return FM_OK;
fail:
    fm_model_free(m);
    return st;
}

void fm_model_free(fm_model *m) {
    if (!m) return;
    if (m->be.ctx) { /* the backend instance was opened: its buffers go back to it */
        if (m->layers) free_state(m);
        if (m->scratch_mem) {
            size_t dev_bytes, host_bytes;
            layout_scratch(m, NULL, NULL, &dev_bytes, &host_bytes);
            FM_OP(&m->be, free, FM_MEM_SCRATCH, m->scratch_mem, dev_bytes);
        }
        if (m->dense) FM_OP(&m->be, unwrap_host, m->dense, m->dense_size);
    }
    fm_expert_store_free(m->experts);
    fm_backend_close(&m->be);
    free(m->layers);
    free(m->usage);
    free(m->dev_routed);
    free(m->dev_idx);
    free(m->seq);
    fm_free(m->dense_host);
    fm_free(m->host_scratch);
    fm_free(m->step_logits);
    free(m);
}

const char *fm_model_backend(const fm_model *m) { return m->be.op ? m->be.op->name : "cpu"; }

int fm_model_position(const fm_model *m) { return m->pos; }
const int32_t *fm_model_tokens(const fm_model *m) { return m->seq; }
int fm_model_context_length(const fm_model *m) { return m->ctx; }

void fm_model_debug_fail_reads(fm_model *m, int after, int count, int corrupt) {
    if (m->experts) fm_expert_store_debug_fail_reads(m->experts, after, count, corrupt);
}

/* ---------------------------------------------------------------- forward */

void fm_model_set_trace(fm_model *m, fm_trace_fn fn, void *user) {
    m->trace = fn;
    m->trace_user = user;
}

void fm_model_set_progress(fm_model *m, fm_progress_fn fn, void *user) {
    m->progress = fn;
    m->progress_user = user;
}

void fm_trace(fm_model *m, const float *x, int T, int n, const char *fmt, ...) {
    if (!m->trace) return;
    char name[64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    m->trace(m->trace_user, name, x, T, n);
}

/* The segment's T tokens in s.x (positions pos ..) through every layer, one layer at a time (FlexGen's
 * order): its mixer on chunks that end at multiples of C in absolute position, in order (the state
 * advances chunk by chunk), then its MLP or MoE on all T tokens, which reads each routed expert the
 * segment uses once. Every op is batch invariant (backend.h), so the cut changes no bit of the result. */
static fm_status run_layers(fm_model *m, int T, int done, int total) {
    const size_t H = (size_t)m->c.hidden_size;
    const int L = m->c.num_hidden_layers;
    for (int l = 0; l < L; l++) {
        for (int t0 = 0, n; t0 < T; t0 += n) {
            n = m->chunk - (m->pos + t0) % m->chunk;
            if (n > T - t0) n = T - t0;
            m->arch->mixer(m, l, m->s.x + (size_t)t0 * H, n, m->pos + t0);
        }
        fm_status st = m->arch->mlp(m, l, m->s.x, T);
        if (st != FM_OK) return st;
        const int now = done + (int)((int64_t)T * (l + 1) / L);
        if (m->progress && m->progress(m->progress_user, now, total))
            return fm_fail(FM_ERR_CANCELLED, "forward: stopped by the caller after layer %d of %d tokens", l, total);
    }
    return FM_OK;
}

/* The segment's T tokens (of a call of `total`, `done` before them) embedded into s.x and through every layer. */
static fm_status embed_and_layers(fm_model *m, const int32_t *tokens, int T, int done, int total) {
    FM_OP(&m->be, embed, &m->embed, tokens, T, m->s.x);
    fm_trace(m, m->s.x, T, m->c.hidden_size, "embed");
    return run_layers(m, T, done, total);
}

/* Rows [first, first + rows) of s.x through the final norm, into s.xn. */
static void final_norm(fm_model *m, int first, int rows) {
    const int H = m->c.hidden_size;
    FM_OP(&m->be, rmsnorm, m->s.xn, m->s.x + (size_t)first * H, m->norm, rows, H, m->c.rms_norm_eps, 1);
    fm_trace(m, m->s.xn, rows, H, "final_norm");
}

/* One decode token's ops but the logits' copy to the host: what a backend may record and replay. */
static fm_status step_ops(fm_model *m, const int32_t *token) {
    const fm_status st = embed_and_layers(m, token, 1, 0, 1);
    if (st != FM_OK) return st;
    final_norm(m, 0, 1);
    FM_OP(&m->be, matmul, &m->lm_head, m->s.xn, 1, m->s.logits_out);
    return FM_OK;
}

/* The last logits computed (s.logits_out's first row) to the host, or (greedy) their argmax alone */
static void logits_out(fm_model *m, float *logits, int32_t *greedy) {
    const int V = m->c.vocab_size;
    if (greedy) FM_OP(&m->be, argmax, greedy, m->s.logits_out, V);
    else FM_OP(&m->be, to_host, logits, m->s.logits_out, sizeof(float) * (size_t)V);
}

/* A decode step through the backend's recording (backend.h step_begin): replayed; or issued, recorded where the
 * last step ran without the host, and issued once more where recording failed (a failed recording's host-side
 * counts undone: its routing on the host, if any, had made-up choices). Then the logits to the host (logits_out). */
static fm_status step_recorded(fm_model *m, const int32_t *token, float *logits, int32_t *greedy) {
    const int L = m->c.num_hidden_layers, record = m->host_free_steps > 0;
    if (FM_OP(&m->be, step_begin, *token, m->pos, record)) {
        for (int l = 0; l < L; l++) m->dev_routed[l] = m->layers[l].moe;
    } else {
        const size_t usage_bytes = sizeof(uint64_t) * (size_t)L * (size_t)m->c.num_experts;
        uint64_t *saved = record && usage_bytes ? (uint64_t *)malloc(usage_bytes) : NULL;
        if (saved) memcpy(saved, m->usage, usage_bytes);
        fm_status st = step_ops(m, token);
        const int ran = FM_OP(&m->be, step_end);
        if (!ran && saved) memcpy(m->usage, saved, usage_bytes);
        free(saved);
        if (st == FM_OK && !ran) st = step_ops(m, token);
        if (st != FM_OK) return st;
    }
    logits_out(m, logits, greedy);
    return FM_OK;
}

/* fm_model_forward; or, with greedy (and logits NULL, all_logits 0, the backend's argmax op), the last position's
 * greedy token into *greedy, found on the backend: the logits stay there. */
static fm_status forward(fm_model *m, const int32_t *tokens, int n, float *logits, int all_logits, int32_t *greedy) {
    const int V = m->c.vocab_size, H = m->c.hidden_size;
    if (n <= 0) return fm_fail(FM_ERR_INVALID, "forward: no tokens given");
    if ((int64_t)m->pos + n > m->ctx)
        return fm_fail(FM_ERR_CONTEXT, "forward: %d tokens at position %d exceed the context length %d", n, m->pos,
                       m->ctx);
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= V)
            return fm_fail(FM_ERR_INVALID, "forward: token %d at index %d is outside the vocabulary [0, %d)",
                           tokens[i], i, V);
    const double t0 = fm_now();
    /* a decode step a backend can record and replay: one token, nothing to call back between its ops */
    const int out = logits || greedy; /* the last position's logits are wanted */
    const int recordable = n == 1 && out && m->be.op->step_begin && !m->trace && !m->progress;
    for (int done = 0; done < n;) {
        /* segments end at multiples of S in absolute position, as chunks do at multiples of C */
        const int T = n - done < m->segment - m->pos % m->segment ? n - done : m->segment - m->pos % m->segment;
        fm_status st = recordable ? step_recorded(m, tokens, logits, greedy)
                                  : embed_and_layers(m, tokens + done, T, done, n);
        if (!recordable && st == FM_OK && out && (all_logits || done + T == n)) {
            const int first = all_logits ? 0 : T - 1, rows = T - first;
            final_norm(m, first, rows);
            float *dst = all_logits ? logits + (size_t)done * V : logits;
            for (int r = 0; r < rows; r += LOGIT_ROWS) { /* LOGIT_ROWS at a time, then to the host */
                const int nr = rows - r < LOGIT_ROWS ? rows - r : LOGIT_ROWS;
                FM_OP(&m->be, matmul, &m->lm_head, m->s.xn + (size_t)r * H, nr, m->s.logits_out);
                if (greedy) logits_out(m, NULL, greedy); /* one row: all_logits is 0 */
                else FM_OP(&m->be, to_host, dst + (size_t)r * V, m->s.logits_out, sizeof(float) * (size_t)nr * V);
            }
        }
        /* the backend's verdict on everything issued for the segment (a GPU's failed command buffer) */
        const fm_status fin = FM_OP(&m->be, finish);
        if (st == FM_OK) st = fin;
        if (st != FM_OK) {
            /* Some layers of this chunk have advanced their state and others not: the only consistent
             * state left is the empty sequence. Reads still in flight land first; no slot stays pinned. */
            if (m->experts) fm_expert_store_recover(m->experts);
            fm_model_reset(m);
            return st;
        }
        const int n_dev = fm_count_device_choices(m); /* their choices have landed */
        m->host_free_steps = T == 1 && n_dev == m->n_moe ? m->host_free_steps + 1 : 0;
        memcpy(m->seq + m->pos, tokens + done, sizeof(int32_t) * (size_t)T);
        m->pos += T;
        done += T;
    }
    /* Mispredicted prefetches may still be in flight: let them land so a call's counters are its own. */
    if (m->experts) fm_expert_store_drain(m->experts);
    m->tokens += (uint64_t)n;
    m->compute_seconds += fm_now() - t0;
    return FM_OK;
}

fm_status fm_model_forward(fm_model *m, const int32_t *tokens, int n, float *logits, int all_logits) {
    return forward(m, tokens, n, logits, all_logits, NULL);
}

/* 1 when s's tokens can be found by the backend's argmax (forward's greedy) */
static int device_greedy(const fm_model *m, const fm_sampler *s) { return m->be.op->argmax && fm_sampler_greedy(s); }

/* ---------------------------------------------------------------- generation */

fm_status fm_model_generate(fm_model *m, const int32_t *prompt, int n_prompt, int max_tokens, const fm_sampling *sp,
                            const int32_t *stop_ids, int n_stop, int32_t *out, int *n_out) {
    *n_out = 0;
    const int V = m->c.vocab_size;
    const fm_sampling plain = fm_sampling_default();
    fm_sampler *smp = NULL;
    fm_status st = fm_sampler_new(sp ? sp : &plain, V, &smp);
    if (st != FM_OK) return st;
    int32_t next = 0, *greedy = device_greedy(m, smp) ? &next : NULL; /* else the logits, sampled here */
    float *logits = greedy ? NULL : (float *)fm_alloc((size_t)V * sizeof(float));
    if (!greedy && !logits) {
        fm_sampler_free(smp);
        return fm_fail(FM_ERR_NOMEM, "generate: out of memory");
    }
    if (n_prompt > 0) fm_sampler_accept(smp, prompt, n_prompt);
    double t0 = fm_now();
    st = forward(m, prompt, n_prompt, greedy ? NULL : logits, 0, greedy);
    m->last_prompt_tokens = n_prompt;
    m->last_prompt_seconds = fm_now() - t0;
    t0 = fm_now();
    for (int i = 0; st == FM_OK && i < max_tokens; i++) {
        const int32_t tok = greedy ? next : fm_sampler_sample(smp, logits);
        fm_sampler_accept(smp, &tok, 1);
        out[(*n_out)++] = tok;
        int stop = 0;
        for (int j = 0; j < n_stop; j++) stop |= stop_ids[j] == tok;
        if (stop || i + 1 == max_tokens || m->pos >= m->ctx) break;
        st = forward(m, &tok, 1, greedy ? NULL : logits, 0, greedy);
    }
    m->last_generated_tokens = *n_out;
    m->last_decode_seconds = fm_now() - t0;
    fm_free(logits);
    fm_sampler_free(smp);
    return st;
}

fm_status fm_model_decode_step(fm_model *m, const int32_t *tokens, int n, fm_sampler *s, int32_t *next) {
    const int V = m->c.vocab_size;
    if (!s) return fm_fail(FM_ERR_INVALID, "decode_step: no sampler given");
    if (fm_sampler_vocab_size(s) != V)
        return fm_fail(FM_ERR_INVALID, "decode_step: the sampler is for a vocabulary of %d, the model has %d",
                       fm_sampler_vocab_size(s), V);
    if (!m->step_logits && !(m->step_logits = (float *)fm_alloc((size_t)V * sizeof(float))))
        return fm_fail(FM_ERR_NOMEM, "decode_step: out of memory");
    const double t0 = fm_now();
    int32_t found = 0, *greedy = device_greedy(m, s) ? &found : NULL; /* else the logits, sampled here */
    fm_status st = forward(m, tokens, n, greedy ? NULL : m->step_logits, 0, greedy);
    if (st != FM_OK) return st;
    const int32_t tok = greedy ? found : fm_sampler_sample(s, m->step_logits);
    fm_sampler_accept(s, &tok, 1);
    *next = tok;
    const double dt = fm_now() - t0;
    if (n > 1) {
        m->last_prompt_tokens = n;
        m->last_prompt_seconds = dt;
        m->last_generated_tokens = 1;
        m->last_decode_seconds = 0.0;
    } else {
        m->last_generated_tokens++;
        m->last_decode_seconds += dt;
    }
    return FM_OK;
}

/* ---------------------------------------------------------------- snapshots */

struct fm_snapshot {
    fm_config c; /* what the state layout depends on, checked on restore */
    int ctx, pos;
    size_t bytes;
    uint8_t *data; /* per layer in order: K rows [0, pos) then V rows [0, pos), or conv state then S */
    int32_t *tokens; /* [pos] the tokens that state holds */
};

/* Bytes of the snapshot of m's state at position pos. */
static size_t snapshot_bytes(const fm_config *c, int pos) {
    size_t total = 0;
    for (int l = 0; l < c->num_hidden_layers; l++)
        total += c->layer_is_full_attention[l] ? 2 * kv_cache_bytes(c, pos) : conv_state_bytes(c) + recurrent_state_bytes(c);
    return total;
}

/* Copy the state between the model and buf (to_buf: snapshot, else restore). */
static void copy_state(fm_model *m, uint8_t *buf, int pos, int to_buf) {
    const fm_config *c = &m->c;
    size_t off = 0;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        fm_layer *L = &m->layers[l];
        void *parts[2] = {L->full_attention ? (void *)L->k_cache : (void *)L->conv_state,
                          L->full_attention ? (void *)L->v_cache : (void *)L->S};
        const size_t sizes[2] = {L->full_attention ? kv_cache_bytes(c, pos) : conv_state_bytes(c),
                                 L->full_attention ? kv_cache_bytes(c, pos) : recurrent_state_bytes(c)};
        for (int i = 0; i < 2; i++) {
            if (to_buf)
                FM_OP(&m->be, to_host, buf + off, parts[i], sizes[i]);
            else
                FM_OP(&m->be, from_host, parts[i], buf + off, sizes[i]);
            off += sizes[i];
        }
    }
}

fm_status fm_model_snapshot(const fm_model *m, fm_snapshot **out) {
    *out = NULL;
    fm_snapshot *s = (fm_snapshot *)calloc(1, sizeof *s);
    if (!s) return fm_fail(FM_ERR_NOMEM, "snapshot: out of memory");
    s->c = m->c;
    s->ctx = m->ctx;
    s->pos = m->pos;
    s->bytes = snapshot_bytes(&m->c, m->pos);
    s->data = (uint8_t *)fm_alloc(s->bytes);
    s->tokens = (int32_t *)malloc(sizeof(int32_t) * (size_t)(m->pos > 0 ? m->pos : 1));
    if (!s->data || !s->tokens) {
        fm_free(s->data);
        free(s->tokens);
        free(s);
        return fm_fail(FM_ERR_NOMEM, "snapshot: cannot allocate %zu bytes for the state at position %d",
                       snapshot_bytes(&m->c, m->pos), m->pos);
    }
    copy_state((fm_model *)m, s->data, s->pos, 1);
    const fm_status st = FM_OP(&m->be, finish); /* the copies' verdict (a GPU backend's) */
    if (st != FM_OK) {
        fm_snapshot_free(s);
        return st;
    }
    memcpy(s->tokens, m->seq, sizeof(int32_t) * (size_t)s->pos);
    *out = s;
    return FM_OK;
}

/* The config fields the state layout depends on must agree. */
static fm_status check_snapshot(const fm_model *m, const fm_snapshot *s) {
    const fm_config *a = &m->c, *b = &s->c;
#define SAME(f)                                                                                                \
    if (a->f != b->f)                                                                                          \
        return fm_fail(FM_ERR_INVALID, "restore: the snapshot is of a model with " #f " %d, this model has %d", \
                       (int)b->f, (int)a->f)
    SAME(arch); SAME(vocab_size); SAME(hidden_size); SAME(num_hidden_layers); SAME(num_attention_heads);
    SAME(num_key_value_heads); SAME(head_dim); SAME(linear_conv_kernel_dim); SAME(linear_key_head_dim);
    SAME(linear_value_head_dim); SAME(linear_num_key_heads); SAME(linear_num_value_heads); SAME(num_experts);
#undef SAME
    for (int l = 0; l < a->num_hidden_layers; l++)
        if (a->layer_is_full_attention[l] != b->layer_is_full_attention[l])
            return fm_fail(FM_ERR_INVALID, "restore: the snapshot's layer %d is of another kind than this model's", l);
    if (s->ctx != m->ctx)
        return fm_fail(FM_ERR_INVALID,
                       "restore: the snapshot is of a model loaded with context length %d, this one has %d", s->ctx,
                       m->ctx);
    if (s->pos < 0 || s->pos > m->ctx || s->bytes != snapshot_bytes(a, s->pos))
        return fm_fail(FM_ERR_INVALID, "restore: the snapshot is inconsistent (position %d, %zu bytes)", s->pos,
                       s->bytes);
    return FM_OK;
}

fm_status fm_model_restore(fm_model *m, const fm_snapshot *s) {
    if (!s) return fm_fail(FM_ERR_INVALID, "restore: no snapshot given");
    fm_status st = check_snapshot(m, s);
    if (st != FM_OK) return st;
    copy_state(m, s->data, s->pos, 0);
    if ((st = FM_OP(&m->be, finish)) != FM_OK) { /* a part of the state may not have arrived */
        fm_model_reset(m);
        return st;
    }
    memcpy(m->seq, s->tokens, sizeof(int32_t) * (size_t)s->pos);
    m->pos = s->pos;
    return FM_OK;
}

void fm_snapshot_free(fm_snapshot *s) {
    if (!s) return;
    fm_free(s->data);
    free(s->tokens);
    free(s);
}

size_t fm_snapshot_bytes(const fm_snapshot *s) { return s->bytes; }
int fm_snapshot_position(const fm_snapshot *s) { return s->pos; }
const int32_t *fm_snapshot_tokens(const fm_snapshot *s) { return s->tokens; }

void fm_model_stats(const fm_model *m, fm_stats *out) {
    memset(out, 0, sizeof *out);
    out->tokens = m->tokens;
    out->compute_seconds = m->compute_seconds;
    out->last_prompt_tokens = m->last_prompt_tokens;
    out->last_generated_tokens = m->last_generated_tokens;
    out->last_prompt_seconds = m->last_prompt_seconds;
    out->last_decode_seconds = m->last_decode_seconds;
    if (m->experts) {
        fm_store_counters c;
        fm_expert_store_counters(m->experts, &c);
        out->expert_hits = c.hits;
        out->expert_misses = c.misses;
        out->prefetches = c.prefetches;
        out->prefetch_hits = c.prefetch_hits;
        out->bytes_read = c.bytes_read;
        out->io_wait_seconds = c.io_wait_seconds;
        out->io_busy_seconds = c.io_busy_seconds;
        out->direct_io = c.direct_io;
    }
    uint64_t d[FM_DEVICE_STATS] = {0};
    if (m->be.op) FM_OP(&m->be, device_stats, d);
    out->device_expert_slots = d[0], out->device_expert_hits = d[1], out->device_expert_misses = d[2];
    out->device_bytes_in = d[3], out->device_step_replays = d[4], out->device_step_recordings = d[5];
    out->device_shared_folds = d[6], out->device_host_experts = d[9], out->device_prompt_layers = d[10];
    out->device_launch_seconds = (double)d[7] * 1e-9, out->device_wait_seconds = (double)d[8] * 1e-9;
}

void fm_model_expert_usage(const fm_model *m, uint64_t *out) {
    memcpy(out, m->usage, sizeof(uint64_t) * (size_t)m->c.num_hidden_layers * (size_t)m->c.num_experts);
}

void fm_model_memory(const fm_model *m, fm_memory *out) { *out = m->mem; }
