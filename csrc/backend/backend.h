/*
 * backend.h — the contract every compute backend fills in: CPU today (cpu/), CUDA and Metal next.
 *
 * The host stays in control. The core runs the layers in order and hands the backend one op at a
 * time; after each MoE router it reads the top-k back (the one device→host transfer of a layer),
 * decides which experts to read into which slots, and asks the backend to run each expert's FFN over
 * its tokens once its slot is filled. There is no scheduler: streaming experts from disk needs the host
 * between the router and the reads. Two optional ops let a GPU backend leave the host out where nothing
 * streams: moe_device (a layer whose experts the backend holds routes and computes on the device), and
 * step_begin/step_end (a decode step of such layers recorded once and replayed, CUDA graphs).
 *
 * Pointers to tensor data (activations, state, weights, expert slots) are the backend's addresses: the
 * core passes them between ops and never reads or writes through them itself; where it must see data
 * (the logits the sampler reads) it copies it to the host. Every op reads its inputs and writes its
 * outputs in issue order, as if run one after the other (a GPU backend queues them on one stream).
 *
 * Adding a backend: a directory csrc/backend/NAME/ with an fm_backend_ops table and an entry in
 * backend.c's registry (docs/ARCHITECTURE.md has the checklist).
 */
#ifndef FM_BACKEND_H
#define FM_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "flashmoe.h"
#include "tensor.h"

/* Batch invariance: every op gives each token the same bits however many tokens share the call, so
 * outputs do not depend on the chunk size, the memory budget or the threads. The one op with state
 * carried across tokens inside a call, gated_delta, may cut its tokens into chunks; the core only
 * splits a sequence into calls at multiples of this many positions (or where the caller's call ends),
 * and a backend's chunks must end at multiples of it in absolute position. */
enum { FM_DELTANET_CHUNK = 16 };

/* device_stats' counters (below) */
enum { FM_DEVICE_STATS = 11 };

/* What a buffer holds, so a backend can place it: dense weights (read once, read-only), sequence state
 * (KV cache, DeltaNet state; snapshots copy it), scratch (a chunk's activations), expert slots (the
 * expert cache: read into from disk, then read by compute), staging (host memory reads land in). */
typedef enum {
    FM_MEM_DENSE = 0,
    FM_MEM_STATE = 1,
    FM_MEM_SCRATCH = 2,
    FM_MEM_EXPERT_SLOTS = 3,
    FM_MEM_STAGING = 4,
} fm_mem_kind;

/* A point in the backend's stream of ops: complete once every op issued before it has finished.
 * 0 means "already complete" (the CPU backend's ops finish before they return). */
typedef uint64_t fm_event;

/* One routed expert's FFN over the tokens routed to it: y = down(silu(gate x) * up x) for the n rows
 * tok[0..n) of xn, written to rows [row0, row0 + n) of ye. */
typedef struct {
    const fm_mat *gate, *up, *down; /* [I, H], [I, H], [H, I], in an expert slot */
    const int32_t *tok;             /* [n] host: token index of each row */
    int n, row0;
    /* which expert: layer · num_experts + e, the same weights whatever slot holds them (a backend with a
     * cache of its own keys it by this: CUDA's VRAM tier); -1 for weights with no identity (op tests) */
    int32_t key;
} fm_expert_work;

/* A MoE layer's shared expert, for moe_device to fold into its routed experts' work: y = down(silu(gate x) ·
 * up x), scaled by sigmoid(gate_row · x). Dense weights. */
typedef struct {
    const fm_mat *gate, *up, *down; /* [I, H], [I, H], [H, I] (I: shared_expert_intermediate_size) */
    const fm_mat *gate_row;         /* shared_expert_gate [1, H], on fp32 activations (int8_act 0) */
} fm_shared_expert;

/* A backend's instance for one model: sized for chunks of `chunk` tokens of `config`, and op calls of up
 * to `segment` tokens (the MLP and MoE run over a whole segment; 0: `chunk`). */
