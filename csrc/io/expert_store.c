/* expert_store.c — per-layer expert files, a slot pool with LRU eviction, one pread per blob. */
#define _GNU_SOURCE
#include "expert_store.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../core/util.h"
#include "packed.h"

struct fm_expert_store {
    int n_layers, n_experts;
    uint64_t stride, blob_size;
    fm_tensor_desc desc[3]; /* gate, up, down; offsets relative to the blob */
    int *fds;               /* [n_layers], -1 for layers without routed experts */
    const uint32_t *checksums_src;
    uint32_t *checksums;    /* [n_layers * n_experts] */
    uint8_t *verified;      /* [n_layers * n_experts] */
    int verify;

    int n_slots;
    uint8_t *pool;          /* [n_slots, stride], 16 KiB aligned */
    int32_t *slot_of;       /* [n_layers * n_experts] -> slot or -1 */
    int32_t *slot_key;      /* [n_slots] -> layer * n_experts + e, or -1 */
    uint64_t *slot_tick;    /* [n_slots] last use */
    uint64_t tick;

    uint64_t hits, misses, bytes;
    double io_seconds;
};

static fm_status check_preamble(int fd, const char *path, int layer, int n_experts, uint64_t payload) {
    uint8_t pre[FM_PREAMBLE_FIELDS];
    ssize_t got = pread(fd, pre, sizeof pre, 0);
    if (got != (ssize_t)sizeof pre)
        return fm_fail(FM_ERR_FORMAT, "%s: truncated (no preamble)", path);
    return fm_packed_check_preamble(pre, path, FM_KIND_EXPERTS, (uint32_t)layer, (uint32_t)n_experts, payload);
}

fm_status fm_expert_store_init(fm_expert_store **out, const fm_load_spec *spec) {
    const fm_config *c = &spec->config;
    fm_expert_store *s = (fm_expert_store *)calloc(1, sizeof *s);
    if (!s) return fm_fail(FM_ERR_NOMEM, "expert store: out of memory");
    *out = s;
    s->n_layers = c->num_hidden_layers;
    s->n_experts = c->num_experts;
    s->stride = spec->expert_stride;
    s->blob_size = spec->expert_blob_size;
    s->desc[0] = spec->expert_gate;
    s->desc[1] = spec->expert_up;
    s->desc[2] = spec->expert_down;
    s->verify = spec->verify_checksums;
    const size_t n_total = (size_t)s->n_layers * s->n_experts;
    s->fds = (int *)malloc(sizeof(int) * (size_t)s->n_layers);
    s->checksums = (uint32_t *)calloc(n_total ? n_total : 1, sizeof(uint32_t));
    s->verified = (uint8_t *)calloc(n_total ? n_total : 1, 1);
    s->slot_of = (int32_t *)malloc(sizeof(int32_t) * (n_total ? n_total : 1));
    if (!s->fds || !s->checksums || !s->verified || !s->slot_of)
        return fm_fail(FM_ERR_NOMEM, "expert store: out of memory");
    for (size_t i = 0; i < n_total; i++) s->slot_of[i] = -1;
    if (spec->expert_checksums) memcpy(s->checksums, spec->expert_checksums, n_total * sizeof(uint32_t));

    int n_moe = 0;
    for (int l = 0; l < s->n_layers; l++) {
        s->fds[l] = -1;
        if (!c->layer_is_moe[l]) continue;
        n_moe++;
        const char *path = spec->expert_paths ? spec->expert_paths[l] : NULL;
        if (!path) return fm_fail(FM_ERR_INVALID, "layer %d: no expert file given", l);
        s->fds[l] = open(path, O_RDONLY | O_CLOEXEC);
        if (s->fds[l] < 0) return fm_fail(FM_ERR_IO, "layer %d: cannot open %s: %s", l, path, strerror(errno));
        struct stat st;
        const uint64_t payload = (uint64_t)s->n_experts * s->stride;
        if (fstat(s->fds[l], &st) != 0 || (uint64_t)st.st_size != FM_PREAMBLE_SIZE + payload)
            return fm_fail(FM_ERR_FORMAT, "layer %d: %s is %lld bytes, expected %llu (truncated or corrupt)", l,
                           path, (long long)st.st_size, (unsigned long long)(FM_PREAMBLE_SIZE + payload));
        fm_status st2 = check_preamble(s->fds[l], path, l, s->n_experts, payload);
        if (st2 != FM_OK) return st2;
    }

    int slots = spec->expert_cache_slots;
    const int all = n_moe * s->n_experts;
    if (slots <= 0 || slots > all) slots = all;
    if (slots < 1) slots = 1;
    s->n_slots = slots;
    if (posix_memalign((void **)&s->pool, FM_PREAMBLE_SIZE, (size_t)slots * s->stride) != 0) {
        s->pool = NULL;
        return fm_fail(FM_ERR_NOMEM, "expert store: cannot allocate %d slots of %llu bytes", slots,
                       (unsigned long long)s->stride);
    }
    s->slot_key = (int32_t *)malloc(sizeof(int32_t) * (size_t)slots);
    s->slot_tick = (uint64_t *)calloc((size_t)slots, sizeof(uint64_t));
    if (!s->slot_key || !s->slot_tick) return fm_fail(FM_ERR_NOMEM, "expert store: out of memory");
    for (int i = 0; i < slots; i++) s->slot_key[i] = -1;
    return FM_OK;
}

