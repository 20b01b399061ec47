/*
 * flashmoe.h — the one public C header of the flashmoe core.
 *
 * A model is an opaque handle. It is built from a load spec (the packed header already parsed and
 * validated by the caller, see docs/FORMAT.md), owns its dense weights, an expert store that reads
 * routed experts one blob at a time from the per-layer expert files, and the state of one sequence
 * (KV cache for full-attention layers, conv + recurrent state for Gated DeltaNet layers).
 *
 * Every function that can fail returns an fm_status. On failure, fm_last_error() returns a message
 * naming the function and the object ("layer 3 expert 17: short read 4096 of 7077888 bytes"); it
 * is thread-local and valid until the next failing call on the same thread. Library code never exits.
 */
#ifndef FLASHMOE_H
#define FLASHMOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    FM_OK = 0,
    FM_ERR_INVALID = 1,  /* bad argument or inconsistent spec */
    FM_ERR_IO = 2,       /* open/read failed, short read */
    FM_ERR_FORMAT = 3,   /* file content disagrees with the header: magic, size, checksum, shape */
    FM_ERR_NOMEM = 4,    /* allocation failed */
    FM_ERR_CONTEXT = 5,  /* the sequence would exceed the context length */
    FM_ERR_BUDGET = 6,   /* the memory budget cannot hold what the model needs */
    FM_ERR_CANCELLED = 7, /* the progress callback asked to stop (the sequence is reset) */
    FM_ERR_DEVICE = 8,   /* the GPU failed a command (a command buffer's error status; the sequence is reset) */
} fm_status;

typedef enum {
    FM_CACHE_LRU = 0,       /* evict the least recently used expert */
    FM_CACHE_LFRU = 1,      /* evict the expert with the lowest recency-weighted use frequency */
    FM_CACHE_PAGECACHE = 2, /* no engine cache: buffered reads through the OS page cache every time */
} fm_cache_policy;

typedef enum {
    FM_F32 = 0,
    FM_BF16 = 1,
    FM_Q8 = 2,  /* group-wise affine, uint8 q, fp16 (or bf16: fm_tensor_desc.scale_bf16) scales and biases */
    FM_Q4 = 3,  /* same with two 4-bit values per byte, low nibble first */
} fm_dtype;

typedef enum {
    FM_ARCH_QWEN3_5_MOE = 0,
    FM_ARCH_QWEN3_NEXT = 1,
} fm_arch;

enum { FM_MAX_LAYERS = 256, FM_MAX_NAME = 96, FM_MAX_CONV_KERNEL = 64 };

/* Hyper-parameters, HF field names. Layer kinds come per layer. */
typedef struct {
    fm_arch arch;
    int vocab_size, hidden_size, num_hidden_layers;
    int num_attention_heads, num_key_value_heads, head_dim;
    int linear_conv_kernel_dim, linear_key_head_dim, linear_value_head_dim;
    int linear_num_key_heads, linear_num_value_heads;
    int num_experts, num_experts_per_tok, moe_intermediate_size, shared_expert_intermediate_size;
    int intermediate_size; /* dense MLP layers (Qwen3-Next mlp_only_layers), 0 if none */
    int norm_topk_prob, tie_word_embeddings;
    float rms_norm_eps, rope_theta;
    double partial_rotary_factor; /* double: the rotary dim is int(head_dim * factor), as HF computes it */
    uint8_t layer_is_full_attention[FM_MAX_LAYERS];
    uint8_t layer_is_moe[FM_MAX_LAYERS];
} fm_config;

/* One tensor of the packed format. Offsets are absolute in dense.bin, or relative to an expert blob. */
typedef struct {
    char name[FM_MAX_NAME];
    fm_dtype dtype;
    int ndim;
    int64_t shape[2];
    int group_size;
    int scale_bf16; /* q4/q8: scales and biases are bfloat16 bits (MLX checkpoints), else float16 */
    uint64_t offset, nbytes, scales_offset, biases_offset;
} fm_tensor_desc;

