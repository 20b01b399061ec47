/*
 * blocks.c — the layers shared by Qwen3.5-MoE and Qwen3-Next: Gated DeltaNet, gated attention, the
 * sparse MoE block with its shared expert, and the dense MLP. Each architecture file composes them.
 * HF references: transformers/models/qwen3_5_moe/modeling_qwen3_5_moe.py.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "model.h"
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

void fm_block_deltanet(fm_model *m, fm_layer *L, const float *xn, float *out, int T, int pos0) {
    const fm_config *c = &m->c;
    const fm_deltanet_w *w = &L->lin;
    fm_scratch *s = &m->s;
    const int Hk = c->linear_num_key_heads, Hv = c->linear_num_value_heads;
    const int dk = c->linear_key_head_dim, dv = c->linear_value_head_dim, K = c->linear_conv_kernel_dim;
    const int key_dim = Hk * dk, conv_dim = 2 * key_dim + Hv * dv;

    const fm_backend *be = &m->be;
    FM_OP(be, matmul, &w->in_proj_qkv, xn, T, s->qkv); /* [T, conv_dim] */
    FM_OP(be, matmul, &w->in_proj_z, xn, T, s->z);     /* [T, Hv·dv] */
    FM_OP(be, matmul, &w->in_proj_b, xn, T, s->b);     /* [T, Hv] */
    FM_OP(be, matmul, &w->in_proj_a, xn, T, s->a);     /* [T, Hv] */

    /* causal depthwise conv + SiLU over [q|k|v]; the state keeps the last K-1 pre-conv rows */
    FM_OP(be, conv1d_silu, s->conv, s->qkv, L->conv_state, w->conv1d, T, conv_dim, K);

    /* split into q [T, Hk, dk], k [T, Hk, dk], v [T, Hv, dv] (reusing the pre-conv scratch, contiguous) */
    float *q = s->qkv, *k = s->qkv + (size_t)T * key_dim, *v = s->qkv + (size_t)2 * T * key_dim;
    FM_OP(be, deltanet_split, q, k, v, s->conv, T, key_dim, Hv * dv);
    /* HF: l2norm(q) / sqrt(dk), l2norm(k), eps 1e-6 inside the rsqrt */
    FM_OP(be, l2norm, q, T * Hk, dk, 1e-6f, 1.0f / sqrtf((float)dk));
    FM_OP(be, l2norm, k, T * Hk, dk, 1e-6f, 1.0f);

    /* beta = sigmoid(b); g = -exp(A_log) * softplus(a + dt_bias), in place over b and a */
    FM_OP(be, deltanet_gates, s->b, s->a, w->A_log, w->dt_bias, T, Hv);
    FM_OP(be, gated_delta, s->core, L->S, q, k, v, s->a, s->b, T, pos0, Hk, Hv, dk, dv); /* [T, Hv, dv] */

    /* per value head: rmsnorm(o) * w * silu(z) */
    FM_OP(be, rmsnorm, s->core, s->core, w->norm, T * Hv, dv, c->rms_norm_eps, 0);
    FM_OP(be, silu_mul, s->core, s->z, s->core, T, Hv * dv);
    FM_OP(be, matmul, &w->out_proj, s->core, T, out); /* [T, H] */
}

/* ---------------------------------------------------------------- gated attention */

void fm_block_attention(fm_model *m, fm_layer *L, const float *xn, float *out, int T, int pos0) {
    const fm_config *c = &m->c;
    const fm_attention_w *w = &L->attn;
    fm_scratch *s = &m->s;
    const int nh = c->num_attention_heads, nkv = c->num_key_value_heads, hd = c->head_dim;
    const int rot = (int)(hd * c->partial_rotary_factor);

    const fm_backend *be = &m->be;
    FM_OP(be, matmul, &w->q_proj, xn, T, s->q2); /* [T, nh, 2·hd] */
    FM_OP(be, matmul, &w->k_proj, xn, T, s->k);  /* [T, nkv, hd] */
    FM_OP(be, matmul, &w->v_proj, xn, T, s->v);  /* [T, nkv, hd] */
    FM_OP(be, split_q_gate, s->q, s->gate, s->q2, T, nh, hd);
    FM_OP(be, rmsnorm, s->q, s->q, w->q_norm, T * nh, hd, c->rms_norm_eps, 1);
    FM_OP(be, rmsnorm, s->k, s->k, w->k_norm, T * nkv, hd, c->rms_norm_eps, 1);
    FM_OP(be, rope, s->q, T, nh, hd, rot, pos0, c->rope_theta);
    FM_OP(be, rope, s->k, T, nkv, hd, rot, pos0, c->rope_theta);

    FM_OP(be, kv_write, L->k_cache, s->k, pos0, T, nkv * hd);
    FM_OP(be, kv_write, L->v_cache, s->v, pos0, T, nkv * hd);
    FM_OP(be, attention, s->att, s->q, L->k_cache, L->v_cache, T, pos0, nh, nkv, hd, 1.0f / sqrtf((float)hd));

    /* HF: attn_output * sigmoid(gate), then o_proj */
    FM_OP(be, sigmoid_mul, s->att, s->gate, s->att, T, nh * hd);
    FM_OP(be, matmul, &w->o_proj, s->att, T, out); /* [T, H] */
}

