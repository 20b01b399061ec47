/*
 * expert_store.h — routed experts, streamed from the per-layer expert files into a slot pool.
 *
 * Each (layer, expert) is one contiguous blob at 16384 + e * stride in experts/L###.bin holding gate,
 * up and down with their scales (docs/FORMAT.md). The store owns n_slots blob-sized buffers (the
 * expert cache, sized from the memory budget) and a pool of I/O threads that read blobs with one
 * pread each, O_DIRECT where the file system allows it, many in flight at once.
 *
 * A layer uses it in three steps, so reads overlap compute:
 *   1. acquire each expert the router picked: a resident one is pinned at once (a hit); a missing
 *      one gets a slot (evicting by the cache policy) and its read is queued (a miss); when every slot
 *      is pinned, acquire returns FM_SLOT_NONE and the caller retries after releasing one;
 *   2. wait for any of the acquired slots to be ready, compute with it, release it; repeat;
 *   3. prefetch/protect the experts predicted for the next layer (optional).
 * A short read, an I/O error, a checksum mismatch (verify_checksums: every read is checked) or, without
 * verify_checksums, an experts file changed on disk since load (checked after every read: inode, size,
 * times) makes wait fail with a message naming the layer and expert; the slot is dropped, never used.
 */
#ifndef FM_EXPERT_STORE_H
#define FM_EXPERT_STORE_H

#include <stdint.h>

#include "../backend/backend.h"

typedef struct fm_expert_store fm_expert_store;

typedef struct {
    fm_mat gate, up, down; /* [I, H], [I, H], [H, I] views into the blob */
} fm_expert;

enum { FM_SLOT_NONE = -1 };

typedef struct {
    uint64_t hits, misses;      /* expert acquisitions served from memory / needing a read */
    uint64_t prefetches;        /* reads issued ahead of need from the next-layer prediction */
    uint64_t prefetch_hits;     /* hits on a slot that a prefetch filled */
    uint64_t bytes_read;
    double io_wait_seconds;     /* compute thread blocked waiting for a read */
    double io_busy_seconds;     /* wall time with at least one read in flight */
    int direct_io;              /* 1 when reads bypass the page cache with O_DIRECT */
} fm_store_counters;

/* n_slots: experts kept in memory (>= 1). */
/* The slot memory comes from the backend (FM_MEM_EXPERT_SLOTS), read into through its host view. */
fm_status fm_expert_store_init(fm_expert_store **out, const fm_load_spec *spec, int n_slots, const fm_backend *be);
void fm_expert_store_free(fm_expert_store *s);

int fm_expert_store_acquire(fm_expert_store *s, int layer, int e);
/* Block until one of slots[0..n) is ready; *which = its index. Fails if its read failed. */
fm_status fm_expert_store_wait_any(fm_expert_store *s, const int *slots, int n, int *which);
/* Without blocking: the indices i of slots[0..n) that are ready to compute now, into ready[]; returns
 * how many. (A failed read is not reported here: wait_any reports it.) */
int fm_expert_store_poll(fm_expert_store *s, const int *slots, int n, int *ready);
void fm_expert_store_view(const fm_expert_store *s, int slot, fm_expert *out);
/* Unpin a slot; `after`: the backend event after which the compute reading it has ended (a read into the
 * slot waits for it; 0: nothing pending). */
void fm_expert_store_release(fm_expert_store *s, int slot, fm_event after);

/* 1 when expert e of layer has a slot (read or being read). */
int fm_expert_store_has(fm_expert_store *s, int layer, int e);
/* 1 when every expert of layer has a slot (read or being read): predicting for it cannot help. */
int fm_expert_store_layer_resident(fm_expert_store *s, int layer);
/* Experts expected in the next layer: kept from eviction until the next call, and (when prefetch is
 * on) read now into slots that hold nothing more valuable. */
void fm_expert_store_predict(fm_expert_store *s, int layer, const int32_t *experts, int n);

/* Wait for every queued read to finish (before a reset, an error return, or freeing). */
void fm_expert_store_drain(fm_expert_store *s);
/* After a failed forward: drain, then unpin every slot and drop the next-layer protection, so the
 * store is as a fresh one would be but for what it caches. */
void fm_expert_store_recover(fm_expert_store *s);

/* Test hook: after `after` more reads succeed, the next `count` reads fail as a failing drive's would:
 * with EIO (never touching the disk), or when corrupt, with one byte of what was read flipped (only
 * verify_checksums notices). count 0 turns it off. */
void fm_expert_store_debug_fail_reads(fm_expert_store *s, int after, int count, int corrupt);

void fm_expert_store_counters(const fm_expert_store *s, fm_store_counters *out);

/* Bytes of one slot (the blob stride). */
uint64_t fm_expert_store_slot_bytes(const fm_load_spec *spec);

#endif /* FM_EXPERT_STORE_H */
