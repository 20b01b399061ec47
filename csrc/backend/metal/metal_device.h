/*
 * metal_device.h — what the Metal backend's table (metal_ops.c, plain C) asks of the GPU: memory the host
 * and the GPU share, one compute encoder's bindings and dispatches, command buffers and their status.
 *
 * Two implementations, so that everything above this line runs in tests on Linux:
 *   - metal_host.m: Metal itself (MTLDevice, newBufferWithBytesNoCopy, MTLComputeCommandEncoder);
 *   - tests/metal_emu/device_emu.cpp: the CPU grid emulator (the same kernels compiled as C++).
 * The argument structs (metal/fm_metal_args.h) and the grids (metal/fm_metal_grid.h) are computed above
 * this line, in metal_ops.c, once for both.
 *
 * Memory is unified: an allocation is host memory the GPU reads and writes in place (Apple Silicon's
 * MTLStorageModeShared). The host may touch it only when no command buffer that uses it is in flight:
 * metal_ops.c waits (fm_mtl_wait) before it reads results or overwrites inputs.
 *
 * Ops are encoded into the open command buffer; fm_mtl_commit sends it to the GPU and opens the next one.
 * Command buffers run in commit order, each op after the ones before it (one serial queue; the encoder is
 * a serial compute encoder, so a dispatch sees the writes of the dispatches before it).
 */
#ifndef FM_METAL_DEVICE_H
#define FM_METAL_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#include "flashmoe.h"
#include "fm_metal_grid.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fm_mtl fm_mtl;

/* The kernels, by the name of their `kernel` function in the shaders of metal/ (fm_mtl_kernel_name). */
#define FM_MTL_KERNELS(X)                                                                                  \
    X(ADD, "fm_add")                                                                                       \
    X(RMSNORM, "fm_rmsnorm")                                                                               \
    X(L2NORM, "fm_l2norm")                                                                                 \
    X(ROPE, "fm_rope")                                                                                     \
    X(SILU_MUL, "fm_silu_mul")                                                                             \
    X(SIGMOID_MUL, "fm_sigmoid_mul")                                                                       \
    X(QMV_Q4, "fm_qmv_q4")                                                                                 \
    X(QMV_Q8, "fm_qmv_q8")                                                                                 \
    X(SPLIT_Q_GATE, "fm_split_q_gate")                                                                     \
    X(KV_WRITE, "fm_kv_write")                                                                             \
    X(GATE_ROWS, "fm_gate_rows")                                                                           \
    X(DELTANET_GATES, "fm_deltanet_gates")                                                                 \
    X(DELTANET_SPLIT, "fm_deltanet_split")                                                                 \
    X(CONV1D_SILU, "fm_conv1d_silu")                                                                       \
    X(MOE_COMBINE, "fm_moe_combine")                                                                       \
    X(EMBED_F32, "fm_embed_f32")                                                                           \
    X(EMBED_BF16, "fm_embed_bf16")                                                                         \
    X(EMBED_Q8, "fm_embed_q8")                                                                             \
    X(EMBED_Q4, "fm_embed_q4")                                                                             \
    X(ROUTE, "fm_route")                                                                                   \
    X(ATTENTION, "fm_attention")                                                                           \
    X(ATTENTION_SPLIT, "fm_attention_split")                                                               \
    X(ATTENTION_MERGE, "fm_attention_merge")                                                               \
    X(GATED_DELTA, "fm_gated_delta")                                                                       \
    X(QMM_Q4, "fm_qmm_q4")                                                                                 \
    X(QMM_Q8, "fm_qmm_q8")                                                                                 \
    X(MV_F32, "fm_mv_f32")                                                                                 \
    X(MM_F32, "fm_mm_f32")                                                                                 \
    X(MV_BF16, "fm_mv_bf16")                                                                               \
    X(MM_BF16, "fm_mm_bf16")                                                                               \
    X(QUANTIZE_X, "fm_quantize_x")                                                                         \
    X(QMV_Q4_I8, "fm_qmv_q4_i8")                                                                           \
    X(QMM_Q4_I8, "fm_qmm_q4_i8")                                                                           \
    X(QMV_Q8_I8, "fm_qmv_q8_i8")                                                                           \
    X(QMM_Q8_I8, "fm_qmm_q8_i8")                                                                           \
    X(GATHER_ROWS, "fm_gather_rows")

typedef enum {
#define FM_MTL_ENUM(id, name) FM_K_##id,
    FM_MTL_KERNELS(FM_MTL_ENUM)
#undef FM_MTL_ENUM
    FM_K_COUNT
} fm_mtl_kernel;

const char *fm_mtl_kernel_name(fm_mtl_kernel k);

/* Whether this machine has a Metal device (MTLCreateSystemDefaultDevice), probed once: the backend
 * registry's default (backend.c) asks it before choosing "metal". Apple builds only (metal_host.m). */
int fm_mtl_available(void);

/* The GPU, its queue and every kernel's pipeline (compiled from the shader source at open); on failure
 * *out is NULL and fm_last_error says why. */
fm_status fm_mtl_open(fm_mtl **out);
void fm_mtl_close(fm_mtl *d);
/* How many bytes the GPU may hold resident (Metal: recommendedMaxWorkingSetSize, which the wired limit
 * iogpu.wired_limit_mb bounds), 0 if unknown; d may be NULL (before a model opens its instance): the
 * system's default device. */
uint64_t fm_mtl_working_set_limit(fm_mtl *d);

/* ---- memory */
/* Shared memory of `bytes`, 16 KiB aligned (a page on Apple Silicon: what newBufferWithBytesNoCopy needs),
 * zeroed; NULL when out of memory. */
void *fm_mtl_alloc(fm_mtl *d, size_t bytes);
void fm_mtl_free(fm_mtl *d, void *p, size_t bytes);
/* Host memory (16 KiB aligned; its length is rounded up to whole 16 KiB pages, the VM page on Apple
 * Silicon, so the last page is mapped whatever the length) made visible to the GPU in place until
 * fm_mtl_unwrap; its address is unchanged. 0 on success. */
int fm_mtl_wrap(fm_mtl *d, void *host, size_t bytes);
void fm_mtl_unwrap(fm_mtl *d, void *host, size_t bytes);

/* ---- encoding: the bindings of the next dispatch, then the dispatch (dispatchThreadgroups) */
/* [[buffer(index)]] = p, an address inside an allocation or a wrapped range (the device finds which) */
void fm_mtl_set_buffer(fm_mtl *d, int index, const void *p);
/* [[buffer(index)]] = a copy of len bytes (setBytes: small argument structs, at most 4 KiB) */
void fm_mtl_set_bytes(fm_mtl *d, int index, const void *p, size_t len);
void fm_mtl_dispatch(fm_mtl *d, fm_mtl_kernel k, const fm_metal_grid *g);

/* ---- command buffers */
/* Send the open command buffer to the GPU (an empty one is not sent); its serial, or the last one's. */
uint64_t fm_mtl_commit(fm_mtl *d);
/* Wait until every command buffer up to `serial` has completed; FM_OK, or the first failure among them
 * (an error status of a command buffer: FM_ERR_DEVICE, fm_fail's message naming the error), reported once. */
fm_status fm_mtl_wait(fm_mtl *d, uint64_t serial);

#ifdef __cplusplus
}
#endif

#endif /* FM_METAL_DEVICE_H */