/* ---------------------------------------------------------------- MLP and MoE */

/* out[T, H] = down(silu(gate x) * up x), a chunk of tokens at a time (h1, h2 hold C) */
void fm_block_mlp(fm_model *m, const fm_mlp_w *w, const float *xn, float *out, int T) {
    const fm_backend *be = &m->be;
    fm_scratch *s = &m->s;
    const size_t H = (size_t)m->c.hidden_size;
    for (int t0 = 0, n; t0 < T; t0 += n) {
        n = T - t0 < m->chunk ? T - t0 : m->chunk;
        FM_OP(be, matmul, &w->gate_proj, xn + t0 * H, n, s->h1);
        FM_OP(be, matmul, &w->up_proj, xn + t0 * H, n, s->h2);
        FM_OP(be, silu_mul, s->h1, s->h1, s->h2, n, w->gate_proj.rows);
        FM_OP(be, matmul, &w->down_proj, s->h1, n, out + t0 * H);
    }
}

/* Experts the next MoE layer's router would pick for these tokens (its input approximated by this
 * layer's), so the store protects them from eviction and reads them ahead while this layer computes. */
static void predict_next(fm_model *m, int next, const float *xn, int T) {
    const fm_config *c = &m->c;
    fm_scratch *s = &m->s;
    const int E = c->num_experts, k = c->num_experts_per_tok;
    FM_OP(&m->be, matmul, &m->layers[next].moe_w.router, xn, T, s->logits); /* [T, E] */
    FM_OP(&m->be, route, s->logits, T, E, k, 0, s->ptopk, s->pw);           /* [T, k] on the host */
    memset(s->mark, 0, sizeof(int32_t) * (size_t)E);
    int n = 0;
    for (int i = 0; i < T * k; i++)
        if (!s->mark[s->ptopk[i]]++) s->pred[n++] = s->ptopk[i];
    s->n_pred = n;
    fm_expert_store_predict(m->experts, next, s->pred, n);
}

/* Group the T·k routing choices by expert (counting sort): expert e owns rows eoff[e] .. eoff[e+1] of ye,
 * row[t·k + j] is the row of choice (t, j), tok[r] the token of row r; need[] lists the experts used. */
static int group_by_expert(fm_model *m, int layer, int T) {
    fm_scratch *s = &m->s;
    const int E = m->c.num_experts, k = m->c.num_experts_per_tok;
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
    return n_need;
}

/* need[] with the experts that have a slot first (in order, then the others in order): pinning them
 * before any miss evicts means a layer whose experts do not all fit never evicts one of its own that was
 * read ahead for it (a prompt's read 1.19x over at the minimum budget with prefetch, before). The order
 * changes no result: each expert writes its own rows of ye. */
static void hits_first(fm_model *m, int layer, int n_need) {
    fm_scratch *s = &m->s;
    int n_hit = 0, n_miss = 0;
    for (int i = 0; i < n_need; i++) {
        const int e = s->need[i];
        if (fm_expert_store_has(m->experts, layer, e))
            s->need[n_hit++] = e;
        else
            s->ready[n_miss++] = e; /* ready[] is free until the compute loop */
    }
    memcpy(s->need + n_hit, s->ready, sizeof(int32_t) * (size_t)n_miss);
}

/* Pin (hit) or queue the read of (miss) the next experts of need[] while slots are free. */
static void acquire_more(fm_model *m, int layer, int n_need, int *next, int *n_held) {
    fm_scratch *s = &m->s;
    for (; *next < n_need; (*next)++) {
        const int slot = fm_expert_store_acquire(m->experts, layer, s->need[*next]);
        if (slot == FM_SLOT_NONE) break;
        s->held[*n_held] = slot;
        s->held_e[(*n_held)++] = s->need[*next];
    }
}

