/*
 * matmul_neon_dot.c — the int8-activation matmul (csrc/backend/ops.h) with the Armv8.2 dot-product
 * instructions: SDOT multiplies 16 pairs of signed bytes and adds each four into an int32 lane, one
 * instruction for what the plain NEON kernel does with two widening multiplies and a pairwise add.
 * Compiled with -march=armv8.2-a+dotprod and called only when the CPU has it (ops.c: Apple M1 and
 * later, Neoverse, Cortex-A76 and later); fp32 activations and the rest go to the plain NEON kernels.
 *
 * Checked against the portable kernels by tests/c/test_kernels.c under qemu-user.
 */
#include <arm_neon.h>

#include "../../core/util.h"
#include "matmul.h"

/* Σ q·xq of group g, q as signed bytes: q4 nibbles (xq permuted per 32-element block: evens, then
 * odds), or q8 offset by -128 (the caller adds 128·Σ xq). */
static inline int32_t group_dot(const fm_mat *w, const uint8_t *row, int g, const int8_t *xq) {
    const int gs = w->group_size;
    const int8_t *x = xq + g * gs;
    int32x4_t acc = vdupq_n_s32(0);
    if (w->dtype == FM_Q4) {
        const uint8_t *q = row + g * gs / 2;
        for (int b = 0; b < gs / 32; b++, q += 16, x += 32) {
            const uint8x16_t v = vld1q_u8(q);
            acc = vdotq_s32(acc, vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F))), vld1q_s8(x));
            acc = vdotq_s32(acc, vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), vld1q_s8(x + 16));
        }
    } else {
        const uint8_t *q = row + g * gs;
        for (int i = 0; i < gs; i += 16)
            acc = vdotq_s32(acc, vreinterpretq_s8_u8(veorq_u8(vld1q_u8(q + i), vdupq_n_u8(0x80))), vld1q_s8(x + i));
    }
    return vaddvq_s32(acc);
}

void fm_matmul_rows_neon_dot(const fm_matmul_args *a, int r0, int r1, float *rowbuf) {
    if (!a->xq) {
        fm_matmul_rows_neon(a, r0, r1, rowbuf);
        return;
    }
    FM_NEON_INT8_ROWS(group_dot, a, r0, r1);
}
