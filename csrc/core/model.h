/*
 * model.h — the model's internal structs (weights, per-layer state, scratch) and the blocks shared by
 * the architectures in csrc/models/. Shapes: H hidden, T tokens in a call, C the chunk capacity (a
 * mixer's tokens per call), S the segment capacity (the tokens a prompt runs layer by layer).
 */
#ifndef FM_MODEL_H
#define FM_MODEL_H

#include "../backend/backend.h"
#include "../io/expert_store.h"
#include "flashmoe.h"

/* ---------------------------------------------------------------- weights */

typedef struct {
    fm_mat in_proj_qkv;    /* [2·Hk·dk + Hv·dv, H]: [q of all key heads | k | v] */
    fm_mat in_proj_z;      /* [Hv·dv, H] */
    fm_mat in_proj_b;      /* [Hv, H] */
    fm_mat in_proj_a;      /* [Hv, H] */
    const float *conv1d;   /* [conv_dim, K] depthwise, over [q|k|v] */
    const float *dt_bias;  /* [Hv] */
    const float *A_log;    /* [Hv] */
    const float *norm;     /* [dv] gated RMSNorm weight (plain w, not 1 + w) */
    fm_mat out_proj;       /* [H, Hv·dv] */
} fm_deltanet_w;

typedef struct {
    fm_mat q_proj;         /* [nh·2·hd, H], per head [query(hd) | gate(hd)] */
    fm_mat k_proj, v_proj; /* [nkv·hd, H] */
    fm_mat o_proj;         /* [H, nh·hd] */
    const float *q_norm;   /* [hd] zero-centred */
    const float *k_norm;   /* [hd] zero-centred */
} fm_attention_w;

typedef struct {
    fm_mat gate_proj, up_proj; /* [I, H] */
    fm_mat down_proj;          /* [H, I] */
} fm_mlp_w;

typedef struct {
    fm_mat router;      /* [E, H]; always fp32 activations (8-bit in MLX imports) */
    fm_mlp_w shared;    /* shared expert, I = shared_expert_intermediate_size */
    fm_mat shared_gate; /* [1, H] */
} fm_moe_w;

typedef struct {
    const float *input_layernorm;          /* [H] */
    const float *post_attention_layernorm; /* [H] */
    int full_attention, moe;
    int next_moe; /* the next MoE layer (its router predicts what to prefetch), -1 if none */
    fm_deltanet_w lin;
    fm_attention_w attn;
    fm_moe_w moe_w;
    fm_mlp_w mlp; /* dense MLP layers only */

    /* sequence state */
    float *conv_state; /* [K-1, conv_dim] DeltaNet: last K-1 pre-conv inputs, oldest first */
    float *S;          /* [Hv, dk, dv] DeltaNet recurrent state */
    float *k_cache;    /* [ctx, nkv, hd] attention */
    float *v_cache;    /* [ctx, nkv, hd] attention */
} fm_layer;

/* ---------------------------------------------------------------- scratch */

/* Activations live in backend memory (FM_MEM_SCRATCH); the routing tables the core schedules with live
 * on the host. A prompt runs S tokens at a time through each layer in turn: the residual stream and the
 * MoE's buffers hold S tokens, the mixers' hold C (they run a chunk of the segment at a time). */
typedef struct {
    float *x;       /* [S, H] residual stream */
    float *xn;      /* [S, H] normed input of a block */
    float *out;     /* [S, H] block output */
    float *logits_out; /* [min(C, LOGIT_ROWS), V] lm_head rows before they are copied to the host */
    /* DeltaNet */
    float *qkv;     /* [C, conv_dim] pre-conv */
    float *conv;    /* [C, conv_dim] post-conv q|k|v */
    float *z;       /* [C, Hv·dv] */
    float *b, *a;   /* [C, Hv] -> beta, g */
    float *core;    /* [C, Hv·dv] */
    /* attention */
    float *q2;      /* [C, nh·2·hd] */
    float *q;       /* [C, nh·hd] */
    float *gate;    /* [C, nh·hd] */
    float *k, *v;   /* [C, nkv·hd] */
    float *att;     /* [C, nh·hd] */
    /* MoE */
    float *logits;  /* [S, E] router logits */
    float *sg;      /* [S] shared expert gate */
    float *h1, *h2; /* [C, max(Is, Imlp)] shared expert / dense MLP, a chunk of tokens at a time */
    float *ye;      /* [S·k, H] expert outputs, one row per (token, choice), grouped by expert (S·(k + 1)
                     * rows where the backend has moe_device: a folded shared expert's rows after them) */
    /* host: the routing and the schedule */
    int32_t *topk;  /* [S, k] */
    float *topw;    /* [S, k] */
    int32_t *tok;   /* [S·k] token of each row of ye */
    int32_t *row;   /* [S·k] row of ye of choice (t, j) */
    int32_t *ecount, *eoff; /* [E + 1] rows per expert, first row per expert */
    int32_t *need;  /* [E] experts this chunk uses */
    int32_t *held;  /* [E] slot of each acquired expert (parallel to held_e) */
    int32_t *held_e;
    int32_t *ready; /* [E] held indices whose reads have landed */
    fm_expert *views;       /* [E] weight views of the slots handed to the backend */
    fm_expert_work *work;   /* [E] */
    int32_t *ptopk; /* [S, k] next layer's predicted experts */
    float *pw;      /* [S, k] */
    int32_t *pred;  /* [E] next layer's predicted experts for the chunk */
    int n_pred;     /* how many of pred are set */
    int32_t *mark;  /* [E] */
} fm_scratch;