typedef struct {
    const fm_config *config;
    int chunk;
    int segment;
    /* bytes of device memory the instance may take (CUDA: dense weights, state, scratch and its VRAM
     * expert cache); 0: what the device has free. Ignored by backends on host memory. */
    uint64_t device_budget;
} fm_backend_params;

typedef struct fm_backend_ops {
    const char *name;
    /* host memory the instance allocates for itself (its own scratch), for the memory budget */
    size_t (*workspace_bytes)(const fm_backend_params *p);
    /* the most bytes a model's buffers may take on this backend (Metal: what the GPU may keep resident),
     * 0 for no limit but the memory budget's; the memory plan checks the budget against it */
    uint64_t (*memory_limit)(const fm_backend_params *p);
    fm_status (*create)(const fm_backend_params *p, void **ctx); /* *ctx is set (for destroy) even on failure */
    void (*destroy)(void *ctx);

    /* ---- memory */
    /* NULL when out of memory; zeroed, except dense weights and expert slots (every byte is read into) */
    void *(*alloc)(void *ctx, fm_mem_kind kind, size_t bytes);
    void (*free)(void *ctx, fm_mem_kind kind, void *p, size_t bytes);
    void (*fill_zero)(void *ctx, void *p, size_t bytes);
    void (*copy)(void *ctx, void *dst, const void *src, size_t bytes);         /* backend → backend */
    void (*to_host)(void *ctx, void *host, const void *src, size_t bytes);     /* waits for pending ops */
    void (*from_host)(void *ctx, void *dst, const void *host, size_t bytes);
    /* The host address of backend memory, or NULL where the host cannot see it (the expert store reads
     * into slots through it; CPU: identity). */
    void *(*host_view)(void *ctx, void *p);
    /* Host memory the backend is to read as its own (the dense weights as read from disk): its backend
     * address, valid until unwrap_host; NULL on failure. CPU: identity; Metal: newBufferWithBytesNoCopy;
     * CUDA: a device copy or cudaHostRegister. */
    void *(*wrap_host)(void *ctx, void *host, size_t bytes);
    void (*unwrap_host)(void *ctx, void *p, size_t bytes);

    /* ---- synchronisation */
    fm_event (*record)(void *ctx);           /* an event after every op issued so far */
    void (*wait)(void *ctx, fm_event ev);    /* block the host until ev completes */
    fm_status (*finish)(void *ctx);          /* wait for everything; a failed op reports here */
    /* the counters of a cache of experts the backend keeps itself (CUDA's VRAM tier): slots, hits, misses,
     * bytes copied in; then decode steps replayed and recorded (step_begin); then MoE layers whose shared expert
     * moe_device folded in (replays count theirs); the host's ns launching replays and waiting; routed experts
     * the host computed (CUDA: host_experts); MoE layers of prompts moe_device routed; zeros where there is none */
    void (*device_stats)(void *ctx, uint64_t out[FM_DEVICE_STATS]);

    /* ---- ops: activations fp32, row-major, T tokens */
    void (*matmul)(void *ctx, const fm_mat *w, const float *x, int T, float *y); /* y[T, rows] = x · Wᵀ */
    void (*embed)(void *ctx, const fm_mat *w, const int32_t *ids, int T, float *out); /* ids: host */
    void (*rmsnorm)(void *ctx, float *out, const float *x, const float *w, int T, int n, float eps, int zero_centered);
    void (*l2norm)(void *ctx, float *x, int T, int n, float eps, float scale);
    void (*rope)(void *ctx, float *x, int T, int heads, int head_dim, int rot_dim, int pos0, float theta);
    void (*silu_mul)(void *ctx, float *out, const float *gate, const float *up, int T, int n);
    void (*sigmoid_mul)(void *ctx, float *out, const float *gate, const float *x, int T, int n);
    void (*add)(void *ctx, float *x, const float *y, size_t n); /* x += y (residual) */
    /* gated attention: q2 [T, nh, 2·hd] (per head query | gate) → q, gate [T, nh, hd] */
    void (*split_q_gate)(void *ctx, float *q, float *gate, const float *q2, int T, int nh, int hd);
    /* rows [pos0, pos0 + T) of a cache [ctx, row] ← src [T, row] */
    void (*kv_write)(void *ctx, float *cache, const float *src, int pos0, int T, int row);
    void (*attention)(void *ctx, float *out, const float *q, const float *k_cache, const float *v_cache, int T,
                      int pos0, int nh, int nkv, int hd, float scale);
    void (*conv1d_silu)(void *ctx, float *out, const float *x, float *state, const float *w, int T, int C, int K);
    /* DeltaNet: conv [T, 2·kd + vd] → q, k [T, kd], v [T, vd], contiguous */
    void (*deltanet_split)(void *ctx, float *q, float *k, float *v, const float *conv, int T, int kd, int vd);
    /* DeltaNet gates in place: b → beta = sigmoid(b), a → g = -exp(A_log)·softplus(a + dt_bias); [T, Hv] */
    void (*deltanet_gates)(void *ctx, float *b, float *a, const float *A_log, const float *dt_bias, int T, int Hv);
    /* the gated delta rule over T tokens at positions pos0 .. pos0 + T - 1 (csrc/backend/cpu/cpu.h has the
     * shapes); the backend picks the recurrent or the chunked form, and must give the same bits however
     * the tokens are split into calls at multiples of FM_DELTANET_CHUNK positions */
    void (*gated_delta)(void *ctx, float *out, float *S, const float *q, const float *k, const float *v, const float *g,
                        const float *beta, int T, int pos0, int Hk, int Hv, int dk, int dv);
    /* router: softmax over logits [T, E] in fp32, top-k per token (descending), renormalised when norm;
     * idx and weights [T, k] land on the host */
    void (*route)(void *ctx, const float *logits, int T, int E, int k, int norm, int32_t *idx, float *weights);
    /* out[t, :] *= sigmoid(g[t]) (the shared expert's gate), out [T, n] */
    void (*gate_rows)(void *ctx, float *out, const float *g, int T, int n);
    /* routed experts, in any order or side by side (each writes only its own rows of ye [·, H]); xn
     * [T, H] the layer's normed input; h = H */
    void (*experts)(void *ctx, const fm_expert_work *work, int n_work, const float *xn, float *ye, int h);
    /* out[t] += Σ_j weights[t, j] · ye[row[t, j]], j in order (row, weights: host [T, k]); row and weights NULL
     * after moe_device (returning 1): row[t, j] = t·k + j, and the weights its router computed */
    void (*moe_combine)(void *ctx, float *out, const float *ye, const int32_t *row, const float *weights, int T,
                        int k, int h);

    /* ---- optional (NULL where a backend has none: CPU and Metal have argmax alone): decode without the host inside
     * a step */
    /* The routed experts of MoE layer `layer` on the device alone, where the backend's own expert cache (CUDA's
     * VRAM tier) holds every expert of the layer for good: route's choices of logits [T, E], and each choice's
     * expert FFN on its token of xn [T, h] into row t·k + j of ye, the bits experts would give it. Nothing comes
     * back to the host first: the choices reach idx (host [T, k]) by the time finish() returns, for the core's
     * counts. Returns
     *   0 when it cannot (an expert not held, too many tokens): nothing issued, and the core routes on the host;
     *   1 routed: the core then runs the shared expert into out, and moe_combine with no rows adds the choices;
     *   2 routed with `shared` folded in (offered where not NULL; a backend may decline, returning 1): out [T, h]
     *     written with the layer's whole output, the bits of those two steps (the shared expert's FFN, then
     *     out *= sigmoid(gate_row · xn) as gate_rows, then the weighted choices added as moe_combine), and the core
     *     issues nothing more for the layer. ye then holds T·(k + 1) rows (its row T·k + t: token t's shared FFN).
     * The core offers any T up to the segment (ye of segment·(k + 1) rows); a backend may take decode's few tokens
     * alone (T <= FM_DEVICE_ROUTE_T, 8: CUDA's one-token experts) or prompts too (CUDA's moe_prompt: the choices
     * grouped by expert on the device, the shared expert as one more expert of every token). */
    int (*moe_device)(void *ctx, int layer, const float *logits, int T, int E, int k, int norm, const float *xn,
                      float *ye, int h, int32_t *idx, const fm_shared_expert *shared, float *out);
    /* A one-token decode step's ops (embed to the logits' matmul, not the copy to the host) recorded once and
     * replayed (CUDA graphs). step_begin before them: 1 when it replayed a recording valid for this token and
     * position, and the core issues none of them (everything they would write is written, moe_device's idx
     * included); else 0, and the core issues them, then calls step_end. With `record` (the core asks when its
     * last step ran without the host: every MoE layer on moe_device) the backend may record them instead of
     * running them: step_end returns 1 once the step has run (recorded, or as issued), 0 when a recording
     * failed and nothing ran, and the core issues the step once more (it then runs as issued). */
    int (*step_begin)(void *ctx, int32_t token, int pos, int record);
    int (*step_end)(void *ctx);
    /* Copy experts work[0..n_work) (their tok, n and row0 unused) into the backend's own expert cache ahead of any
     * use, where that cache is to hold every expert of the model (CUDA's VRAM tier, when gpu_memory_budget leaves
     * room for all of them and a margin for scratch), so that moe_device runs from the first token: returns 1 once
     * they are in (their host memory free for reuse), 0 when it keeps no such cache (nothing copied; the core
     * offers no more). A failure is reported by the next finish(). The core offers every expert once, at load. */
    int (*experts_preload)(void *ctx, const fm_expert_work *work, int n_work);
    /* *out (host, on return, as to_host copies): the greedy token of x [n] (device, n <= the vocabulary): the
     * lowest id holding the largest value, NaN never, 0 when all are NaN: fm_sampler_sample's argmax, so that a
     * greedy step copies 4 bytes back, not the logits. A failure is reported by the next finish(). */
    void (*argmax)(void *ctx, int32_t *out, const float *x, int n);
    /* route's choices of logits [T, E] issued without waiting for them: returns 1 when it did (the core then issues
     * the shared expert, and route with the same arguments waits for the choices alone, so that the device runs
     * the shared expert while the host groups the choices), 0 when not (nothing issued; route does it all). */
    int (*route_begin)(void *ctx, const float *logits, int T, int E, int k, int norm);
} fm_backend_ops;

