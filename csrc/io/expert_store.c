/*
 * expert_store.c — the slot pool, the cache policies and the I/O threads.
 *
 * Threading: the compute thread calls acquire/wait/release/predict; io_threads workers pop slot ids
 * from a FIFO queue and fill them with one pread each. One mutex guards all slot state; workers
 * broadcast `done` when a read finishes. A slot being read (LOADING) or pinned by the compute thread
 * is never evicted, so a worker owns its buffer until it publishes READY or FAILED.
 */
#define _GNU_SOURCE
#include "expert_store.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../core/util.h"
#include "packed.h"

enum { SLOT_FREE = 0, SLOT_LOADING, SLOT_READY, SLOT_FAILED };

/* What identifies a file's contents without reading them: a write through write(2) or a truncation
 * changes the times (Linux updates them before copying data in), a replacement changes the inode. */
typedef struct {
    uint64_t ino, size;
    int64_t mtime_ns, ctime_ns;
    char path[160];
} file_stamp;

static void stamp_of(const struct stat *st, file_stamp *out) {
    out->ino = (uint64_t)st->st_ino;
    out->size = (uint64_t)st->st_size;
#ifdef __APPLE__
    out->mtime_ns = (int64_t)st->st_mtimespec.tv_sec * 1000000000 + st->st_mtimespec.tv_nsec;
    out->ctime_ns = (int64_t)st->st_ctimespec.tv_sec * 1000000000 + st->st_ctimespec.tv_nsec;
#else
    out->mtime_ns = (int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec;
    out->ctime_ns = (int64_t)st->st_ctim.tv_sec * 1000000000 + st->st_ctim.tv_nsec;
#endif
}

typedef struct {
    int32_t key;        /* layer * n_experts + e, or -1 */
    int state;
    int pins;           /* > 0 while the compute thread uses or awaits it */
    int prefetched;     /* filled by a prefetch and not yet used */
    uint64_t last_use;  /* LRU clock */
    fm_status error_status; /* FAILED: FM_ERR_IO or FM_ERR_FORMAT (checksum) */
    fm_event free_after;    /* the compute that last read the slot: a new read waits for it */
    char error[256];    /* FAILED: what went wrong (room for the longest message with a file_stamp path) */
} slot_t;

struct fm_expert_store {
    int n_layers, n_experts, n_slots;
    uint64_t stride, blob_size;
    fm_tensor_desc desc[3]; /* gate, up, down; offsets relative to the blob */
    fm_cache_policy policy;
    int verify, prefetch, direct, int8_act;
    int *fds;               /* [n_layers] O_DIRECT when possible, -1 for layers without experts */
    int *fds_buffered;      /* [n_layers] fallback for O_DIRECT refusals */
    uint32_t *checksums;    /* [n_layers * n_experts] */
    file_stamp *stamps;     /* [n_layers] each experts file as opened: a read checks it is unchanged */

    const fm_backend *be;   /* owns the slot memory; its ops read the slots */
    uint8_t *pool;          /* [n_slots, stride] in backend memory (FM_MEM_EXPERT_SLOTS): what views point at */
    uint8_t *pool_host;     /* the same memory as the host sees it: what reads land in */
    slot_t *slots;
    /* The evictable slots (unpinned, not being read): the free ones on a stack, the others in a binary
     * min-heap by eviction order, so a miss finds its victim in O(log slots) (the 397B shape has
     * thousands of slots; a scan of all of them per miss, under the lock, would not scale). */
    int *free_stack, n_free;
    int *heap, n_heap;
    int *heap_pos;          /* [n_slots] index in heap, or -1 */
    int32_t *slot_of;       /* [n_layers * n_experts] -> slot or -1 */
    int *resident;          /* [n_layers + 1] experts of each layer with a slot (read or being read) */
    double *lfreq;          /* [n_layers * n_experts] LFRU: log2(decayed use count) + tick / half_life,
                             * a clock-free key: comparing it compares the decayed counts at any time */
    uint8_t *protect;       /* [n_layers * n_experts] predicted for the next layer */
    int32_t *protected_keys;
    int n_protected;
    uint64_t tick;
    double half_life;       /* LFRU: accesses for a use to count half */

    pthread_mutex_t mu;
    pthread_cond_t work, done;
    int *queue, q_head, q_len; /* FIFO of slot ids */
    pthread_t *threads;
    int n_threads, stop, in_flight;
    double busy_since;
    int fail_after, fail_count; /* test hook: fail `fail_count` reads after `fail_after` more good ones */
    int fail_corrupt;           /* ... by flipping a byte of what was read instead of an EIO */

    fm_store_counters c;
};

static void make_evictable(fm_expert_store *s, int slot); /* the policy's order, below */
static void rebuild_evictable(fm_expert_store *s);

uint64_t fm_expert_store_slot_bytes(const fm_load_spec *spec) { return spec->expert_stride; }

/* ---------------------------------------------------------------- reads (worker side) */

static int read_full(int fd, uint8_t *dst, uint64_t n, uint64_t off, uint64_t *done) {
    *done = 0;
    while (*done < n) {
        ssize_t got = pread(fd, dst + *done, n - *done, (off_t)(off + *done));
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) return errno;
        if (got == 0) return 0; /* short read: *done < n */
        *done += (uint64_t)got;
    }
    return 0;
}