void fm_expert_store_free(fm_expert_store *s) {
    if (!s) return;
    if (s->fds)
        for (int l = 0; l < s->n_layers; l++)
            if (s->fds[l] >= 0) close(s->fds[l]);
    free(s->fds);
    free(s->checksums);
    free(s->verified);
    free(s->slot_of);
    free(s->pool);
    free(s->slot_key);
    free(s->slot_tick);
    free(s);
}

static void view(const fm_tensor_desc *d, const uint8_t *blob, fm_mat *m) {
    m->dtype = d->dtype;
    m->rows = (int)d->shape[0];
    m->cols = (int)d->shape[1];
    m->group_size = d->group_size;
    m->data = blob + d->offset;
    m->scales = (d->dtype == FM_Q4 || d->dtype == FM_Q8) ? (const uint16_t *)(blob + d->scales_offset) : NULL;
    m->biases = (d->dtype == FM_Q4 || d->dtype == FM_Q8) ? (const uint16_t *)(blob + d->biases_offset) : NULL;
}

static fm_status read_blob(fm_expert_store *s, int layer, int e, uint8_t *dst) {
    const uint64_t off = FM_PREAMBLE_SIZE + (uint64_t)e * s->stride;
    uint64_t done = 0;
    const double t0 = fm_now();
    while (done < s->stride) {
        ssize_t got = pread(s->fds[layer], dst + done, s->stride - done, (off_t)(off + done));
        if (got < 0 && errno == EINTR) continue;
        if (got < 0)
            return fm_fail(FM_ERR_IO, "layer %d expert %d: read failed at offset %llu: %s", layer, e,
                           (unsigned long long)(off + done), strerror(errno));
        if (got == 0)
            return fm_fail(FM_ERR_IO, "layer %d expert %d: short read %llu of %llu bytes", layer, e,
                           (unsigned long long)done, (unsigned long long)s->stride);
        done += (uint64_t)got;
    }
    s->io_seconds += fm_now() - t0;
    s->bytes += s->stride;
    const size_t key = (size_t)layer * s->n_experts + e;
    if (s->verify && !s->verified[key]) {
        const uint32_t crc = fm_crc32(0, dst, s->blob_size);
        if (crc != s->checksums[key])
            return fm_fail(FM_ERR_FORMAT, "layer %d expert %d: checksum mismatch (crc32 %08x, header says %08x)",
                           layer, e, crc, s->checksums[key]);
        s->verified[key] = 1;
    }
    return FM_OK;
}

fm_status fm_expert_store_get(fm_expert_store *s, int layer, int e, fm_expert *out) {
    if (layer < 0 || layer >= s->n_layers || s->fds[layer] < 0 || e < 0 || e >= s->n_experts)
        return fm_fail(FM_ERR_INVALID, "layer %d expert %d: no such routed expert", layer, e);
    const int32_t key = (int32_t)((size_t)layer * s->n_experts + e);
    int slot = s->slot_of[key];
    if (slot >= 0) {
        s->hits++;
    } else {
        s->misses++;
        /* LRU victim: an empty slot, else the least recently used one. */
        slot = 0;
        for (int i = 0; i < s->n_slots; i++) {
            if (s->slot_key[i] < 0) { slot = i; break; }
            if (s->slot_tick[i] < s->slot_tick[slot]) slot = i;
        }
        if (s->slot_key[slot] >= 0) s->slot_of[s->slot_key[slot]] = -1;
        s->slot_key[slot] = -1;
        fm_status st = read_blob(s, layer, e, s->pool + (size_t)slot * s->stride);
        if (st != FM_OK) return st; /* the slot stays empty: a failed read is never used */
        s->slot_key[slot] = key;
        s->slot_of[key] = slot;
    }
    s->slot_tick[slot] = ++s->tick;
    const uint8_t *blob = s->pool + (size_t)slot * s->stride;
    view(&s->desc[0], blob, &out->gate);
    view(&s->desc[1], blob, &out->up);
    view(&s->desc[2], blob, &out->down);
    return FM_OK;
}

void fm_expert_store_counters(const fm_expert_store *s, uint64_t *hits, uint64_t *misses, uint64_t *bytes,
                              double *io_seconds) {
    *hits = s->hits;
    *misses = s->misses;
    *bytes = s->bytes;
    *io_seconds = s->io_seconds;
}
