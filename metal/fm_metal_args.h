/*
 * fm_metal_args.h — the argument structs of the Metal kernels, one header for the shaders (MSL), the
 * Objective-C host and the CPU emulator (C/C++). Plain structs of 32-bit fields, so the layout is the same
 * in all three; the host passes each with setBytes at the kernel's [[buffer(n)]] index.
 * Also the kernels' fixed shapes, which the grid computations (fm_metal_grid.h) must agree with.
 */
#ifndef FM_METAL_ARGS_H
#define FM_METAL_ARGS_H

#ifndef __METAL_VERSION__
#include <stdint.h> /* MSL has the fixed-width types in <metal_stdlib> */
#endif

#define FM_METAL_SIMD 32            /* lanes per simdgroup on every Apple GPU */
#define FM_QMV_SIMDGROUPS 2         /* q4 matvec: simdgroups per threadgroup (MLX qmv_fast) */
#define FM_QMV_ROWS_PER_SIMD 4      /* rows each simdgroup reduces */
#define FM_QMV_VALUES_PER_LANE 16   /* consecutive weights per lane per step (8 bytes of q4) */
#define FM_RMSNORM_MAX_THREADS 256  /* threads per row of rmsnorm */
#define FM_ADD_THREADS 256

/* x[n] += y[n] */
typedef struct {
    uint32_t n;
} fm_add_args;

/* out[T, n] = x * rsqrt(mean(x²) + eps) * (zero_centered ? 1 + w : w); one threadgroup per row */
typedef struct {
    uint32_t n;
    float eps;
    uint32_t zero_centered;
} fm_rmsnorm_args;

/* y[T, rows] = x[T, cols] · Wᵀ, W q4 affine: byte j of a row holds elements 2j (low nibble) and 2j+1,
 * w = scale·q + bias with fp16 scale and bias per group of group_size elements of a row.
 * cols and group_size are multiples of FM_QMV_VALUES_PER_LANE. */
typedef struct {
    uint32_t rows, cols, group_size;
} fm_qmv_args;

#endif /* FM_METAL_ARGS_H */