/* 1 when the file behind fd is still the one opened at load: same inode, size and times. Called after a
 * read, so a write that had begun by then (its time stamp is set before its data lands) is seen. */
static int file_unchanged(int fd, const file_stamp *at_load) {
    struct stat st;
    file_stamp now;
    if (fstat(fd, &st) != 0) return 0;
    stamp_of(&st, &now);
    return now.ino == at_load->ino && now.size == at_load->size && now.mtime_ns == at_load->mtime_ns &&
           now.ctime_ns == at_load->ctime_ns;
}

/* inject_fault (the test hook): 1 fails the read with EIO, 2 flips a byte of what was read. */
static void read_slot(fm_expert_store *s, int slot, int key, int inject_fault) {
    const int layer = key / s->n_experts, e = key % s->n_experts;
    uint8_t *dst = s->pool_host + (size_t)slot * s->stride;
    const uint64_t off = FM_PREAMBLE_SIZE + (uint64_t)e * s->stride;
    FM_OP(s->be, wait, s->slots[slot].free_after); /* the compute that read the old expert has ended */
    uint64_t done = 0;
    int err = inject_fault == 1 ? EIO : read_full(s->fds[layer], dst, s->stride, off, &done);
    if (err == EINVAL && s->fds[layer] != s->fds_buffered[layer]) /* O_DIRECT refused here: buffered */
        err = read_full(s->fds_buffered[layer], dst, s->stride, off, &done);
#ifdef POSIX_FADV_DONTNEED
    if (s->fds[layer] == s->fds_buffered[layer] && s->policy != FM_CACHE_PAGECACHE)
        posix_fadvise(s->fds_buffered[layer], (off_t)off, (off_t)s->stride, POSIX_FADV_DONTNEED);
#endif
    char msg[sizeof s->slots[0].error] = "";
    fm_status status = FM_ERR_IO;
    if (err)
        snprintf(msg, sizeof msg, "layer %d expert %d: read failed at offset %llu: %s", layer, e,
                 (unsigned long long)(off + done), strerror(err));
    else if (done < s->stride)
        snprintf(msg, sizeof msg, "layer %d expert %d: short read %llu of %llu bytes", layer, e,
                 (unsigned long long)done, (unsigned long long)s->stride);
    else if (!s->verify && !file_unchanged(s->fds_buffered[layer], &s->stamps[layer])) {
        /* (with verify on, the checksum below judges the bytes themselves, changed file or not) */
        status = FM_ERR_FORMAT;
        snprintf(msg, sizeof msg, "layer %d expert %d: %s changed on disk since the model was loaded; load it again",
                 layer, e, s->stamps[layer].path);
    } else {
        if (inject_fault == 2) dst[s->blob_size / 2] ^= 0x20;
        /* every read, not only the first: a blob read again after eviction may have rotted since */
        const uint32_t crc = s->verify ? fm_crc32(0, dst, s->blob_size) : 0;
        if (s->verify && crc != s->checksums[key]) {
            status = FM_ERR_FORMAT;
            snprintf(msg, sizeof msg, "layer %d expert %d: checksum mismatch (crc32 %08x, header says %08x)", layer, e,
                     crc, s->checksums[key]);
        }
    }
    pthread_mutex_lock(&s->mu);
    slot_t *sl = &s->slots[slot];
    if (msg[0]) {
        sl->state = SLOT_FAILED;
        sl->error_status = status;
        memcpy(sl->error, msg, sizeof msg);
    } else {
        sl->state = SLOT_READY;
    }
    if (sl->pins == 0) make_evictable(s, slot); /* a prefetch nobody waits for yet */
    s->c.bytes_read += done;
    if (--s->in_flight == 0) s->c.io_busy_seconds += fm_now() - s->busy_since;
    pthread_cond_broadcast(&s->done);
    pthread_mutex_unlock(&s->mu);
}

