/* ops.h — the emulated Metal backend's ops (ops.cpp). */
#ifndef FM_EMU_OPS_H
#define FM_EMU_OPS_H

#include <stddef.h>
#include <stdint.h>

void fm_emu_add(float *x, const float *y, size_t n);
void fm_emu_rmsnorm(float *out, const float *x, const float *w, int T, int n, float eps, int zero_centered);
/* y[T, rows] = x[T, cols] · Wᵀ, W q4 with fp16 scales and biases (fm_metal_args.h's layout) */
void fm_emu_matmul_q4(const uint8_t *q, const uint16_t *scales, const uint16_t *biases, int rows, int cols,
                      int group_size, const float *x, int T, float *y);

#endif
