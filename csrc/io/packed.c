/* packed.c — preamble checks and reading the dense file. */
#define _GNU_SOURCE
#include "packed.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../core/util.h"

static uint32_t rd32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32; }

fm_status fm_packed_check_preamble(const uint8_t *pre, const char *path, uint32_t kind, uint32_t layer,
                                   uint32_t n_experts, uint64_t payload) {
    if (memcmp(pre, "FLASHMOE", 8) != 0) return fm_fail(FM_ERR_FORMAT, "%s: bad magic (not a flashmoe file)", path);
    if (rd32(pre + 8) != FM_FORMAT_VERSION)
        return fm_fail(FM_ERR_FORMAT, "%s: format version %u, this build reads version %d", path, rd32(pre + 8),
                       FM_FORMAT_VERSION);
    if (rd32(pre + 12) != kind) return fm_fail(FM_ERR_FORMAT, "%s: file kind %u, expected %u", path, rd32(pre + 12), kind);
    if (rd64(pre + 16) != payload)
        return fm_fail(FM_ERR_FORMAT, "%s: preamble payload %llu bytes, header says %llu", path,
                       (unsigned long long)rd64(pre + 16), (unsigned long long)payload);
    if (rd32(pre + 24) != layer) return fm_fail(FM_ERR_FORMAT, "%s: preamble layer %u, expected %u", path, rd32(pre + 24), layer);
    if (rd32(pre + 28) != n_experts)
        return fm_fail(FM_ERR_FORMAT, "%s: preamble says %u experts, expected %u", path, rd32(pre + 28), n_experts);
    for (int i = FM_PREAMBLE_FIELDS; i < FM_PREAMBLE_SIZE; i++) /* reserved: a later version may use them */
        if (pre[i])
            return fm_fail(FM_ERR_FORMAT, "%s: preamble byte %d is not zero (bytes %d..%d are reserved)", path, i,
                           FM_PREAMBLE_FIELDS, FM_PREAMBLE_SIZE - 1);
    return FM_OK;
}

fm_status fm_packed_read_dense(const char *path, uint64_t size, const uint32_t *crc, uint8_t **out) {
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fm_fail(FM_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    struct stat st;
    fm_status status = FM_OK;
    uint8_t pre[FM_PREAMBLE_SIZE];
    uint8_t *buf = NULL;
    if (fstat(fd, &st) != 0 || (uint64_t)st.st_size != size || size < FM_PREAMBLE_SIZE) {
        status = fm_fail(FM_ERR_FORMAT, "%s is %lld bytes, header says %llu (truncated or corrupt)", path,
                         (long long)st.st_size, (unsigned long long)size);
        goto done;
    }
    if (pread(fd, pre, sizeof pre, 0) != (ssize_t)sizeof pre) {
        status = fm_fail(FM_ERR_IO, "%s: cannot read preamble", path);
        goto done;
    }
    status = fm_packed_check_preamble(pre, path, FM_KIND_DENSE, 0xFFFFFFFFu, 0, size - FM_PREAMBLE_SIZE);
    if (status != FM_OK) goto done;
    const uint64_t n = size - FM_PREAMBLE_SIZE;
    buf = (uint8_t *)fm_alloc_weights(n); /* every byte is read into below */
    if (!buf) {
        status = fm_fail(FM_ERR_NOMEM, "%s: cannot allocate %llu bytes for dense weights", path, (unsigned long long)n);
        goto done;
    }
    for (uint64_t done = 0; done < n;) {
        ssize_t got = pread(fd, buf + done, n - done > (1u << 30) ? (1u << 30) : n - done, (off_t)(FM_PREAMBLE_SIZE + done));
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
            status = fm_fail(FM_ERR_IO, "%s: short read %llu of %llu bytes", path, (unsigned long long)done,
                             (unsigned long long)n);
            goto done;
        }
        done += (uint64_t)got;
    }
    if (crc) {
        const uint32_t got = fm_crc32(0, buf, n);
        if (got != *crc) {
            status = fm_fail(FM_ERR_FORMAT, "%s: checksum mismatch (crc32 %08x, header says %08x)", path, got, *crc);
            goto done;
        }
    }
    /* The dense weights now live in our buffer: drop their page-cache copy, which counts against a
     * memory limit (cgroup) until reclaimed. */
#ifdef POSIX_FADV_DONTNEED
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
#endif
done:
    close(fd);
    if (status != FM_OK) {
        fm_free(buf);
        buf = NULL;
    }
    *out = buf;
    return status;
}

uint64_t fm_tensor_scale_bytes(fm_dtype dtype, int64_t rows, int64_t cols, int group_size) {
    if (dtype != FM_Q4 && dtype != FM_Q8) return 0;
    return (uint64_t)rows * (uint64_t)(cols / group_size) * 2;
}

void fm_mat_view(const fm_tensor_desc *d, const uint8_t *base, uint64_t origin, int int8_act, fm_mat *out) {
    const int quant = d->dtype == FM_Q4 || d->dtype == FM_Q8;
    out->dtype = d->dtype;
    out->rows = (int)d->shape[0];
    out->cols = d->ndim == 2 ? (int)d->shape[1] : 1;
    out->group_size = d->group_size;
    out->int8_act = int8_act;
    out->scale_bf16 = quant && d->scale_bf16;
    out->data = base + (d->offset - origin);
    out->scales = quant ? (const uint16_t *)(base + (d->scales_offset - origin)) : NULL;
    out->biases = quant ? (const uint16_t *)(base + (d->biases_offset - origin)) : NULL;
}