static void *worker(void *arg) {
    fm_expert_store *s = (fm_expert_store *)arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (!s->stop && s->q_len == 0) pthread_cond_wait(&s->work, &s->mu);
        if (s->stop) break;
        const int slot = s->queue[s->q_head];
        s->q_head = (s->q_head + 1) % s->n_slots;
        s->q_len--;
        const int key = s->slots[slot].key;
        int inject = 0;
        if (s->fail_count > 0 && s->fail_after-- <= 0) {
            s->fail_after = 0;
            s->fail_count--;
            inject = s->fail_corrupt ? 2 : 1;
        }
        pthread_mutex_unlock(&s->mu);
        read_slot(s, slot, key, inject);
        pthread_mutex_lock(&s->mu);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* ---------------------------------------------------------------- init / free */

static fm_status open_layer(fm_expert_store *s, const fm_load_spec *spec, int l) {
    const char *path = spec->expert_paths ? spec->expert_paths[l] : NULL;
    if (!path) return fm_fail(FM_ERR_INVALID, "layer %d: no expert file given", l);
    s->fds_buffered[l] = open(path, O_RDONLY | O_CLOEXEC);
    if (s->fds_buffered[l] < 0) return fm_fail(FM_ERR_IO, "layer %d: cannot open %s: %s", l, path, strerror(errno));
    const uint64_t payload = (uint64_t)s->n_experts * s->stride;
    struct stat st;
    if (fstat(s->fds_buffered[l], &st) != 0 || (uint64_t)st.st_size != FM_PREAMBLE_SIZE + payload)
        return fm_fail(FM_ERR_FORMAT, "layer %d: %s is %lld bytes, expected %llu (truncated or corrupt)", l, path,
                       (long long)st.st_size, (unsigned long long)(FM_PREAMBLE_SIZE + payload));
    stamp_of(&st, &s->stamps[l]);
    const size_t n = strlen(path), keep = sizeof s->stamps[l].path - 1; /* the name's end says the most */
    memcpy(s->stamps[l].path, n > keep ? path + (n - keep) : path, (n > keep ? keep : n) + 1);
    uint8_t pre[FM_PREAMBLE_SIZE];
    if (pread(s->fds_buffered[l], pre, sizeof pre, 0) != (ssize_t)sizeof pre)
        return fm_fail(FM_ERR_FORMAT, "%s: truncated (no preamble)", path);
    fm_status r = fm_packed_check_preamble(pre, path, FM_KIND_EXPERTS, (uint32_t)l, (uint32_t)s->n_experts, payload);
    if (r != FM_OK) return r;
    s->fds[l] = s->fds_buffered[l];
    if (s->policy != FM_CACHE_PAGECACHE) {
        /* Bypass the page cache: the engine owns the cache. Blobs, offsets and buffers are 16 KiB
         * aligned. File systems without O_DIRECT (tmpfs) fall back to buffered reads + DONTNEED. */
#if defined(O_DIRECT)
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_DIRECT);
        if (fd >= 0) s->fds[l] = fd;
#elif defined(F_NOCACHE) /* macOS: no O_DIRECT; a second descriptor with caching off */
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd >= 0 && fcntl(fd, F_NOCACHE, 1) == 0)
            s->fds[l] = fd;
        else if (fd >= 0)
            close(fd);
#endif
    }
    return FM_OK;
}

