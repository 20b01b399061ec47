/*
 * qwen3_next.c — Qwen3-Next (Qwen3-Next-80B-A3B), text decoder.
 * HF: transformers/models/qwen3_next/modeling_qwen3_next.py, Qwen3NextModel.
 *
 * Same layer shape as Qwen3.5-MoE, with three differences, all handled here:
 *  - the DeltaNet input projections are fused and interleaved per key head in the checkpoint
 *    (in_proj_qkvz, in_proj_ba); the converter de-interleaves them into the Qwen3.5 layout, so the
 *    shared DeltaNet block reads them unchanged;
 *  - a layer is MoE unless it is in mlp_only_layers or (i + 1) % decoder_sparse_step != 0; the others
 *    have a dense MLP of intermediate_size;
 *  - the top-k router weights are renormalised only when norm_topk_prob.
 */
#include "../core/model.h"
#include "../core/util.h"

#include <stdio.h>

static fm_status bind(fm_model *m, const fm_load_spec *spec) {
    const int H = m->c.hidden_size;
    fm_status st;
    for (int l = 0; l < m->c.num_hidden_layers; l++) {
        fm_layer *L = &m->layers[l];
        if ((st = fm_bind_f32(m, spec, &L->input_layernorm, H, 0, "layers.%d.input_layernorm.weight", l))) return st;
        if ((st = fm_bind_f32(m, spec, &L->post_attention_layernorm, H, 0, "layers.%d.post_attention_layernorm.weight", l)))
            return st;
        st = L->full_attention ? fm_bind_attention(m, spec, l, &L->attn) : fm_bind_deltanet(m, spec, l, &L->lin);
        if (st) return st;
        if (L->moe) {
            st = fm_bind_moe(m, spec, l, &L->moe_w);
        } else {
            char prefix[48];
            snprintf(prefix, sizeof prefix, "layers.%d.mlp", l);
            st = fm_bind_mlp(m, spec, &L->mlp, m->c.intermediate_size, prefix);
        }
        if (st) return st;
    }
    return FM_OK;
}

/* Layer l's first half on x [T, H] (T <= C tokens at positions pos0 ..): h += mixer(norm(h)) */
static void mixer(fm_model *m, int l, float *x, int T, int pos0) {
    const fm_config *c = &m->c;
    const int H = c->hidden_size;
    const fm_backend *be = &m->be;
    fm_layer *L = &m->layers[l];
    float *xn = m->s.xn, *out = m->s.out; /* [T, H] each */
    FM_OP(be, rmsnorm, xn, x, L->input_layernorm, T, H, c->rms_norm_eps, 1);
    if (L->full_attention)
        fm_block_attention(m, L, xn, out, T, pos0);
    else
        fm_block_deltanet(m, L, xn, out, T, pos0);
    fm_trace(m, out, T, H, "L%d.%s", l, L->full_attention ? "attn_out" : "deltanet_out");
    FM_OP(be, add, x, out, (size_t)T * H);
}

/* Layer l's second half on x [T, H] (T <= S tokens): h += moe(norm(h)), or the dense MLP */
static fm_status mlp(fm_model *m, int l, float *x, int T) {
    const fm_config *c = &m->c;
    const int H = c->hidden_size;
    const fm_backend *be = &m->be;
    fm_layer *L = &m->layers[l];
    float *xn = m->s.xn, *out = m->s.out; /* [T, H] each */
    FM_OP(be, rmsnorm, xn, x, L->post_attention_layernorm, T, H, c->rms_norm_eps, 1);
    if (L->moe) {
        fm_status st = fm_block_moe(m, l, &L->moe_w, xn, out, T, c->norm_topk_prob);
        if (st != FM_OK) return st;
    } else {
        fm_block_mlp(m, &L->mlp, xn, out, T); /* HF: Qwen3NextMLP(intermediate_size) */
    }
    fm_trace(m, out, T, H, "L%d.mlp_out", l);
    FM_OP(be, add, x, out, (size_t)T * H);
    fm_trace(m, x, T, H, "L%d.out", l);
    return FM_OK;
}

const fm_arch_ops fm_arch_qwen3_next = {"qwen3_next", bind, mixer, mlp};