/* The backend's work item for held expert i (its slot's views and its token rows). */
static fm_expert_work expert_work(fm_model *m, int layer, int i) {
    fm_scratch *s = &m->s;
    const int e = s->held_e[i];
    fm_expert *v = &s->views[i];
    fm_expert_store_view(m->experts, s->held[i], v);
    return (fm_expert_work){&v->gate, &v->up, &v->down, s->tok + s->eoff[e], s->eoff[e + 1] - s->eoff[e], s->eoff[e],
                            layer * m->c.num_experts + e};
}

/* The shared expert into out, scaled by sigmoid(shared_expert_gate · x). */
static void shared_expert(fm_model *m, const fm_moe_w *w, const float *xn, float *out, int T) {
    FM_OP(&m->be, matmul, &w->shared_gate, xn, T, m->s.sg); /* [T, 1] */
    fm_block_mlp(m, &w->shared, xn, out, T);
    FM_OP(&m->be, gate_rows, out, m->s.sg, T, m->c.hidden_size);
}

/* The sparse MoE block. The core schedules (routing on the host, which experts, which slots, which
 * reads, the next layer's prediction); the backend computes (router, shared expert, each routed expert's
 * FFN as its read lands, the weighted combine). */
fm_status fm_block_moe(fm_model *m, int layer, const fm_moe_w *w, const float *xn, float *out, int T, int norm_topk) {
    const fm_config *c = &m->c;
    const fm_backend *be = &m->be;
    fm_scratch *s = &m->s;
    const int H = c->hidden_size, E = c->num_experts, k = c->num_experts_per_tok;
    fm_expert_store *store = m->experts;

    /* router: softmax over all experts in fp32, top-k, optionally renormalised; the choices come to the host */
    FM_OP(be, matmul, &w->router, xn, T, s->logits); /* [T, E] */
    /* where the backend holds all of the layer's experts itself, it routes and computes them with no round trip
     * to the host (decode, and prompts where it can; the choices are counted once the segment has finished:
     * fm_count_device_choices), and may fold the shared expert into them (2: out is the layer's output) */
    if (be->op->moe_device) {
        const fm_shared_expert sh = {&w->shared.gate_proj, &w->shared.up_proj, &w->shared.down_proj, &w->shared_gate};
        const int routed = FM_OP(be, moe_device, layer, s->logits, T, E, k, norm_topk, xn, s->ye, H,
                                 m->dev_idx + (size_t)layer * m->segment * k, &sh, out);
        if (routed) {
            m->dev_routed[layer] = T;
            if (routed == 1) {
                shared_expert(m, w, xn, out, T);
                FM_OP(be, moe_combine, out, s->ye, NULL, NULL, T, k, H);
            }
            return FM_OK;
        }
    }
    /* a prompt's shared expert issued while its choices come to the host, where the backend can (CUDA) */
    const int early = T > FM_DEVICE_ROUTE_T && be->op->route_begin &&
                      FM_OP(be, route_begin, s->logits, T, E, k, norm_topk);
    if (early) shared_expert(m, w, xn, out, T);
    FM_OP(be, route, s->logits, T, E, k, norm_topk, s->topk, s->topw);
    const int n_need = group_by_expert(m, layer, T);
    hits_first(m, layer, n_need);

    /* issue the reads now: every expert that fits a slot is pinned (hit) or queued (miss) */
    int n_held = 0, next = 0, done = 0;
    acquire_more(m, layer, n_need, &next, &n_held);
    /* Predict the next layer's experts for the store to read ahead, unless it holds all of them already
     * (everything in RAM once warm: the prediction would only cost a router matvec per layer). */
    const int next_moe = m->layers[layer].next_moe;
    const int n_pred_ok = next_moe >= 0 && m->prefetch && !fm_expert_store_layer_resident(store, next_moe);
    if (n_pred_ok) predict_next(m, next_moe, xn, T);

    if (!early) shared_expert(m, w, xn, out, T); /* while the reads land */

    /* routed experts, each computed as its read lands, on all of its tokens: the ones already in memory
     * together (the backend may run them side by side), else the first to arrive */
    while (done < n_need) {
        int n_ready = fm_expert_store_poll(store, s->held, n_held, s->ready);
        if (n_ready == 0) {
            /* n_held == 0 cannot happen: acquire only fails when the caller pins every slot */
            int i = 0;
            fm_status st = n_held ? fm_expert_store_wait_any(store, s->held, n_held, &i)
                                  : fm_fail(FM_ERR_NOMEM, "layer %d: no expert slot could be freed", layer);
            if (st != FM_OK) {
                for (int j = 0; j < n_held; j++) fm_expert_store_release(store, s->held[j], FM_OP(be, record));
                return st;
            }
            s->ready[n_ready++] = i;
        }
        for (int j = 0; j < n_ready; j++) s->work[j] = expert_work(m, layer, s->ready[j]);
        FM_OP(be, experts, s->work, n_ready, xn, s->ye, H);
        const fm_event computed = FM_OP(be, record); /* a new read into these slots waits for it */
        for (int j = n_ready - 1; j >= 0; j--) { /* ready[] ascends: highest index first keeps the rest */
            const int at = s->ready[j];
            fm_expert_store_release(store, s->held[at], computed);
            s->held[at] = s->held[--n_held];
            s->held_e[at] = s->held_e[n_held];
        }
        done += n_ready;
        acquire_more(m, layer, n_need, &next, &n_held); /* slots are free again: the experts that did not fit */
    }

    /* A prompt's experts pinned every slot while the prediction above was made, so it could read little
     * ahead; now that they are released, read the next layer's predicted experts into the freed slots
     * while the next layer's attention or DeltaNet computes. (Decode leaves slots free the first time.) */
    if (n_pred_ok && T > 1) fm_expert_store_predict(store, next_moe, s->pred, s->n_pred);

    /* weighted sum in a fixed order (token, choice), whatever order the reads arrived in, so the
     * result does not depend on the budget, the policy or the disk */
    FM_OP(be, moe_combine, out, s->ye, s->row, s->topw, T, k, H);
    return FM_OK;
}