fm_status fm_expert_store_init(fm_expert_store **out, const fm_load_spec *spec, int n_slots, const fm_backend *be) {
    const fm_config *c = &spec->config;
    fm_expert_store *s = (fm_expert_store *)calloc(1, sizeof *s);
    if (!s) return fm_fail(FM_ERR_NOMEM, "expert store: out of memory");
    *out = s;
    s->n_layers = c->num_hidden_layers;
    s->n_experts = c->num_experts;
    s->n_slots = n_slots < 1 ? 1 : n_slots;
    s->stride = spec->expert_stride;
    s->blob_size = spec->expert_blob_size;
    s->desc[0] = spec->expert_gate;
    s->desc[1] = spec->expert_up;
    s->desc[2] = spec->expert_down;
    s->policy = spec->cache_policy;
    s->verify = spec->verify_checksums;
    s->int8_act = spec->int8_activations;
    s->prefetch = spec->prefetch && spec->cache_policy != FM_CACHE_PAGECACHE;
    s->half_life = 2.0 * s->n_slots;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->work, NULL);
    pthread_cond_init(&s->done, NULL);

    const size_t n_keys = (size_t)s->n_layers * s->n_experts + 1;
    s->fds = (int *)malloc(sizeof(int) * (size_t)s->n_layers);
    s->fds_buffered = (int *)malloc(sizeof(int) * (size_t)s->n_layers);
    /* -1 at once: the free path closes what these hold, whichever allocation below fails */
    for (int l = 0; s->fds && l < s->n_layers; l++) s->fds[l] = -1;
    for (int l = 0; s->fds_buffered && l < s->n_layers; l++) s->fds_buffered[l] = -1;
    s->checksums = (uint32_t *)calloc(n_keys, sizeof(uint32_t));
    s->stamps = (file_stamp *)calloc((size_t)s->n_layers, sizeof(file_stamp));
    s->slot_of = (int32_t *)malloc(sizeof(int32_t) * n_keys);
    s->resident = (int *)calloc((size_t)s->n_layers + 1, sizeof(int));
    s->lfreq = (double *)malloc(n_keys * sizeof(double));
    s->protect = (uint8_t *)calloc(n_keys, 1);
    s->protected_keys = (int32_t *)malloc(sizeof(int32_t) * (size_t)(s->n_experts + 1));
    s->slots = (slot_t *)calloc((size_t)s->n_slots, sizeof(slot_t));
    s->queue = (int *)malloc(sizeof(int) * (size_t)s->n_slots);
    s->free_stack = (int *)malloc(sizeof(int) * (size_t)s->n_slots);
    s->heap = (int *)malloc(sizeof(int) * (size_t)s->n_slots);
    s->heap_pos = (int *)malloc(sizeof(int) * (size_t)s->n_slots);
    if (!s->fds || !s->fds_buffered || !s->checksums || !s->stamps || !s->slot_of || !s->resident || !s->lfreq ||
        !s->protect || !s->protected_keys || !s->slots || !s->queue || !s->free_stack || !s->heap || !s->heap_pos)
        return fm_fail(FM_ERR_NOMEM, "expert store: out of memory");
    for (size_t i = 0; i < n_keys; i++) {
        s->slot_of[i] = -1;
        s->lfreq[i] = -INFINITY; /* never used: a count of 0 */
    }
    for (int i = 0; i < s->n_slots; i++) s->slots[i].key = -1;
    rebuild_evictable(s); /* every slot free, the lowest index on top */
    if (spec->expert_checksums)
        memcpy(s->checksums, spec->expert_checksums, (n_keys - 1) * sizeof(uint32_t));

    int direct_all = 1, any = 0;
    for (int l = 0; l < s->n_layers; l++) {
        if (!c->layer_is_moe[l]) continue;
        fm_status st = open_layer(s, spec, l);
        if (st != FM_OK) return st;
        any = 1;
        direct_all &= s->fds[l] != s->fds_buffered[l];
    }
    s->c.direct_io = s->direct = any && direct_all;

    s->be = be; /* the backend's slot memory: 2 MiB aligned for O_DIRECT on the CPU */
    if ((s->pool = (uint8_t *)FM_OP(be, alloc, FM_MEM_EXPERT_SLOTS, (size_t)s->n_slots * s->stride)) &&
        !(s->pool_host = (uint8_t *)FM_OP(be, host_view, s->pool))) { /* the caller frees s */
        return fm_fail(FM_ERR_INVALID, "%s backend: expert slots the host cannot read into (staged reads are not "
                       "written yet)", be->op->name);
    }
    if (!s->pool)
        return fm_fail(FM_ERR_NOMEM, "expert store: cannot allocate %d slots of %llu bytes", s->n_slots,
                       (unsigned long long)s->stride);
    s->n_threads = spec->io_threads > 0 ? spec->io_threads : 8;
    s->threads = (pthread_t *)calloc((size_t)s->n_threads, sizeof(pthread_t));
    if (!s->threads) return fm_fail(FM_ERR_NOMEM, "expert store: out of memory");
    for (int i = 0; i < s->n_threads; i++)
        if (pthread_create(&s->threads[i], NULL, worker, s) != 0) {
            s->n_threads = i;
            return fm_fail(FM_ERR_NOMEM, "expert store: cannot start I/O thread %d", i);
        }
    return FM_OK;
}

