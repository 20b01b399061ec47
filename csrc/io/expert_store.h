/*
 * expert_store.h — routed experts, read one blob at a time from the per-layer expert files.
 *
 * Each (layer, expert) is one contiguous blob at 16384 + e * stride in experts/L###.bin holding gate,
 * up and down with their scales (docs/FORMAT.md). The store keeps up to n_slots blobs in memory in a
 * slot pool and evicts the least recently used one when a new blob must be read. A blob is read with
 * one pread; a short read or a checksum mismatch is an error naming the layer and expert, and the
 * expert is never used.
 */
#ifndef FM_EXPERT_STORE_H
#define FM_EXPERT_STORE_H

#include <stdint.h>

#include "../backend/ops.h"

typedef struct fm_expert_store fm_expert_store;

typedef struct {
    fm_mat gate, up, down; /* [I, H], [I, H], [H, I] views into the blob */
} fm_expert;

fm_status fm_expert_store_init(fm_expert_store **out, const fm_load_spec *spec);
void fm_expert_store_free(fm_expert_store *s);

/* Make expert e of layer resident and return views of its weights. The views stay valid until the
 * next call to fm_expert_store_get. */
fm_status fm_expert_store_get(fm_expert_store *s, int layer, int e, fm_expert *out);

/* Cumulative counters. */
void fm_expert_store_counters(const fm_expert_store *s, uint64_t *hits, uint64_t *misses, uint64_t *bytes,
                              double *io_seconds);

#endif /* FM_EXPERT_STORE_H */
