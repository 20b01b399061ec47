/* packed.h — the binary side of the packed format (docs/FORMAT.md): preambles and the dense file. */
#ifndef FM_PACKED_H
#define FM_PACKED_H

#include <stdint.h>

#include "flashmoe.h"
#include "../backend/tensor.h"

enum {
    FM_PREAMBLE_SIZE = 16384,
    FM_PREAMBLE_FIELDS = 32, /* bytes of the preamble that carry fields; the rest are zero */
    FM_FORMAT_VERSION = 1,
    FM_KIND_DENSE = 1,
    FM_KIND_EXPERTS = 2,
};

/* Check the preamble (all FM_PREAMBLE_SIZE bytes) of a packed binary file against what the header says. */
fm_status fm_packed_check_preamble(const uint8_t *pre, const char *path, uint32_t kind, uint32_t layer,
                                   uint32_t n_experts, uint64_t payload);

/* Read the whole of dense.bin (after checking its size and preamble) into a 64-byte aligned buffer,
 * and check its CRC-32 against *crc unless crc is NULL. Tensor offsets in the header are file offsets,
 * so the buffer is indexed by offset - preamble. */
fm_status fm_packed_read_dense(const char *path, uint64_t size, const uint32_t *crc, uint8_t **out);

/* Size in bytes of each of a tensor's scales/biases arrays (0 if unquantized); its data: ops.h's
 * fm_tensor_data_bytes. */
uint64_t fm_tensor_scale_bytes(fm_dtype dtype, int64_t rows, int64_t cols, int group_size);

/* The fm_mat view of tensor d in a buffer whose first byte is file offset `origin` (the dense buffer:
 * FM_PREAMBLE_SIZE; an expert blob: 0, its offsets being relative to the blob). */
void fm_mat_view(const fm_tensor_desc *d, const uint8_t *base, uint64_t origin, int int8_act, fm_mat *out);

#endif /* FM_PACKED_H */