void fm_expert_store_drain(fm_expert_store *s) {
    pthread_mutex_lock(&s->mu);
    while (s->q_len > 0 || s->in_flight > 0) pthread_cond_wait(&s->done, &s->mu);
    pthread_mutex_unlock(&s->mu);
}

void fm_expert_store_recover(fm_expert_store *s) {
    fm_expert_store_drain(s);
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < s->n_slots; i++) s->slots[i].pins = 0;
    for (int i = 0; i < s->n_protected; i++) s->protect[s->protected_keys[i]] = 0;
    s->n_protected = 0;
    rebuild_evictable(s);
    pthread_mutex_unlock(&s->mu);
}

void fm_expert_store_free(fm_expert_store *s) {
    if (!s) return;
    if (s->threads) {
        fm_expert_store_drain(s);
        pthread_mutex_lock(&s->mu);
        s->stop = 1;
        pthread_cond_broadcast(&s->work);
        pthread_mutex_unlock(&s->mu);
        for (int i = 0; i < s->n_threads; i++) pthread_join(s->threads[i], NULL);
    }
    for (int l = 0; l < s->n_layers; l++) {
        const int buffered = s->fds_buffered ? s->fds_buffered[l] : -1;
        if (s->fds && s->fds[l] >= 0 && s->fds[l] != buffered) close(s->fds[l]);
        if (buffered >= 0) close(buffered);
    }
    free(s->fds);
    free(s->fds_buffered);
    free(s->checksums);
    free(s->stamps);
    free(s->slot_of);
    free(s->resident);
    free(s->lfreq);
    free(s->protect);
    free(s->protected_keys);
    free(s->slots);
    free(s->queue);
    free(s->free_stack);
    free(s->heap);
    free(s->heap_pos);
    free(s->threads);
    if (s->pool) FM_OP(s->be, free, FM_MEM_EXPERT_SLOTS, s->pool, (size_t)s->n_slots * s->stride);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->work);
    pthread_cond_destroy(&s->done);
    free(s);
}

/* ---------------------------------------------------------------- policy (caller holds mu) */

/* LFRU keeps, per expert, the use count decayed by half every half_life accesses, in the log domain
 * with the clock folded in, so eviction compares keys without an exp per slot; touch pays one. */
static void touch(fm_expert_store *s, int slot, int key) {
    s->slots[slot].last_use = ++s->tick;
    const double now = (double)s->tick / s->half_life;
    s->lfreq[key] = log2(exp2(s->lfreq[key] - now) + 1.0) + now;
}

