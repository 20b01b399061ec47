/*
 * blocks.c — the layers shared by Qwen3.5-MoE and Qwen3-Next: Gated DeltaNet, gated attention, the
 * sparse MoE block with its shared expert, and the dense MLP. Each architecture file composes them.
 * HF references: transformers/models/qwen3_5_moe/modeling_qwen3_5_moe.py.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "model.h"
#include "threads.h"
#include "util.h"

/* ---------------------------------------------------------------- binding */

fm_status fm_bind_deltanet(fm_model *m, const fm_load_spec *spec, int l, fm_deltanet_w *w) {
    const fm_config *c = &m->c;
    const int H = c->hidden_size, Hk = c->linear_num_key_heads, Hv = c->linear_num_value_heads;
    const int dk = c->linear_key_head_dim, dv = c->linear_value_head_dim;
    const int conv_dim = 2 * Hk * dk + Hv * dv;
    const char *p = "layers.%d.linear_attn.%s";
    fm_status st;
    if ((st = fm_bind_mat(m, spec, &w->in_proj_qkv, conv_dim, H, p, l, "in_proj_qkv.weight"))) return st;
    if ((st = fm_bind_mat(m, spec, &w->in_proj_z, Hv * dv, H, p, l, "in_proj_z.weight"))) return st;
    if ((st = fm_bind_mat(m, spec, &w->in_proj_b, Hv, H, p, l, "in_proj_b.weight"))) return st;
    if ((st = fm_bind_mat(m, spec, &w->in_proj_a, Hv, H, p, l, "in_proj_a.weight"))) return st;
    if ((st = fm_bind_f32(m, spec, &w->conv1d, conv_dim, c->linear_conv_kernel_dim, p, l, "conv1d.weight"))) return st;
    if ((st = fm_bind_f32(m, spec, &w->dt_bias, Hv, 0, p, l, "dt_bias"))) return st;
    if ((st = fm_bind_f32(m, spec, &w->A_log, Hv, 0, p, l, "A_log"))) return st;
    if ((st = fm_bind_f32(m, spec, &w->norm, dv, 0, p, l, "norm.weight"))) return st;
    return fm_bind_mat(m, spec, &w->out_proj, H, Hv * dv, p, l, "out_proj.weight");
}

fm_status fm_bind_attention(fm_model *m, const fm_load_spec *spec, int l, fm_attention_w *w) {
    const fm_config *c = &m->c;
    const int H = c->hidden_size, nh = c->num_attention_heads, nkv = c->num_key_value_heads, hd = c->head_dim;
    const char *p = "layers.%d.self_attn.%s";
    fm_status st;
    if ((st = fm_bind_mat(m, spec, &w->q_proj, nh * hd * 2, H, p, l, "q_proj.weight"))) return st;
    if ((st = fm_bind_mat(m, spec, &w->k_proj, nkv * hd, H, p, l, "k_proj.weight"))) return st;
    if ((st = fm_bind_mat(m, spec, &w->v_proj, nkv * hd, H, p, l, "v_proj.weight"))) return st;
    if ((st = fm_bind_mat(m, spec, &w->o_proj, H, nh * hd, p, l, "o_proj.weight"))) return st;
    if ((st = fm_bind_f32(m, spec, &w->q_norm, hd, 0, p, l, "q_norm.weight"))) return st;
    return fm_bind_f32(m, spec, &w->k_norm, hd, 0, p, l, "k_norm.weight");
}

fm_status fm_bind_mlp(fm_model *m, const fm_load_spec *spec, fm_mlp_w *w, int inter, const char *prefix) {
    const int H = m->c.hidden_size;
    fm_status st;
    if ((st = fm_bind_mat(m, spec, &w->gate_proj, inter, H, "%s.gate_proj.weight", prefix))) return st;
    if ((st = fm_bind_mat(m, spec, &w->up_proj, inter, H, "%s.up_proj.weight", prefix))) return st;
    return fm_bind_mat(m, spec, &w->down_proj, H, inter, "%s.down_proj.weight", prefix);
}

