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
} fm_status;

typedef enum {
    FM_CACHE_LRU = 0,       /* evict the least recently used expert */
    FM_CACHE_LFRU = 1,      /* evict the expert with the lowest recency-weighted use frequency */
    FM_CACHE_PAGECACHE = 2, /* no engine cache: buffered reads through the OS page cache every time */
} fm_cache_policy;

typedef enum {
    FM_F32 = 0,
    FM_BF16 = 1,
    FM_Q8 = 2,  /* group-wise affine, uint8 q, fp16 scales and biases */
    FM_Q4 = 3,  /* same with two 4-bit values per byte, low nibble first */
} fm_dtype;

typedef enum {
    FM_ARCH_QWEN3_5_MOE = 0,
    FM_ARCH_QWEN3_NEXT = 1,
} fm_arch;

enum { FM_MAX_LAYERS = 256, FM_MAX_NAME = 96 };

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
    float rms_norm_eps, rope_theta, partial_rotary_factor;
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
    uint64_t offset, nbytes, scales_offset, biases_offset;
} fm_tensor_desc;

typedef struct {
    fm_config config;
    const char *dense_path;
    uint64_t dense_size;
    int n_dense;
    const fm_tensor_desc *dense;

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
    int verify_checksums;   /* check each expert blob's CRC-32 on its first read */
} fm_load_spec;

typedef struct fm_model fm_model;

const char *fm_last_error(void);

fm_status fm_model_load(const fm_load_spec *spec, fm_model **out);
void fm_model_free(fm_model *m);

/* Forget the sequence: position 0, caches and recurrent state cleared. */
void fm_model_reset(fm_model *m);
int fm_model_position(const fm_model *m);
int fm_model_context_length(const fm_model *m);

/* Run n tokens through the model, continuing from the current position.
 * logits: [n, vocab] when all_logits, else [vocab] for the last token; may be NULL. */
fm_status fm_model_forward(fm_model *m, const int32_t *tokens, int n, float *logits, int all_logits);

/* Generate up to max_tokens after the prompt (which continues the current state).
 * temperature <= 0 is greedy; otherwise softmax sampling with a seeded generator.
 * Stops after emitting any of stop_ids. Returns the number of tokens written to out. */
fm_status fm_model_generate(fm_model *m, const int32_t *prompt, int n_prompt, int max_tokens,
                            float temperature, uint64_t seed, const int32_t *stop_ids, int n_stop,
                            int32_t *out, int *n_out);

/* Debug hook: called with every named intermediate of the forward pass ("L3.attn_out",
 * "L3.moe_out", "final_norm", ...), data [T, n] fp32, valid only during the call. NULL disables. */
typedef void (*fm_trace_fn)(void *user, const char *name, const float *data, int T, int n);
void fm_model_set_trace(fm_model *m, fm_trace_fn fn, void *user);

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
    /* the last fm_model_generate call: prompt processing and decoding, separately */
    int last_prompt_tokens, last_generated_tokens;
    double last_prompt_seconds, last_decode_seconds;
} fm_stats;

void fm_model_stats(const fm_model *m, fm_stats *out);

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