/* ---------------------------------------------------------------- the model */

/* An architecture: its weights, and each layer's two halves on the residual stream x [T, H] of tokens
 * at positions pos0 .. pos0 + T - 1. The driver (model.c) runs a layer's mixer on chunks of at most C
 * tokens, in order, then its MLP on the whole segment (at most S), before the next layer. */
typedef struct fm_arch_ops {
    const char *name;
    fm_status (*bind)(fm_model *m, const fm_load_spec *spec);    /* weights from the dense file */
    void (*mixer)(fm_model *m, int l, float *x, int T, int pos0); /* attention or DeltaNet: the state */
    fm_status (*mlp)(fm_model *m, int l, float *x, int T);        /* MoE or dense MLP: no state */
} fm_arch_ops;

struct fm_model {
    fm_config c;
    const fm_arch_ops *arch;
    fm_backend be;         /* where the layers compute (backend.h) */
    size_t be_workspace;   /* the backend instance's own scratch bytes (in the memory plan) */
    uint64_t be_limit;     /* the most the backend may hold (backend.h memory_limit), 0: no limit */
    uint8_t *dense;        /* dense.bin payload, as the backend addresses it (weights point into it) */
    uint8_t *dense_host;   /* the same bytes in host memory, as read */
    uint64_t dense_size;   /* payload bytes */
    fm_mat embed;          /* [V, H] */
    fm_mat lm_head;        /* [V, H] (embed when tied) */
    const float *norm;     /* [H] final norm */
    fm_layer *layers;      /* [L] */
    fm_expert_store *experts;
    fm_scratch s;
    void *scratch_mem;     /* backend memory: the activations of fm_scratch */
    void *host_scratch;    /* host memory: its routing tables */
    int ctx, chunk, pos;
    int segment;           /* S: tokens of a prompt run through each layer at a time (a multiple of chunk) */
    int32_t *seq;          /* [ctx] the tokens of the sequence, [0, pos) valid: what the state holds */
    fm_memory mem;         /* the budget and where it goes */
    int prefetch;          /* predict the next layer's experts (protect, and read ahead if the store does) */
    uint64_t *usage;       /* [L, E] token-uses of each routed expert */
    double compute_seconds;
    uint64_t tokens;
    int last_prompt_tokens, last_generated_tokens;
    double last_prompt_seconds, last_decode_seconds;
    fm_trace_fn trace;
    void *trace_user;
    fm_progress_fn progress;
    void *progress_user;
    float *step_logits;    /* [V] fm_model_decode_step's logits, allocated on first use */
    /* MoE layers the backend routed itself (backend.h moe_device): T of the segment, or 0; and their choices */
    int32_t *dev_routed;   /* [L] */
    int32_t *dev_idx;      /* [L, segment (1 where no moe_device), k] host: the choices, landed by finish() */
    int n_moe;             /* MoE layers */
    int host_free_steps;   /* decode steps in a row with every MoE layer routed on the device (replays included) */
};

/* The most tokens the core offers a backend's moe_device (decode steps and little more). */
enum { FM_DEVICE_ROUTE_T = 8 };

/* Name an intermediate x [T, n] for the debug hook (no cost when no hook is set). */
void fm_trace(fm_model *m, const float *x, int T, int n, const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* Weight binding by name from the load spec, checking shape and dtype against the config. */
fm_status fm_bind_mat(fm_model *m, const fm_load_spec *spec, fm_mat *out, int rows, int cols, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
fm_status fm_bind_f32(fm_model *m, const fm_load_spec *spec, const float **out, int rows, int cols,
                      const char *fmt, ...) __attribute__((format(printf, 6, 7)));

/* Blocks shared by the architectures (csrc/core/blocks.c). xn [T, H] in, out [T, H]. */
fm_status fm_bind_deltanet(fm_model *m, const fm_load_spec *spec, int l, fm_deltanet_w *w);
fm_status fm_bind_attention(fm_model *m, const fm_load_spec *spec, int l, fm_attention_w *w);
fm_status fm_bind_moe(fm_model *m, const fm_load_spec *spec, int l, fm_moe_w *w);
fm_status fm_bind_mlp(fm_model *m, const fm_load_spec *spec, fm_mlp_w *w, int inter, const char *prefix);

void fm_block_deltanet(fm_model *m, fm_layer *L, const float *xn, float *out, int T, int pos0);
void fm_block_attention(fm_model *m, fm_layer *L, const float *xn, float *out, int T, int pos0);
fm_status fm_block_moe(fm_model *m, int layer, const fm_moe_w *w, const float *xn, float *out, int T, int norm_topk);
int fm_count_device_choices(fm_model *m);
fm_status fm_preload_device_experts(fm_model *m);
void fm_block_mlp(fm_model *m, const fm_mlp_w *w, const float *xn, float *out, int T);

extern const fm_arch_ops fm_arch_qwen3_5_moe;
extern const fm_arch_ops fm_arch_qwen3_next;

#endif /* FM_MODEL_H */