fm_status fm_bind_moe(fm_model *m, const fm_load_spec *spec, int l, fm_moe_w *w) {
    const fm_config *c = &m->c;
    char prefix[64];
    fm_status st;
    if ((st = fm_bind_mat(m, spec, &w->router, c->num_experts, c->hidden_size, "layers.%d.mlp.gate.weight", l)))
        return st;
    if ((st = fm_bind_mat(m, spec, &w->shared_gate, 1, c->hidden_size, "layers.%d.mlp.shared_expert_gate.weight", l)))
        return st;
    /* Routing picks experts from near-tied scores: keep its activations in fp32 even when the router is
     * quantized (an MLX import's 8-bit router) and int8 activations are on for everything else. */
    w->router.int8_act = w->shared_gate.int8_act = 0;
    snprintf(prefix, sizeof prefix, "layers.%d.mlp.shared_expert", l);
    return fm_bind_mlp(m, spec, &w->shared, c->shared_expert_intermediate_size, prefix);
}

/* ---------------------------------------------------------------- Gated DeltaNet */

void fm_block_deltanet(fm_model *m, fm_layer *L, const float *xn, float *out, int T) {
    const fm_config *c = &m->c;
    const fm_deltanet_w *w = &L->lin;
    fm_scratch *s = &m->s;
    const int Hk = c->linear_num_key_heads, Hv = c->linear_num_value_heads;
    const int dk = c->linear_key_head_dim, dv = c->linear_value_head_dim, K = c->linear_conv_kernel_dim;
    const int key_dim = Hk * dk, conv_dim = 2 * key_dim + Hv * dv;

    fm_op_matmul(&w->in_proj_qkv, xn, T, s->qkv); /* [T, conv_dim] */
    fm_op_matmul(&w->in_proj_z, xn, T, s->z);     /* [T, Hv·dv] */
    fm_op_matmul(&w->in_proj_b, xn, T, s->b);     /* [T, Hv] */
    fm_op_matmul(&w->in_proj_a, xn, T, s->a);     /* [T, Hv] */

    /* causal depthwise conv + SiLU over [q|k|v]; the state keeps the last K-1 pre-conv rows */
    fm_op_conv1d_silu(s->conv, s->qkv, L->conv_state, w->conv1d, T, conv_dim, K);

    /* split into q [T, Hk, dk], k [T, Hk, dk], v [T, Hv, dv] (reusing q/k/v scratch, contiguous) */
    float *q = s->qkv, *k = s->qkv + (size_t)T * key_dim, *v = s->qkv + (size_t)2 * T * key_dim;
    for (int t = 0; t < T; t++) {
        const float *row = s->conv + (size_t)t * conv_dim;
        memcpy(q + (size_t)t * key_dim, row, sizeof(float) * key_dim);
        memcpy(k + (size_t)t * key_dim, row + key_dim, sizeof(float) * key_dim);
        memcpy(v + (size_t)t * Hv * dv, row + 2 * key_dim, sizeof(float) * (size_t)Hv * dv);
    }
    /* HF: l2norm(q) / sqrt(dk), l2norm(k), eps 1e-6 inside the rsqrt */
    fm_op_l2norm(q, T * Hk, dk, 1e-6f, 1.0f / sqrtf((float)dk));
    fm_op_l2norm(k, T * Hk, dk, 1e-6f, 1.0f);

    /* beta = sigmoid(b); g = -exp(A_log) * softplus(a + dt_bias), in place over b and a */
    for (int t = 0; t < T; t++)
        for (int h = 0; h < Hv; h++) {
            const size_t i = (size_t)t * Hv + h;
            s->b[i] = fm_sigmoid(s->b[i]);
            s->a[i] = -expf(w->A_log[h]) * fm_softplus(s->a[i] + w->dt_bias[h]);
        }

    /* [T, Hv, dv]. Prefill: the chunked form, faster from 2 tokens on, best in chunks of 16 on AVX2
     * (bench/RESULTS.md, 2026-11-28); decode (T = 1): the recurrent form. */
    if (T >= 2)
        fm_op_gated_delta_chunk(s->core, L->S, q, k, v, s->a, s->b, T, Hk, Hv, dk, dv, 16);
    else
        fm_op_gated_delta(s->core, L->S, q, k, v, s->a, s->b, T, Hk, Hv, dk, dv);

    /* per value head: rmsnorm(o) * w * silu(z) */
    fm_op_rmsnorm(s->core, s->core, w->norm, T * Hv, dv, c->rms_norm_eps, 0);
    fm_op_silu_mul(s->core, s->z, s->core, T, Hv * dv);
    fm_op_matmul(&w->out_proj, s->core, T, out); /* [T, H] */
}

/* ---------------------------------------------------------------- gated attention */

