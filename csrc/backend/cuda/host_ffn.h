/*
 * host_ffn.h — routed experts' FFNs on the host CPU with the bits the CUDA kernels would give (host_ffn.c): the
 * share of decode's VRAM misses that the CPU computes from the experts' pinned host slots instead of copying them
 * over PCIe first (cuda_experts.cu's host_pick / host_begin / host_finish, FLASHMOE_CUDA_HOST_EXPERTS).
 */
#ifndef FM_CUDA_HOST_FFN_H
#define FM_CUDA_HOST_FFN_H

#include <stdint.h>

#include "../tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One expert's FFN over n tokens: y row i (of out, h floats a row) = down(silu(gate x) · up x) for x row tok[i] of
 * xn */
typedef struct {
    const fm_mat *gate, *up, *down; /* [I, H], [I, H], [H, I] */
    const int32_t *tok;
    int n;
    float *out;
} fmh_job;

/* Whether the host replays these matrices' GPU arithmetic: q4 or q8 on int8 activations (matmul.cu's fm_mm int8
 * path: groups of 32·k up to 256), gate and up alike, down's columns gate's rows. */
int fmh_takes(const fm_mat *gate, const fm_mat *up, const fm_mat *down);

/* The jobs' FFNs (each fmh_takes) on the compute threads (threads.h); xn [·, h]. isa: 0 portable C, 1 AVX2 where
 * the CPU has it (the same bits either way). 0, or FM_ERR_NOMEM. */
int fmh_experts(const fmh_job *jobs, int n_jobs, const float *xn, int h, int isa);

#ifdef __cplusplus
}
#endif

#endif /* FM_CUDA_HOST_FFN_H */
