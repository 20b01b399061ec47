/*
 * matmul_neon.c — y[T, rows] = x[T, cols] · Wᵀ for rows [r0, r1), NEON (AArch64, where it is always
 * present). The same scheme as matmul_avx2.c at 4 lanes:
 *
 * Each row is dequantized once (fma(q, scale, bias); q4 in the permuted order below) and dotted with every
 * token by dot_f32, decode included, so a token's outputs do not depend on the batch (matmul.h). q4: the
 * driver passes x permuted per 32-element block (16 even elements, then 16 odd ones), so the low and high
 * nibbles of 16 bytes line up with 16 consecutive floats each. int8 activations (cpu.h): widening int8
 * multiplies (vmull_s8) into int32, each (row, token) by FM_NEON_INT8_ROWS in one order.
 *
 * Checked against the portable kernels by tests/c/test_kernels.c, built with an AArch64 cross compiler
 * and run under qemu-user (tests/test_cross_isa.py).
 */
#include <arm_neon.h>

#include "../../core/util.h"
#include "matmul.h"

static float dot_f32(const float *a, const float *b, int n) {
    float32x4_t s0 = vdupq_n_f32(0), s1 = vdupq_n_f32(0), s2 = vdupq_n_f32(0), s3 = vdupq_n_f32(0);
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
        s1 = vfmaq_f32(s1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
        s2 = vfmaq_f32(s2, vld1q_f32(a + i + 8), vld1q_f32(b + i + 8));
        s3 = vfmaq_f32(s3, vld1q_f32(a + i + 12), vld1q_f32(b + i + 12));
    }
    for (; i + 4 <= n; i += 4) s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* 16 bytes as 16 floats, 4 vectors in byte order. */
static inline void u8x16_to_f32(uint8x16_t v, float32x4_t out[4]) {
    const uint16x8_t lo = vmovl_u8(vget_low_u8(v)), hi = vmovl_u8(vget_high_u8(v));
    out[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo)));
    out[1] = vcvtq_f32_u32(vmovl_u16(vget_high_u16(lo)));
    out[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi)));
    out[3] = vcvtq_f32_u32(vmovl_u16(vget_high_u16(hi)));
}

/* 16 bytes of q4 (32 weights): w[0..3] the low nibbles (elements 0, 2, .., 30), w[4..7] the high ones. */
static inline void q4_unpack32(const uint8_t *q, float32x4_t w[8]) {
    const uint8x16_t v = vld1q_u8(q);
    u8x16_to_f32(vandq_u8(v, vdupq_n_u8(0x0F)), w);
    u8x16_to_f32(vshrq_n_u8(v, 4), w + 4);
}

/* Σ q·xq of one group on int8 activations (cpu.h), q as signed bytes: q4 nibbles, or q8 offset by -128
 * (the caller adds 128·Σ xq). Products are widened with vmull_s8 (at most 128·127 each, 4 of them still
 * fit int16) and pairwise-added into int32. */
static inline int32_t int8_group_dot(const fm_mat *w, const uint8_t *row, int g, const int8_t *xq) {
    const int gs = w->group_size;
    const int8_t *x = xq + g * gs;
    int32x4_t acc = vdupq_n_s32(0);
    if (w->dtype == FM_Q4) {
        const uint8_t *q = row + g * gs / 2;
        for (int b = 0; b < gs / 32; b++, q += 16, x += 32) {
            const uint8x16_t v = vld1q_u8(q);
            const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F)));
            const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
            const int8x16_t x0 = vld1q_s8(x), x1 = vld1q_s8(x + 16); /* evens, then odds */
            int16x8_t p = vmull_s8(vget_low_s8(lo), vget_low_s8(x0));
            p = vmlal_s8(p, vget_high_s8(lo), vget_high_s8(x0));
            p = vmlal_s8(p, vget_low_s8(hi), vget_low_s8(x1));
            p = vmlal_s8(p, vget_high_s8(hi), vget_high_s8(x1));
            acc = vpadalq_s16(acc, p);
        }
    } else {
        const uint8_t *q = row + g * gs;
        for (int i = 0; i < gs; i += 16) {
            const int8x16_t qs = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(q + i), vdupq_n_u8(0x80)));
            const int8x16_t xv = vld1q_s8(x + i);
            int16x8_t p = vmull_s8(vget_low_s8(qs), vget_low_s8(xv));
            p = vmlal_s8(p, vget_high_s8(qs), vget_high_s8(xv));
            acc = vpadalq_s16(acc, p);
        }
    }
    return vaddvq_s32(acc);
}

/* Row r dequantized into out[cols] (q4: in the permuted order). */
static void dequant_row(const fm_mat *w, int r, float *out) {
    const int n = w->cols;
    if (w->dtype == FM_BF16) {
        const uint16_t *src = (const uint16_t *)w->data + (size_t)r * n;
        int i = 0;
        for (; i + 4 <= n; i += 4) vst1q_f32(out + i, vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(src + i), 16)));
        for (; i < n; i++) out[i] = fm_bf16_to_f32(src[i]);
        return;
    }
    const int gs = w->group_size, ng = n / gs;
    float sc[ng], bi[ng];
    fm_neon_row_scales(w, r, ng, sc, bi);
    float32x4_t q[8];
    for (int g = 0; g < ng; g++) {
        const float32x4_t b = vdupq_n_f32(bi[g]);
        const float s = sc[g];
        float *o = out + g * gs;
        if (w->dtype == FM_Q4) {
            const uint8_t *qb = (const uint8_t *)w->data + (size_t)r * (n / 2) + g * gs / 2;
            for (int blk = 0; blk < gs / 32; blk++, o += 32) {
                q4_unpack32(qb + blk * 16, q);
                for (int i = 0; i < 8; i++) vst1q_f32(o + 4 * i, vfmaq_n_f32(b, q[i], s));
            }
        } else {
            const uint8_t *qb = (const uint8_t *)w->data + (size_t)r * n + g * gs;
            for (int i = 0; i < gs; i += 16) {
                u8x16_to_f32(vld1q_u8(qb + i), q);
                for (int j = 0; j < 4; j++) vst1q_f32(o + i + 4 * j, vfmaq_n_f32(b, q[j], s));
            }
        }
    }
}

int fm_matmul_neon_supports(const fm_mat *w) {
    switch (w->dtype) {
    case FM_F32: case FM_BF16: return 1;
    case FM_Q8: return w->group_size % 16 == 0;
    case FM_Q4: return w->group_size % 32 == 0;
    }
    return 0;
}

void fm_matmul_rows_neon(const fm_matmul_args *a, int r0, int r1, float *rowbuf) {
    const fm_mat *w = a->w;
    const int n = w->cols, m = w->rows, T = a->T;
    const float *x = w->dtype == FM_Q4 ? a->xp : a->x; /* q4 works in the permuted order */
    if (a->xq) {
        FM_NEON_INT8_ROWS(int8_group_dot, a, r0, r1);
        return;
    }
    for (int r = r0; r < r1; r++) { /* one order for every T (matmul.h): the row dequantized, then dot_f32 */
        const float *wr = (const float *)w->data + (size_t)r * n;
        if (w->dtype != FM_F32) {
            dequant_row(w, r, rowbuf);
            wr = rowbuf;
        }
        for (int t = 0; t < T; t++) a->y[(size_t)t * m + r] = dot_f32(wr, x + (size_t)t * n, n);
    }
}
