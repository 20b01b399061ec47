/*
 * matmul_avx512.c — the int8-activation matmul (csrc/backend/ops.h) with AVX-512 VNNI (x86-64).
 *
 * Compiled with -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512vnni -mavx2 -mfma -mf16c and called
 * only when the CPU has all of them (ops.c). VNNI's vpdpbusd multiplies 64 unsigned weight bytes by 64
 * signed activation bytes and adds each four products into an int32 lane in one instruction, with no
 * int16 intermediate: q8 needs no -128 offset and q4 no shuffle beyond unpacking nibbles. One 512-bit
 * step covers 64 inputs, so this kernel takes group sizes that are multiples of 64; everything else
 * (fp32 activations, many tokens, other group sizes) runs the AVX2 kernels.
 *
 * q4 layout: 32 bytes hold 64 weights, two 32-element blocks of 16 bytes; xq comes permuted per block
 * (16 even elements, then 16 odd ones), so the 128-bit lanes [block0 & 15, block0 >> 4, block1 & 15,
 * block1 >> 4] line up with 64 consecutive xq bytes.
 *
 * Checked against the portable kernels by tests/c/test_kernels.c on a CPU that has AVX-512 VNNI.
 */
#include "../../core/util.h"
#include "matmul_x86.h"

int fm_matmul_avx512_supports_int8(const fm_mat *w) {
    return (w->dtype == FM_Q4 || w->dtype == FM_Q8) && w->group_size % 64 == 0;
}

/* 32 bytes of q4 (64 weights) as 64 unsigned bytes in xq's permuted order. */
static inline __m512i q4_bytes64(const uint8_t *q) {
    const __m512i v = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)q));
    const __m512i twice = _mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(1, 1, 0, 0)); /* lanes b0 b0 b1 b1 */
    const __m512i hi = _mm512_srli_epi16(twice, 4);
    return _mm512_and_si512(_mm512_mask_blend_epi64(0xCC, twice, hi), _mm512_set1_epi8(0x0F));
}

/* Row r against one token (decode): Σ_g d_g·(scale_g·Σ q·xq + bias_g·Σ xq). q4, GS (the group size
 * when a constant, else 0) and SB (bf16 scales and biases) are literals after inlining. */
static inline __attribute__((always_inline)) float row_dot(const fm_mat *w, int r, const fm_matmul_args *a,
                                                           const int q4, const int GS, const int SB) {
    const int n = w->cols, gs = GS ? GS : w->group_size, ng = n / gs;
    const uint8_t *row = (const uint8_t *)w->data + (size_t)r * (q4 ? n / 2 : n);
    const uint16_t *sc = w->scales + (size_t)r * ng, *bi = w->biases + (size_t)r * ng;
    const int8_t *xq = a->xq;
    __m512 acc = _mm512_setzero_ps();
    __m256 accb = _mm256_setzero_ps();
    float d[8];
    for (int g0 = 0; g0 < ng; g0 += 8) {
        const int G = ng - g0 < 8 ? ng - g0 : 8;
        const __m256 s = load8s(sc + g0, G, SB), b = load8s(bi + g0, G, SB), dx = load8(a->xd + g0, G);
        accb = _mm256_fmadd_ps(_mm256_mul_ps(b, dx), load8(a->xqs + g0, G), accb);
        _mm256_storeu_ps(d, _mm256_mul_ps(s, dx));
        for (int k = 0; k < G; k++) {
            const int g = g0 + k;
            __m512i dot = _mm512_setzero_si512();
            for (int i = 0; i < gs; i += 64) {
                const __m512i wq = q4 ? q4_bytes64(row + (g * gs + i) / 2)
                                      : _mm512_loadu_si512((const void *)(row + g * gs + i));
                dot = _mm512_dpbusd_epi32(dot, wq, _mm512_loadu_si512((const void *)(xq + g * gs + i)));
            }
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(d[k]), acc);
        }
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps(acc, 1)), accb));
}

/* One token (decode); group size 64 as a constant, as in AVX2. */
static inline __attribute__((always_inline)) void rows_1(const fm_matmul_args *a, int r0, int r1, const int SB) {
    const int q4 = a->w->dtype == FM_Q4, g64 = a->w->group_size == 64;
    const fm_row_prefetch pf = fm_row_prefetch_init(a->w);
    for (int r = r0; r < r1; r++) {
        fm_row_prefetch_at(a->w, pf, r, r1);
        a->y[r] = q4 && g64 ? row_dot(a->w, r, a, 1, 64, SB)
                  : q4      ? row_dot(a->w, r, a, 1, 0, SB)
                  : g64     ? row_dot(a->w, r, a, 0, 64, SB)
                            : row_dot(a->w, r, a, 0, 0, SB);
    }
}

void fm_matmul_rows_avx512(const fm_matmul_args *a, int r0, int r1, float *rowbuf) {
    /* fp32 activations, and several tokens (prefill): the AVX2 kernels. VNNI tiles for prefill (4 rows ×
     * 4 tokens, 512-bit and 256-bit) ran at 0.7-0.9× the AVX2 tiles on the lent Xeon (bench/RESULTS.md). */
    if (!a->xq || a->T > 1) {
        fm_matmul_rows_avx2(a, r0, r1, rowbuf);
        return;
    }
    if (a->w->scale_bf16) rows_1(a, r0, r1, 1);
    else rows_1(a, r0, r1, 0);
}