void fm_block_attention(fm_model *m, fm_layer *L, const float *xn, float *out, int T, int pos0) {
    const fm_config *c = &m->c;
    const fm_attention_w *w = &L->attn;
    fm_scratch *s = &m->s;
    const int nh = c->num_attention_heads, nkv = c->num_key_value_heads, hd = c->head_dim;
    const int rot = (int)(hd * c->partial_rotary_factor);

    fm_op_matmul(&w->q_proj, xn, T, s->q2); /* [T, nh, 2·hd] */
    fm_op_matmul(&w->k_proj, xn, T, s->k);  /* [T, nkv, hd] */
    fm_op_matmul(&w->v_proj, xn, T, s->v);  /* [T, nkv, hd] */
    for (int t = 0; t < T; t++)
        for (int h = 0; h < nh; h++) {
            const float *src = s->q2 + ((size_t)t * nh + h) * 2 * hd;
            memcpy(s->q + ((size_t)t * nh + h) * hd, src, sizeof(float) * hd);
            memcpy(s->gate + ((size_t)t * nh + h) * hd, src + hd, sizeof(float) * hd);
        }
    fm_op_rmsnorm(s->q, s->q, w->q_norm, T * nh, hd, c->rms_norm_eps, 1);
    fm_op_rmsnorm(s->k, s->k, w->k_norm, T * nkv, hd, c->rms_norm_eps, 1);
    fm_op_rope(s->q, T, nh, hd, rot, pos0, c->rope_theta);
    fm_op_rope(s->k, T, nkv, hd, rot, pos0, c->rope_theta);

    const size_t kv = (size_t)nkv * hd;
    memcpy(L->k_cache + (size_t)pos0 * kv, s->k, sizeof(float) * T * kv);
    memcpy(L->v_cache + (size_t)pos0 * kv, s->v, sizeof(float) * T * kv);
    fm_op_attention(s->att, s->q, L->k_cache, L->v_cache, T, pos0, nh, nkv, hd, 1.0f / sqrtf((float)hd));

    /* HF: attn_output * sigmoid(gate), then o_proj */
    fm_op_sigmoid_mul(s->att, s->gate, s->att, T, nh * hd);
    fm_op_matmul(&w->o_proj, s->att, T, out); /* [T, H] */
}

/* ---------------------------------------------------------------- MLP and MoE */

/* out[T, H] = down(silu(gate x) * up x) */
static void mlp(fm_scratch *s, const fm_mat *gate, const fm_mat *up, const fm_mat *down, const float *x, float *out,
                int T) {
    fm_op_matmul(gate, x, T, s->h1);
    fm_op_matmul(up, x, T, s->h2);
    fm_op_silu_mul(s->h1, s->h1, s->h2, T, gate->rows);
    fm_op_matmul(down, s->h1, T, out);
}

void fm_block_mlp(fm_model *m, const fm_mlp_w *w, const float *xn, float *out, int T) {
    mlp(&m->s, &w->gate_proj, &w->up_proj, &w->down_proj, xn, out, T);
}

/* Experts the next MoE layer's router would pick for these tokens (its input approximated by this
 * layer's), so the store protects them from eviction and reads them ahead while this layer computes. */
static void predict_next(fm_model *m, int next, const float *xn, int T) {
    const fm_config *c = &m->c;
    fm_scratch *s = &m->s;
    const int E = c->num_experts, k = c->num_experts_per_tok;
    fm_op_matmul(&m->layers[next].moe_w.router, xn, T, s->logits); /* [T, E] */
    memset(s->mark, 0, sizeof(int32_t) * (size_t)E);
    int n = 0;
    for (int t = 0; t < T; t++) {
        fm_op_topk_softmax(s->logits + (size_t)t * E, E, k, 0, s->ptopk, s->pw);
        for (int j = 0; j < k; j++)
            if (!s->mark[s->ptopk[j]]++) s->pred[n++] = s->ptopk[j];
    }
    s->n_pred = n;
    fm_expert_store_predict(m->experts, next, s->pred, n);
}

static inline int expert_tokens(const fm_scratch *s, int e) { return s->eoff[e + 1] - s->eoff[e]; }

/* Expert e on its n tokens (rows eoff[e] .. of ye): gather them from xn into xe [n, H] (one token is
 * read in place), then ye rows = down(silu(gate x) * up x) with h1, h2 [n, I]. */