/* Eviction order: the lower (tier, score, last use) goes first, where tier is 1 for an expert predicted
 * for the next layer and score the LFRU key (nothing under LRU). last_use values are unique, so this is
 * a total order. */
static int evict_before(const fm_expert_store *s, int a, int b) {
    const slot_t *x = &s->slots[a], *y = &s->slots[b];
    const int ta = s->protect[x->key], tb = s->protect[y->key];
    if (ta != tb) return ta < tb;
    if (s->policy == FM_CACHE_LFRU && s->lfreq[x->key] != s->lfreq[y->key]) return s->lfreq[x->key] < s->lfreq[y->key];
    return x->last_use < y->last_use;
}

static void heap_set(fm_expert_store *s, int i, int slot) {
    s->heap[i] = slot;
    s->heap_pos[slot] = i;
}

static void heap_sift(fm_expert_store *s, int i) {
    const int slot = s->heap[i];
    while (i > 0 && evict_before(s, slot, s->heap[(i - 1) / 2])) { /* up */
        heap_set(s, i, s->heap[(i - 1) / 2]);
        i = (i - 1) / 2;
    }
    for (;;) { /* down */
        int c = 2 * i + 1;
        if (c >= s->n_heap) break;
        if (c + 1 < s->n_heap && evict_before(s, s->heap[c + 1], s->heap[c])) c++;
        if (!evict_before(s, s->heap[c], slot)) break;
        heap_set(s, i, s->heap[c]);
        i = c;
    }
    heap_set(s, i, slot);
}

/* A slot became evictable (unpinned and not being read): onto the free stack or into the heap. */
static void make_evictable(fm_expert_store *s, int slot) {
    if (s->slots[slot].key < 0) {
        s->free_stack[s->n_free++] = slot;
        return;
    }
    heap_set(s, s->n_heap++, slot);
    heap_sift(s, s->n_heap - 1);
}

/* A slot in the heap is pinned or refilled: out of the heap (free slots are only ever taken from the
 * top of their stack). */
static void take(fm_expert_store *s, int slot) {
    if (s->slots[slot].key < 0) {
        s->n_free--;
        return;
    }
    const int i = s->heap_pos[slot];
    if (i < 0) return;
    s->heap_pos[slot] = -1;
    const int last = s->heap[--s->n_heap];
    if (i < s->n_heap) {
        heap_set(s, i, last);
        heap_sift(s, i);
    }
}

/* An evictable slot's order may have changed (its expert's protection): restore the heap. */
static void reorder(fm_expert_store *s, int key) {
    const int slot = s->slot_of[key];
    if (slot >= 0 && s->heap_pos[slot] >= 0) heap_sift(s, s->heap_pos[slot]);
}

#ifdef FM_STORE_CHECK
/* The eviction order by a scan of every slot: what the stack and the heap must agree with. A build
 * with -DFM_STORE_CHECK checks it on every pick (bench/RESULTS.md says when the suite last ran so). */
static void check_victim(const fm_expert_store *s, int got) {
    int best = FM_SLOT_NONE, n_free = 0, n_evictable = 0;
    for (int i = 0; i < s->n_slots; i++) {
        const slot_t *sl = &s->slots[i];
        if (sl->pins > 0 || sl->state == SLOT_LOADING) continue;
        n_evictable++;
        if (sl->key < 0) n_free++;
        else if (best == FM_SLOT_NONE || evict_before(s, i, best)) best = i;
    }
    const int ok = n_free == s->n_free && n_evictable == s->n_free + s->n_heap &&
                   (n_free ? s->slots[got].key < 0 : got == best);
    if (!ok) {
        fprintf(stderr, "expert store: victim %d, a scan says %d (free %d/%d, evictable %d/%d)\n", got, best, n_free,
                s->n_free, n_evictable, s->n_free + s->n_heap);
        abort();
    }
}
#endif

/* The slot to refill (not taken yet): a free one, else the first in eviction order. */
static int pick_victim(const fm_expert_store *s) {
    const int slot = s->n_free > 0 ? s->free_stack[s->n_free - 1] : s->n_heap > 0 ? s->heap[0] : FM_SLOT_NONE;
#ifdef FM_STORE_CHECK
    check_victim(s, slot);
#endif
    return slot;
}