/* A backend instance: the table and its state for one model. */
typedef struct {
    const fm_backend_ops *op;
    void *ctx;
} fm_backend;

/* Call op `name` of backend instance b: FM_OP(b, matmul, &w, x, T, y). */
#define FM_OP(b, name, ...) ((b)->op->name((b)->ctx, ##__VA_ARGS__))

/* The backends built into this library, by name; NULL (and an error naming the built ones) otherwise.
 * NULL, "" and "auto" name the default: "metal" where it is built (Apple, FLASHMOE_METAL), this machine
 * has a Metal device and the backend has every op; otherwise "cpu". */
const fm_backend_ops *fm_backend_find(const char *name);
/* The first op a table leaves out, NULL when it has every one (a model needs them all; the op tests
 * skip an op a table lacks). */
const char *fm_backend_missing_op(const fm_backend_ops *ops);
/* Comma-separated names of the built backends, e.g. "cpu". */
const char *fm_backend_names(void);
/* 1 when backend `name` is built and this machine has its device (a CUDA build on a machine without a GPU:
 * 0), so that tests can skip what cannot run here. */
int fm_backend_has_device(const char *name);
fm_status fm_backend_open(const fm_backend_ops *ops, const fm_backend_params *p, fm_backend *out);
void fm_backend_close(fm_backend *b);

/* Each backend's table (a backend not built has none). */
const fm_backend_ops *fm_backend_cpu(void);
const fm_backend_ops *fm_backend_metal(void); /* builds with FLASHMOE_METAL (metal/metal_ops.c) */
const fm_backend_ops *fm_backend_cuda(void);  /* builds with FLASHMOE_CUDA (cuda/cuda_ops.cu) */

#endif /* FM_BACKEND_H */