static void expert_mlp(fm_model *m, const fm_expert *ex, const float *xn, int e, float *xe, float *h1, float *h2) {
    fm_scratch *s = &m->s;
    const size_t H = m->c.hidden_size;
    const int r0 = s->eoff[e], n = expert_tokens(s, e);
    const float *x = xn + (size_t)s->tok[r0] * H;
    if (n > 1) {
        for (int r = 0; r < n; r++) memcpy(xe + (size_t)r * H, xn + (size_t)s->tok[r0 + r] * H, sizeof(float) * H);
        x = xe;
    }
    fm_op_matmul(&ex->gate, x, n, h1);
    fm_op_matmul(&ex->up, x, n, h2);
    fm_op_silu_mul(h1, h1, h2, n, ex->gate.rows);
    fm_op_matmul(&ex->down, h1, n, s->ye + (size_t)r0 * H);
}

/* Experts computed side by side, one per pool task, each on the lane of scratch of the thread running
 * it (its matmuls then run on that thread alone): a decode step's experts, and most of a prefill chunk's
 * (~C·k/E tokens each), are too small to split over the threads for a barrier per matmul. Each result
 * lands in its own ye rows, so it is the same as computing the experts one after the other. */
typedef struct {
    fm_model *m;
    const float *xn;
    const int *slots, *experts;
} expert_batch;

static void expert_task(void *ctx, int j) {
    const expert_batch *B = (const expert_batch *)ctx;
    fm_model *m = B->m;
    const size_t H = m->c.hidden_size, I = m->c.moe_intermediate_size, tokens = m->lane_tokens;
    float *xe = m->s.lanes + (size_t)fm_thread_index() * m->lane_floats;
    fm_expert ex;
    fm_expert_store_view(m->experts, B->slots[j], &ex);
    expert_mlp(m, &ex, B->xn, B->experts[j], xe, xe + tokens * H, xe + tokens * (H + I));
}