typedef struct {
    fm_config config;
    const char *dense_path;
    uint64_t dense_size;
    int n_dense;
    const fm_tensor_desc *dense;
    int has_dense_checksum;  /* dense_checksum is given: CRC-32 of dense.bin after its preamble */
    uint32_t dense_checksum; /* checked at load when verify_checksums */

    /* Routed experts: one file per MoE layer (NULL for other layers). */
    const char *const *expert_paths; /* [num_hidden_layers] */
    const uint64_t *expert_file_sizes; /* [num_hidden_layers] */
    const uint32_t *expert_checksums;  /* [num_hidden_layers * num_experts], CRC-32 of each blob */
    uint64_t expert_blob_size, expert_stride;
    fm_tensor_desc expert_gate, expert_up, expert_down;

    /* Options. */
    int context_length;     /* tokens of KV cache to allocate */
    int prefill_chunk;      /* tokens per forward chunk (bounds scratch memory) */
    uint64_t memory_budget; /* bytes for everything the engine allocates; 0: half of physical RAM */
    int expert_cache_slots; /* experts kept in memory; <= 0: as many as the budget holds */
    fm_cache_policy cache_policy;
    int io_threads;         /* concurrent expert reads (default 8) */
    int prefetch;           /* read the experts predicted for the next layer ahead of need */
    int verify_checksums;   /* check dense.bin's CRC-32 at load and each expert blob's on every read */
    int int8_activations;   /* decode matvecs on int8-quantized activations (see csrc/backend/cpu/cpu.h) */
    const char *backend;    /* where the layers compute: "cpu" (NULL or "": cpu); see fm_backend_names() */
    uint64_t gpu_memory_budget; /* CUDA: device bytes for the dense weights, state, scratch and the VRAM expert
                                 * cache (the experts' second tier, above memory_budget's); 0: what is free */
} fm_load_spec;

typedef struct fm_model fm_model;

const char *fm_last_error(void);

fm_status fm_model_load(const fm_load_spec *spec, fm_model **out);
/* The backend a model computes on ("cpu", ...), and the comma-separated backends this build has. */
const char *fm_model_backend(const fm_model *m);
const char *fm_backend_names(void);
void fm_model_free(fm_model *m);

/* Forget the sequence: position 0, caches and recurrent state cleared. */
void fm_model_reset(fm_model *m);
int fm_model_position(const fm_model *m);
/* The tokens the sequence state holds, [fm_model_position(m)] of them, in order (valid until the next
 * call that changes the state). What a prompt cache matches prompts against: it is the engine's own
 * record, so it can never disagree with the state (a failed forward resets both). */
const int32_t *fm_model_tokens(const fm_model *m);
int fm_model_context_length(const fm_model *m);

/* Run n tokens through the model, continuing from the current position.
 * On failure (a read error, a checksum mismatch) the sequence is reset to position 0: a chunk that
 * failed part way has advanced some layers' state and not others, and no other state is consistent.
 * logits: [n, vocab] when all_logits, else [vocab] for the last token; may be NULL. */
fm_status fm_model_forward(fm_model *m, const int32_t *tokens, int n, float *logits, int all_logits);

/* ---------------------------------------------------------------- sampling
 *
 * The pipeline, per call of fm_sampler_sample (llama.cpp / Hugging Face / OpenAI semantics where they
 * agree), on the logits l of one position:
 *   1. penalties over every accepted token t (prompt and generated; count c[t] > 0), in this order:
 *        repetition_penalty r (1 = off, HF / llama.cpp): l[t] = l[t] > 0 ? l[t] / r : l[t] * r
 *        presence_penalty pp and frequency_penalty fp (0 = off, OpenAI): l[t] -= c[t]·fp + pp
 *   2. temperature 0: argmax (ties: the lowest id). Otherwise:
 *   3. top_k (0 = off): keep the k largest logits (ties at the boundary: lower ids first);
 *   4. p = softmax(l / temperature) over what is kept;
 *   5. top_p (1 = off): keep the smallest set of most probable tokens whose probability sums to
 *      >= top_p (ties: lower ids first);
 *   6. min_p (0 = off): keep tokens with p >= min_p · max p;
 *   7. renormalise and draw with xoshiro256** seeded by splitmix64(seed) (seed 0: a fixed default).
 * The same parameters, seed, accepted tokens and logits give the same token on every run. Cost at a
 * 248k vocabulary: a few passes over the logits (no full sort; only the candidates at the top_p
 * boundary are sorted). */