/* Every unpinned slot that is not being read back into the free stack and the heap (after recover). */
static void rebuild_evictable(fm_expert_store *s) {
    s->n_free = s->n_heap = 0;
    for (int i = s->n_slots - 1; i >= 0; i--) s->heap_pos[i] = -1;
    for (int i = s->n_slots - 1; i >= 0; i--)
        if (s->slots[i].pins == 0 && s->slots[i].state != SLOT_LOADING) make_evictable(s, i);
}

static void start_read(fm_expert_store *s, int slot, int key) {
    slot_t *sl = &s->slots[slot];
    if (sl->key >= 0) {
        s->slot_of[sl->key] = -1;
        s->resident[sl->key / s->n_experts]--;
    }
    s->resident[key / s->n_experts]++;
    sl->key = key;
    sl->state = SLOT_LOADING;
    sl->prefetched = 0;
    s->slot_of[key] = slot;
    s->queue[(s->q_head + s->q_len) % s->n_slots] = slot;
    s->q_len++;
    if (s->in_flight++ == 0) s->busy_since = fm_now();
    pthread_cond_signal(&s->work);
}

/* ---------------------------------------------------------------- compute-thread API */

int fm_expert_store_acquire(fm_expert_store *s, int layer, int e) {
    const int key = layer * s->n_experts + e;
    pthread_mutex_lock(&s->mu);
    int slot = s->slot_of[key];
    if (slot >= 0 && s->policy != FM_CACHE_PAGECACHE && s->slots[slot].state != SLOT_FAILED) {
        s->c.hits++;
        if (s->slots[slot].prefetched) s->c.prefetch_hits++;
        s->slots[slot].prefetched = 0;
        if (s->slots[slot].pins == 0) take(s, slot); /* no longer evictable (no-op while it is read) */
    } else {
        /* a failed or page-cache slot of this very expert, if it is evictable, else the policy's victim */
        slot = (slot >= 0 && s->slots[slot].pins == 0 && s->slots[slot].state != SLOT_LOADING) ? slot : pick_victim(s);
        while (slot == FM_SLOT_NONE) {
            /* Every slot is pinned or being read. Reads not pinned by the caller (prefetches) finish on
             * their own: wait for one. Only when the caller pins every slot must it release one first. */
            int unpinned_loading = 0;
            for (int i = 0; i < s->n_slots && !unpinned_loading; i++)
                unpinned_loading = s->slots[i].pins == 0 && s->slots[i].state == SLOT_LOADING;
            if (!unpinned_loading) {
                pthread_mutex_unlock(&s->mu);
                return FM_SLOT_NONE;
            }
            pthread_cond_wait(&s->done, &s->mu);
            slot = pick_victim(s);
        }
        s->c.misses++;
        take(s, slot);
        start_read(s, slot, key);
    }
    s->slots[slot].pins++;
    touch(s, slot, key);
    pthread_mutex_unlock(&s->mu);
    return slot;
}

fm_status fm_expert_store_wait_any(fm_expert_store *s, const int *slots, int n, int *which) {
    const double t0 = fm_now();
    fm_status st = FM_OK;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        int i = 0;
        for (; i < n; i++) {
            const int state = s->slots[slots[i]].state;
            if (state == SLOT_READY || state == SLOT_FAILED) break;
        }
        if (i < n) {
            *which = i;
            slot_t *sl = &s->slots[slots[i]];
            if (sl->state == SLOT_FAILED) {
                st = fm_fail(sl->error_status, "%s", sl->error);
                s->slot_of[sl->key] = -1; /* drop it: a failed read is never used */
                s->resident[sl->key / s->n_experts]--;
                sl->key = -1;
                sl->state = SLOT_FREE;
            }
            break;
        }
        pthread_cond_wait(&s->done, &s->mu);
    }
    s->c.io_wait_seconds += fm_now() - t0;
    pthread_mutex_unlock(&s->mu);
    return st;
}