/* Every routed expert into the backend's own cache at load, where it will hold them all (backend.h
 * experts_preload): read through the expert store a batch of its slots at a time (all of them but one, at most
 * E), handed over, released. Without it a layer routes on the host until each of its experts has been used once,
 * which on a real model (rarely chosen experts) can be never. */
fm_status fm_preload_device_experts(fm_model *m) {
    if (!m->experts || !m->be.op->experts_preload) return FM_OK;
    fm_scratch *s = &m->s;
    const int E = m->c.num_experts, slots = m->mem.expert_slots;
    const int batch = slots > 1 ? (slots - 1 < E ? slots - 1 : E) : 1;
    int offered = 1;
    for (int l = 0; offered && l < m->c.num_hidden_layers; l++) {
        if (!m->layers[l].moe) continue;
        for (int e0 = 0, n = 0; offered && e0 < E; e0 += n) { /* experts e0 .. e0 + n - 1 */
            for (n = 0; n < batch && e0 + n < E; n++)
                if ((s->held[n] = fm_expert_store_acquire(m->experts, l, e0 + n)) == FM_SLOT_NONE) break;
            fm_status st = n ? FM_OK : fm_fail(FM_ERR_NOMEM, "preloading layer %d's experts: no slot", l);
            for (int i = 0; i < n && st == FM_OK; i++) {
                int which = 0;
                st = fm_expert_store_wait_any(m->experts, s->held + i, 1, &which);
            }
            for (int i = 0; st == FM_OK && i < n; i++) {
                fm_expert *v = &s->views[i];
                fm_expert_store_view(m->experts, s->held[i], v);
                s->work[i] = (fm_expert_work){&v->gate, &v->up, &v->down, NULL, 0, 0, l * E + e0 + i};
            }
            if (st == FM_OK) offered = FM_OP(&m->be, experts_preload, s->work, n);
            for (int i = 0; i < n; i++) fm_expert_store_release(m->experts, s->held[i], 0); /* copied: free */
            if (st == FM_OK) st = FM_OP(&m->be, finish);
            if (st != FM_OK) return st;
        }
    }
    return FM_OK;
}

/* The expert uses of the layers routed on the device since the last call (their choices landed in dev_idx by
 * finish()): into the counts. The number of MoE layers that were. */
int fm_count_device_choices(fm_model *m) {
    const int E = m->c.num_experts, k = m->c.num_experts_per_tok;
    int n = 0;
    for (int l = 0; l < m->c.num_hidden_layers; l++) {
        const int T = m->dev_routed[l];
        if (!T) continue;
        const int32_t *idx = m->dev_idx + (size_t)l * m->segment * k;
        for (int i = 0; i < T * k; i++)
            if (idx[i] >= 0 && idx[i] < E) m->usage[(size_t)l * E + idx[i]]++;
        m->dev_routed[l] = 0;
        n++;
    }
    return n;
}
