/* matmul.h — the CPU matmul driver's interface to its per-ISA row kernels. */
#ifndef FM_CPU_MATMUL_H
#define FM_CPU_MATMUL_H

#include "cpu.h"

/* Batch invariance: a kernel variant computes row r · token t in one order whatever T, the token's place in
 * the chunk, the rows it shares a task or tile with, or the thread count, so the outputs of a token are
 * bitwise the same in decode and in any prefill chunk (tests/test_batch_invariance.py). Each variant may
 * have its own order; the fast paths of one variant (decode rows, prefill tiles) share it. */

typedef struct {
    const fm_mat *w;
    const float *x;    /* [T, cols] */
    const float *xp;   /* [T, cols] x permuted per 32-element block (evens, then odds), for q4; else NULL */
    /* int8 activations (cpu.h), else NULL: */
    const int8_t *xq;  /* [T, cols] x quantized per group (permuted like xp for q4 in the SIMD kernels) */
    const float *xd;   /* [T, ng] each group's step: x ≈ xd·xq */
    const float *xqs;  /* [T, ng] Σ xq per group (exact in fp32), for the bias term */
    float *y;          /* [T, rows] */
    int T;
    int rows_per_task;
} fm_matmul_args;

/* Decode reads each row once, straight from DRAM. The hardware prefetcher alone kept the AVX2 q4
 * matvec at ~81% of a streaming read on Zen 3; asking for the row ~4 KiB ahead (its weights, scales and
 * biases) takes it to ~100% (bench/RESULTS.md). Set up once per call (no divisions per row), then called
 * once per row by the one-token row loops. */
typedef struct {
    size_t row_bytes;
    int ng, ahead; /* ng: 0 when not quantized */
} fm_row_prefetch;

static inline fm_row_prefetch fm_row_prefetch_init(const fm_mat *w) {
    const int quant = w->dtype == FM_Q4 || w->dtype == FM_Q8;
    const size_t rb = (size_t)fm_tensor_data_bytes(w->dtype, 1, w->cols);
    fm_row_prefetch p = {rb, quant ? w->cols / w->group_size : 0, rb >= 4096 ? 1 : (int)(4096 / rb)};
    return p;
}

/* Few live values on purpose: the pointers are read from w, so the decode loop keeps its registers.
 * always_inline: as a function of its own GCC finds it has no side effects and deletes the calls. */
static inline __attribute__((always_inline)) void fm_row_prefetch_at(const fm_mat *w, fm_row_prefetch p, int r, int r1) {
    const int ra = r + p.ahead;
    if (ra >= r1) return;
    const char *row = (const char *)w->data + (size_t)ra * p.row_bytes;
    for (size_t o = 0; o < p.row_bytes; o += 64) __builtin_prefetch(row + o);
    if (p.ng) { /* one line each covers a 2048-wide row's fp16 scales and biases at group 64 */
        __builtin_prefetch(w->scales + (size_t)ra * p.ng);
        __builtin_prefetch(w->biases + (size_t)ra * p.ng);
    }
}

/* Rows [r0, r1) of y; rowbuf has room for 4 rows of cols floats. */
void fm_matmul_rows_scalar(const fm_matmul_args *a, int r0, int r1, float *rowbuf);

#if defined(__x86_64__) || defined(_M_X64)
#define FM_HAVE_AVX2_KERNELS 1
int fm_matmul_avx2_supports(const fm_mat *w);
/* The int8 activations of x[n] per group of gs (a multiple of 32), as quantize_x.h's fm_quantize_x_c computes them. */
void fm_quantize_x_avx2(const float *x, int n, int gs, int permute, int8_t *xq, float *xd, float *xqs);
void fm_matmul_rows_avx2(const fm_matmul_args *a, int r0, int r1, float *rowbuf);
/* AVX-512 VNNI: int8 activations with group sizes that are multiples of 64; the rest goes to AVX2. */
int fm_matmul_avx512_supports_int8(const fm_mat *w);
void fm_matmul_rows_avx512(const fm_matmul_args *a, int r0, int r1, float *rowbuf);
#endif

