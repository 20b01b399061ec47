/* matmul.h — the CPU matmul driver's interface to its per-ISA row kernels. */
#ifndef FM_CPU_MATMUL_H
#define FM_CPU_MATMUL_H

#include "../ops.h"

/* Up to this many tokens, quantized rows are dotted straight from their packed form (no dequantized
 * copy); above it, rows are dequantized once and multiplied in register tiles. */
enum { FM_FUSED_MAX_TOKENS = 8 };

typedef struct {
    const fm_mat *w;
    const float *x;    /* [T, cols] */
    const float *xp;   /* [T, cols] x permuted per 32-element block (evens, then odds), for q4; else NULL */
    const float *xsum; /* [T, ng] per-group sums of x, for quantized w and T <= FM_FUSED_MAX_TOKENS; else NULL */
    /* int8 activations (ops.h), else NULL: */
    const int8_t *xq;  /* [T, cols] x quantized per group (permuted like xp for q4 in the SIMD kernels) */
    const float *xd;   /* [T, ng] each group's step: x ≈ xd·xq */
    const float *xqs;  /* [T, ng] Σ xq per group (exact in fp32), for the bias term */
    float *y;          /* [T, rows] */
    int T;
    int rows_per_task;
} fm_matmul_args;

/* Rows [r0, r1) of y; rowbuf has room for 4 rows of cols floats. */
void fm_matmul_rows_scalar(const fm_matmul_args *a, int r0, int r1, float *rowbuf);

#if defined(__x86_64__) || defined(_M_X64)
#define FM_HAVE_AVX2_KERNELS 1
int fm_matmul_avx2_supports(const fm_mat *w);
void fm_matmul_rows_avx2(const fm_matmul_args *a, int r0, int r1, float *rowbuf);
/* AVX-512 VNNI: int8 activations with group sizes that are multiples of 64; the rest goes to AVX2. */
int fm_matmul_avx512_supports_int8(const fm_mat *w);
void fm_matmul_rows_avx512(const fm_matmul_args *a, int r0, int r1, float *rowbuf);
#endif

#if defined(__aarch64__)
#define FM_HAVE_NEON_KERNELS 1
int fm_matmul_neon_supports(const fm_mat *w);
void fm_matmul_rows_neon(const fm_matmul_args *a, int r0, int r1, float *rowbuf);
/* Armv8.2 dot product (SDOT): int8 activations; the rest goes to the NEON kernels. */
void fm_matmul_rows_neon_dot(const fm_matmul_args *a, int r0, int r1, float *rowbuf);
#endif

#endif /* FM_CPU_MATMUL_H */
