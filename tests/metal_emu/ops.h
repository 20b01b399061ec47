/* ops.h — the emulated Metal backend's ops (ops.cpp). */
#ifndef FM_EMU_OPS_H
#define FM_EMU_OPS_H

#include <stddef.h>
#include <stdint.h>

void fm_emu_add(float *x, const float *y, size_t n);
void fm_emu_rmsnorm(float *out, const float *x, const float *w, int T, int n, float eps, int zero_centered);
/* y[T, rows] = x[T, cols] · Wᵀ, W q4 (bits 4) or q8 with fp16 or (scale_bf16) bfloat16 scales and biases
 * (fm_metal_args.h's layout): cpu.h's fm_cpu_matmul with fp32 activations */
void fm_emu_matmul_q(int bits, const uint8_t *q, const uint16_t *scales, const uint16_t *biases, int rows,
                     int cols, int group_size, int scale_bf16, const float *x, int T, float *y);
void fm_emu_silu_mul(float *out, const float *gate, const float *up, int T, int n);
void fm_emu_sigmoid_mul(float *out, const float *gate, const float *x, int T, int n);
void fm_emu_l2norm(float *x, int T, int n, float eps, float scale);
void fm_emu_rope(float *x, int T, int heads, int head_dim, int rot_dim, int pos0, float theta);

#endif