#if defined(__aarch64__)
#include <arm_neon.h>

#include "../../core/util.h"

#define FM_HAVE_NEON_KERNELS 1
int fm_matmul_neon_supports(const fm_mat *w);
void fm_matmul_rows_neon(const fm_matmul_args *a, int r0, int r1, float *rowbuf);
/* Armv8.2 dot product (SDOT): int8 activations; the rest goes to the NEON kernels. */
void fm_matmul_rows_neon_dot(const fm_matmul_args *a, int r0, int r1, float *rowbuf);

/* Row r's scales and biases as fp32, s[ng] and b[ng] (ng = cols / group_size): fp16, or bf16 bits when
 * w->scale_bf16 (looked at once per row), 4 at a time. */
static inline void fm_neon_row_scales(const fm_mat *w, int r, int ng, float *s, float *b) {
    const uint16_t *sc = w->scales + (size_t)r * ng, *bi = w->biases + (size_t)r * ng;
    int g = 0;
    if (w->scale_bf16) {
        for (; g + 4 <= ng; g += 4) {
            vst1q_f32(s + g, vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(sc + g), 16)));
            vst1q_f32(b + g, vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(bi + g), 16)));
        }
        for (; g < ng; g++) s[g] = fm_bf16_to_f32(sc[g]), b[g] = fm_bf16_to_f32(bi[g]);
    } else {
        for (; g + 4 <= ng; g += 4) {
            vst1q_f32(s + g, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sc + g))));
            vst1q_f32(b + g, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(bi + g))));
        }
        for (; g < ng; g++) s[g] = fm_f16_to_f32(sc[g]), b[g] = fm_f16_to_f32(bi[g]);
    }
}

/* Rows [r0, r1) × every token on int8 activations (cpu.h): Σ_g d_g·(scale_g·Σ q·xq + bias_g·Σ xq), with
 * Σ q·xq of a group from GROUP_DOT(w, row, g, xq), which takes q4 nibbles or q8 offset by -128 as signed
 * bytes (the 128·Σ xq is added here). Shared by the NEON and NEON-dotprod kernels, which differ only in
 * GROUP_DOT (a static inline function in each: it inlines here). */
#define FM_NEON_INT8_ROWS(GROUP_DOT, a, r0, r1)                                                          \
    do {                                                                                                 \
        const fm_mat *w_ = (a)->w;                                                                       \
        const int n_ = w_->cols, m_ = w_->rows, ng_ = n_ / w_->group_size;                               \
        const float off_ = w_->dtype == FM_Q8 ? 128.0f : 0.0f;                                           \
        for (int r_ = (r0); r_ < (r1); r_++) {                                                           \
            const uint8_t *row_ = (const uint8_t *)w_->data + (size_t)r_ * (w_->dtype == FM_Q4 ? n_ / 2 : n_); \
            float sc_[ng_], bi_[ng_];                                                                    \
            fm_neon_row_scales(w_, r_, ng_, sc_, bi_);                                                   \
            for (int t_ = 0; t_ < (a)->T; t_++) {                                                        \
                const int8_t *xq_ = (a)->xq + (size_t)t_ * n_;                                           \
                const float *xd_ = (a)->xd + (size_t)t_ * ng_, *xqs_ = (a)->xqs + (size_t)t_ * ng_;      \
                float y_ = 0.0f;                                                                         \
                for (int g_ = 0; g_ < ng_; g_++) {                                                       \
                    const float dot_ = (float)GROUP_DOT(w_, row_, g_, xq_) + off_ * xqs_[g_];            \
                    y_ += xd_[g_] * (sc_[g_] * dot_ + bi_[g_] * xqs_[g_]);                               \
                }                                                                                        \
                (a)->y[(size_t)t_ * m_ + r_] = y_;                                                       \
            }                                                                                            \
        }                                                                                                \
    } while (0)
#endif

#endif /* FM_CPU_MATMUL_H */