typedef struct {
    float temperature;       /* >= 0; 0 = greedy */
    int top_k;               /* >= 0; 0 = off */
    float top_p;             /* (0, 1]; 1 = off */
    float min_p;             /* [0, 1]; 0 = off */
    float repetition_penalty; /* > 0; 1 = off */
    float presence_penalty;  /* 0 = off */
    float frequency_penalty; /* 0 = off */
    uint64_t seed;           /* 0: a fixed default seed */
} fm_sampling;

/* Greedy with every filter and penalty off: temperature 0, top_k 0, top_p 1, min_p 0, penalties off. */
fm_sampling fm_sampling_default(void);

typedef struct fm_sampler fm_sampler;

/* FM_ERR_INVALID with a message naming the parameter when p is out of range. */
fm_status fm_sampler_new(const fm_sampling *p, int vocab_size, fm_sampler **out);
void fm_sampler_free(fm_sampler *s);
int fm_sampler_vocab_size(const fm_sampler *s);
/* Record tokens seen (prompt and generated) for the penalties; ids outside the vocabulary are ignored. */
void fm_sampler_accept(fm_sampler *s, const int32_t *tokens, int n);
/* Step 1 of the pipeline only, in place on logits [vocab]. */
void fm_sampler_apply_penalties(const fm_sampler *s, float *logits);
/* Pick a token from logits [vocab] (modified in place). Does not accept it: the caller does. */
int32_t fm_sampler_sample(fm_sampler *s, float *logits);
/* 1 when s picks the argmax of the logits as they come (temperature 0, penalties off): a backend may then find
 * it where the logits are (the model's greedy steps do). */
int fm_sampler_greedy(const fm_sampler *s);
/* Forget the accepted tokens and reseed: the sampler is as new. */
void fm_sampler_reset(fm_sampler *s);

/* Generate up to max_tokens after the prompt (which continues the current state), sampling with
 * sp (NULL: greedy); the prompt and every generated token are accepted for the penalties.
 * Stops after emitting any of stop_ids. Returns the number of tokens written to out. Afterwards the
 * state holds the prompt and every generated token but the last. */
fm_status fm_model_generate(fm_model *m, const int32_t *prompt, int n_prompt, int max_tokens,
                            const fm_sampling *sp, const int32_t *stop_ids, int n_stop, int32_t *out,
                            int *n_out);

/* One step for streaming: run the n tokens (a prompt or a chunk of one, or the last sampled token)
 * from the current position, then sample the next token from the last position's logits with s,
 * accept it into s and write it to *next. The caller accepts the prompt tokens itself
 * (fm_sampler_accept) when penalties should see them. The n tokens are accepted into the state
 * (position += n); the sampled token is not run yet: pass it to the next call. Errors like
 * fm_model_forward. Stats: n > 1 starts a new generation (last_prompt_tokens = n,
 * last_prompt_seconds, last_generated_tokens = 1, last_decode_seconds = 0); n == 1 adds one
 * generated token and its time to last_generated_tokens / last_decode_seconds. */
fm_status fm_model_decode_step(fm_model *m, const int32_t *tokens, int n, fm_sampler *s, int32_t *next);

/* ---------------------------------------------------------------- snapshots
 *
 * A copy of everything that defines the sequence: the position, rows [0, position) of each attention
 * layer's KV cache, and each DeltaNet layer's conv and recurrent state. Restoring it into the same
 * model (or one loaded with the same config and context length) makes every later logit bit-identical
 * to what the model that took it would have produced. For multi-turn prefix reuse. */
typedef struct fm_snapshot fm_snapshot;
fm_status fm_model_snapshot(const fm_model *m, fm_snapshot **out);
/* FM_ERR_INVALID (the model stays as it was) when the snapshot comes from another config or context length. */
fm_status fm_model_restore(fm_model *m, const fm_snapshot *s);
void fm_snapshot_free(fm_snapshot *s);
size_t fm_snapshot_bytes(const fm_snapshot *s); /* state bytes held */
int fm_snapshot_position(const fm_snapshot *s);
const int32_t *fm_snapshot_tokens(const fm_snapshot *s); /* [position] the tokens its state holds */

