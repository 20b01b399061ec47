/*
 * qwen3_5_moe.c — Qwen3.5-MoE (Qwen3.5-397B-A17B, -122B-A10B, -35B-A3B), text decoder.
 * HF: transformers/models/qwen3_5_moe/modeling_qwen3_5_moe.py, Qwen3_5MoeTextModel.
 *
 * Every layer: h += mixer(ZCNorm(h)); h += moe(ZCNorm(h)). The mixer is gated full attention when
 * layer_types[i] == "full_attention" (every 4th layer), else Gated DeltaNet. Every layer is MoE
 * (router softmax → top-k → renormalise, plus the sigmoid-gated shared expert).
 */
#include "../core/model.h"
#include "../core/util.h"

static fm_status bind(fm_model *m, const fm_load_spec *spec) {
    const int H = m->c.hidden_size;
    fm_status st;
    for (int l = 0; l < m->c.num_hidden_layers; l++) {
        fm_layer *L = &m->layers[l];
        if (!L->moe) return fm_fail(FM_ERR_INVALID, "qwen3_5_moe: layer %d is not MoE; every layer must be", l);
        if ((st = fm_bind_f32(m, spec, &L->input_layernorm, H, 0, "layers.%d.input_layernorm.weight", l))) return st;
        if ((st = fm_bind_f32(m, spec, &L->post_attention_layernorm, H, 0, "layers.%d.post_attention_layernorm.weight", l)))
            return st;
        st = L->full_attention ? fm_bind_attention(m, spec, l, &L->attn) : fm_bind_deltanet(m, spec, l, &L->lin);
        if (st) return st;
        if ((st = fm_bind_moe(m, spec, l, &L->moe_w))) return st;
    }
    return FM_OK;
}

/* Layer l's first half on x [T, H] (T <= C tokens at positions pos0 ..):
 * HF: hidden = residual + mixer(input_layernorm(hidden)) */
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

/* Layer l's second half on x [T, H] (T <= S tokens):
 * HF: hidden = residual + mlp(post_attention_layernorm(hidden)) */
static fm_status mlp(fm_model *m, int l, float *x, int T) {
    const fm_config *c = &m->c;
    const int H = c->hidden_size;
    const fm_backend *be = &m->be;
    fm_layer *L = &m->layers[l];
    float *xn = m->s.xn, *out = m->s.out; /* [T, H] each */
    FM_OP(be, rmsnorm, xn, x, L->post_attention_layernorm, T, H, c->rms_norm_eps, 1);
    fm_status st = fm_block_moe(m, l, &L->moe_w, xn, out, T, /*norm_topk=*/1);
    if (st != FM_OK) return st;
    fm_trace(m, out, T, H, "L%d.mlp_out", l);
    FM_OP(be, add, x, out, (size_t)T * H);
    fm_trace(m, x, T, H, "L%d.out", l);
    return FM_OK;
}

const fm_arch_ops fm_arch_qwen3_5_moe = {"qwen3_5_moe", bind, mixer, mlp};