int fm_expert_store_poll(fm_expert_store *s, const int *slots, int n, int *ready) {
    int k = 0;
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < n; i++)
        if (s->slots[slots[i]].state == SLOT_READY) ready[k++] = i;
    pthread_mutex_unlock(&s->mu);
    return k;
}

void fm_expert_store_view(const fm_expert_store *s, int slot, fm_expert *out) {
    const uint8_t *blob = s->pool + (size_t)slot * s->stride;
    fm_mat_view(&s->desc[0], blob, 0, s->int8_act, &out->gate);
    fm_mat_view(&s->desc[1], blob, 0, s->int8_act, &out->up);
    fm_mat_view(&s->desc[2], blob, 0, s->int8_act, &out->down);
}

void fm_expert_store_release(fm_expert_store *s, int slot, fm_event after) {
    pthread_mutex_lock(&s->mu);
    s->slots[slot].free_after = after;
    if (s->slots[slot].pins > 0 && --s->slots[slot].pins == 0 && s->slots[slot].state != SLOT_LOADING)
        make_evictable(s, slot);
    pthread_mutex_unlock(&s->mu);
}

int fm_expert_store_has(fm_expert_store *s, int layer, int e) {
    pthread_mutex_lock(&s->mu);
    const int has = layer >= 0 && layer < s->n_layers && e >= 0 && e < s->n_experts &&
                    s->slot_of[layer * s->n_experts + e] >= 0;
    pthread_mutex_unlock(&s->mu);
    return has;
}

int fm_expert_store_layer_resident(fm_expert_store *s, int layer) {
    pthread_mutex_lock(&s->mu);
    const int all = layer >= 0 && layer < s->n_layers && s->resident[layer] == s->n_experts;
    pthread_mutex_unlock(&s->mu);
    return all;
}

void fm_expert_store_predict(fm_expert_store *s, int layer, const int32_t *experts, int n) {
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < s->n_protected; i++) {
        s->protect[s->protected_keys[i]] = 0;
        reorder(s, s->protected_keys[i]);
    }
    s->n_protected = 0;
    if (layer < 0 || layer >= s->n_layers || s->fds[layer] < 0) {
        pthread_mutex_unlock(&s->mu);
        return;
    }
    /* Protect every predicted expert first, then read ahead: a resident expert late in the list must not
     * be evicted by the read ahead of an earlier one. */
    for (int i = 0; i < n && s->n_protected <= s->n_experts; i++) {
        const int key = layer * s->n_experts + experts[i];
        if (s->protect[key]) continue;
        s->protect[key] = 1;
        s->protected_keys[s->n_protected++] = key;
        reorder(s, key);
    }
    for (int i = 0; s->prefetch && i < s->n_protected; i++) {
        const int key = s->protected_keys[i];
        if (s->slot_of[key] >= 0) continue;
        /* Prefetch only into a slot holding nothing predicted: never displace a protected expert. */
        const int victim = pick_victim(s);
        if (victim == FM_SLOT_NONE || (s->slots[victim].key >= 0 && s->protect[s->slots[victim].key])) break;
        take(s, victim);
        start_read(s, victim, key);
        s->slots[victim].prefetched = 1;
        s->slots[victim].last_use = ++s->tick;
        s->c.prefetches++;
    }
    pthread_mutex_unlock(&s->mu);
}

void fm_expert_store_debug_fail_reads(fm_expert_store *s, int after, int count, int corrupt) {
    pthread_mutex_lock(&s->mu);
    s->fail_after = after > 0 ? after : 0;
    s->fail_count = count > 0 ? count : 0;
    s->fail_corrupt = corrupt;
    pthread_mutex_unlock(&s->mu);
}

void fm_expert_store_counters(const fm_expert_store *s, fm_store_counters *out) {
    pthread_mutex_lock((pthread_mutex_t *)&s->mu);
    *out = s->c;
    if (s->in_flight > 0) out->io_busy_seconds += fm_now() - s->busy_since;
    pthread_mutex_unlock((pthread_mutex_t *)&s->mu);
}
