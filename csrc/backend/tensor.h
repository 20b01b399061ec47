/*
 * tensor.h — the weight matrix view every backend's ops take.
 *
 * A weight matrix is an fm_mat view: [rows = out, cols = in], y = W x (nn.Linear convention). Its
 * pointers are the backend's addresses of the data (host memory on the CPU and on Apple's unified
 * memory; device memory on CUDA).
 */
#ifndef FM_TENSOR_H
#define FM_TENSOR_H

#include <stdint.h>

#include "flashmoe.h"

typedef struct {
    fm_dtype dtype;
    int rows, cols, group_size;
    const void *data;        /* f32, bf16, or packed q (uint8) */
    const uint16_t *scales;  /* fp16 or bf16 [rows, cols / group_size], quantized only */
    const uint16_t *biases;  /* the same dtype as scales, [rows, cols / group_size], quantized only */
    int int8_act;            /* quantize activations to int8 per weight group (a numerics option: cpu/cpu.h) */
    int scale_bf16;          /* scales and biases are bfloat16 bits, else float16 */
} fm_mat;

/* Size in bytes of the data of a rows × cols tensor of dtype (q4: two values per byte). */
static inline uint64_t fm_tensor_data_bytes(fm_dtype dtype, int64_t rows, int64_t cols) {
    const uint64_t n = (uint64_t)rows * (uint64_t)cols;
    switch (dtype) {
    case FM_F32: return n * 4;
    case FM_BF16: return n * 2;
    case FM_Q8: return n;
    case FM_Q4: return n / 2;
    }
    return 0;
}

#endif /* FM_TENSOR_H */