fm_status fm_block_moe(fm_model *m, int layer, const fm_moe_w *w, const float *xn, float *out, int T, int norm_topk) {
    const fm_config *c = &m->c;
    fm_scratch *s = &m->s;
    const int H = c->hidden_size, E = c->num_experts, k = c->num_experts_per_tok;
    fm_expert_store *store = m->experts;

    /* router: softmax over all experts in fp32, top-k, optionally renormalised */
    fm_op_matmul(&w->router, xn, T, s->logits); /* [T, E] */
    for (int t = 0; t < T; t++)
        fm_op_topk_softmax(s->logits + (size_t)t * E, E, k, norm_topk, s->topk + (size_t)t * k, s->topw + (size_t)t * k);

    /* group the T·k choices by expert (counting sort): expert e owns rows eoff[e] .. eoff[e+1] of ye */
    memset(s->ecount, 0, sizeof(int32_t) * (size_t)(E + 1));
    for (int i = 0; i < T * k; i++) s->ecount[s->topk[i]]++;
    int n_need = 0;
    s->eoff[0] = 0;
    for (int e = 0; e < E; e++) {
        s->eoff[e + 1] = s->eoff[e] + s->ecount[e];
        if (s->ecount[e]) s->need[n_need++] = e;
        m->usage[(size_t)layer * E + e] += (uint64_t)s->ecount[e];
    }
    memset(s->ecount, 0, sizeof(int32_t) * (size_t)E);
    for (int i = 0; i < T * k; i++) {
        const int e = s->topk[i], r = s->eoff[e] + s->ecount[e]++;
        s->tok[r] = i / k;
        s->row[i] = r;
    }

    /* issue the reads now: every expert that fits a slot is pinned (hit) or queued (miss) */
    int n_held = 0, next = 0, done = 0;
    for (; next < n_need; next++) {
        const int slot = fm_expert_store_acquire(store, layer, s->need[next]);
        if (slot == FM_SLOT_NONE) break;
        s->held[n_held] = slot;
        s->held_e[n_held++] = s->need[next];
    }
    /* Predict the next layer's experts for the store to read ahead, unless it holds all of them already
     * (everything in RAM once warm: the prediction would only cost a router matvec per layer). */
    const int next_moe = m->layers[layer].next_moe;
    const int n_pred_ok = next_moe >= 0 && m->prefetch && !fm_expert_store_layer_resident(store, next_moe);
    if (n_pred_ok) predict_next(m, next_moe, xn, T);

    /* shared expert while the reads land, scaled by sigmoid(shared_expert_gate · x) */
    fm_op_matmul(&w->shared_gate, xn, T, s->sg); /* [T, 1] */
    fm_block_mlp(m, &w->shared, xn, out, T);
    for (int t = 0; t < T; t++) {
        const float g = fm_sigmoid(s->sg[t]);
        for (int i = 0; i < H; i++) out[(size_t)t * H + i] *= g;
    }

    /* routed experts, each computed as it arrives on all of its tokens: ye rows [n, H]. The small ones
     * already in memory go side by side, one per thread, biggest first so the last to finish is short;
     * the rest, one at a time split over the pool. */
    const int threads = fm_threads_get(), batch_ok = threads > 1 && threads <= m->lanes;
    while (done < n_need) {
        int i;
        const int n_polled = batch_ok ? fm_expert_store_poll(store, s->held, n_held, s->ready) : 0;
        int n_ready = 0; /* ready[] keeps the polled held indices (ascending) of the small experts */
        for (int j = 0; j < n_polled; j++)
            if (expert_tokens(s, s->held_e[s->ready[j]]) <= m->lane_tokens) s->ready[n_ready++] = s->ready[j];
        if (n_ready >= 2) {
            for (int j = 0; j < n_ready; j++) { /* insertion sort by tokens, descending */
                const int slot = s->held[s->ready[j]], e = s->held_e[s->ready[j]], n = expert_tokens(s, e);
                int at = j;
                for (; at > 0 && expert_tokens(s, s->batch_e[at - 1]) < n; at--) {
                    s->batch_slot[at] = s->batch_slot[at - 1];
                    s->batch_e[at] = s->batch_e[at - 1];
                }
                s->batch_slot[at] = slot;
                s->batch_e[at] = e;
            }
            expert_batch B = {m, xn, s->batch_slot, s->batch_e};
            fm_parallel_for(n_ready, expert_task, &B);
            for (int j = n_ready - 1; j >= 0; j--) { /* highest index first, so removal keeps the rest */
                const int at = s->ready[j];
                fm_expert_store_release(store, s->held[at]);
                s->held[at] = s->held[--n_held];
                s->held_e[at] = s->held_e[n_held];
            }
            done += n_ready;
            for (; next < n_need; next++) {
                const int slot = fm_expert_store_acquire(store, layer, s->need[next]);
                if (slot == FM_SLOT_NONE) break;
                s->held[n_held] = slot;
                s->held_e[n_held++] = s->need[next];
            }
            continue;
        }
        /* n_held == 0 cannot happen: acquire only fails when the caller pins every slot */
        fm_status st = n_held ? fm_expert_store_wait_any(store, s->held, n_held, &i)
                              : fm_fail(FM_ERR_NOMEM, "layer %d: no expert slot could be freed", layer);
        if (st != FM_OK) {
            for (int j = 0; j < n_held; j++) fm_expert_store_release(store, s->held[j]);
            return st;
        }
        fm_expert ex;
        fm_expert_store_view(store, s->held[i], &ex);
        expert_mlp(m, &ex, xn, s->held_e[i], s->xe, s->h1, s->h2);
        fm_expert_store_release(store, s->held[i]);
        s->held[i] = s->held[--n_held];
        s->held_e[i] = s->held_e[n_held];
        done++;
        for (; next < n_need; next++) { /* a slot is free again: the experts that did not fit */
            const int slot = fm_expert_store_acquire(store, layer, s->need[next]);
            if (slot == FM_SLOT_NONE) break;
            s->held[n_held] = slot;
            s->held_e[n_held++] = s->need[next];
        }
    }

    /* A chunk's experts pinned every slot while the prediction above was made, so it could read little
     * ahead; now that they are released, read the next layer's predicted experts into the freed slots
     * while the next layer's attention or DeltaNet computes. (Decode leaves slots free the first time.) */
    if (n_pred_ok && T > 1) fm_expert_store_predict(store, next_moe, s->pred, s->n_pred);

    /* weighted sum in a fixed order (token, choice), whatever order the reads arrived in, so the
     * result does not depend on the budget, the policy or the disk */
    for (int t = 0; t < T; t++)
        for (int j = 0; j < k; j++) {
            const float wt = s->topw[(size_t)t * k + j];
            const float *y = s->ye + (size_t)s->row[t * k + j] * H;
            float *o = out + (size_t)t * H;
            for (int i = 0; i < H; i++) o[i] += wt * y[i];
        }
    return FM_OK;
}