/* Debug hook: called with every named intermediate of the forward pass ("L3.attn_out",
 * "L3.moe_out", "final_norm", ...), data [T, n] fp32, valid only during the call. NULL disables. */
typedef void (*fm_trace_fn)(void *user, const char *name, const float *data, int T, int n);
void fm_model_set_trace(fm_model *m, fm_trace_fn fn, void *user);

/* Progress of fm_model_forward: called after each layer of each segment of a prompt with the tokens done
 * so far (a segment's tokens count in proportion to its layers done) out of the call's total. A nonzero
 * return stops the forward with FM_ERR_CANCELLED, the sequence reset as after any failed forward (a
 * prompt runs layer by layer, so no shorter prefix is complete). NULL disables. */
typedef int (*fm_progress_fn)(void *user, int done, int total);
void fm_model_set_progress(fm_model *m, fm_progress_fn fn, void *user);

typedef struct {
    uint64_t tokens;         /* tokens run through the model */
    uint64_t expert_hits;    /* expert acquisitions served from memory (one per expert per layer per chunk) */
    uint64_t expert_misses;  /* expert acquisitions that had to read the blob */
    uint64_t prefetches;     /* blobs read ahead of need from the next-layer prediction */
    uint64_t prefetch_hits;  /* hits served by a prefetched blob */
    uint64_t bytes_read;     /* expert bytes read from disk */
    double io_wait_seconds;  /* time the compute thread waited for expert reads */
    double io_busy_seconds;  /* wall time with at least one expert read in flight */
    double compute_seconds;  /* wall time in fm_model_forward, waits included */
    int direct_io;           /* expert reads bypass the page cache (O_DIRECT) */
    /* a GPU backend's own expert cache above the host's (CUDA's VRAM tier; 0 elsewhere) */
    uint64_t device_expert_slots, device_expert_hits, device_expert_misses, device_bytes_in;
    /* decode steps the backend replayed from a recording, and recordings it made (CUDA graphs; 0 elsewhere) */
    uint64_t device_step_replays, device_step_recordings;
    /* MoE layers whose shared expert ran in the routed experts' kernels (CUDA's moe_device; 0 elsewhere) */
    uint64_t device_shared_folds;
    /* routed experts that the host computed instead of copying them to the GPU (CUDA's host share; 0 elsewhere) */
    uint64_t device_host_experts;
    /* MoE layers of prompts whose choices the GPU grouped itself, with no round trip to the host (CUDA; 0 elsewhere) */
    uint64_t device_prompt_layers;
    /* host seconds in replayed steps' launches, and blocked waiting for the GPU (CUDA; 0 elsewhere) */
    double device_launch_seconds, device_wait_seconds;
    /* the last fm_model_generate call: prompt processing and decoding, separately */
    int last_prompt_tokens, last_generated_tokens;
    double last_prompt_seconds, last_decode_seconds;
} fm_stats;

void fm_model_stats(const fm_model *m, fm_stats *out);

/* For tests: after `after` more expert reads succeed, the next `count` fail with EIO, or when corrupt
 * return with one byte flipped (count 0: off). */
void fm_model_debug_fail_reads(fm_model *m, int after, int count, int corrupt);

/* Token-uses of each routed expert since load: out[layer * num_experts + e]. */
void fm_model_expert_usage(const fm_model *m, uint64_t *out);

/* Where the memory budget goes, in bytes. */
typedef struct {
    uint64_t budget, dense, kv_cache, state, scratch, expert_cache;
    uint64_t minimum; /* the smallest budget that loads: all but the expert cache, plus k experts */
    int expert_slots, experts_total;
} fm_memory;
void fm_model_memory(const fm_model *m, fm_memory *out);

/* The memory plan a load with this spec would make, without loading; fails like fm_model_load
 * when the budget is too small (out->minimum is set either way). */
fm_status fm_model_plan(const fm_load_spec *spec, fm_memory *out);

#ifdef __cplusplus
}
#endif
#endif /* FLASHMOE_H */
