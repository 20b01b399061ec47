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
 * Batch invariance: decode computes each (row, token) exactly as the AVX2 tiles that take the tokens of
 * prefill do (matmul_x86.h). Checked against the portable kernels by tests/c/test_kernels.c on a CPU
 * that has AVX-512 VNNI.
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

/* Σ q·xq lanes of a packed q4 row over 128 weights (64 bytes: four 32-blocks), against xl = the blocks' even
 * xq and xh = their odd ones (x_pair): the nibbles need one mask or shift each and no shuffle. Lanes 0-7
 * cover weights [0, 64), lanes 8-15 [64, 128). */
static inline __m512i q4_dot128(const uint8_t *q, __m512i xl, __m512i xh, __m512i acc) {
    const __m512i v = _mm512_loadu_si512((const void *)q), m = _mm512_set1_epi8(0x0F);
    acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(v, m), xl);
    return _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(v, 4), m), xh);
}

/* 128 xq in the AVX2 order (per 32-block: 16 evens, then 16 odds) → the four blocks' evens and odds. */
static inline void x_pair(const int8_t *xq, __m512i *xl, __m512i *xh) {
    const __m512i x0 = _mm512_loadu_si512((const void *)xq), x1 = _mm512_loadu_si512((const void *)(xq + 64));
    *xl = _mm512_shuffle_i64x2(x0, x1, _MM_SHUFFLE(2, 0, 2, 0));
    *xh = _mm512_shuffle_i64x2(x0, x1, _MM_SHUFFLE(3, 1, 3, 1));
}

/* reduce4 at 512 bits: four rows' lanes → each 128-bit lane [A, B, C, D], sums of that lane's four. */
static inline __m512i reduce4_512(__m512i a, __m512i b, __m512i c, __m512i d) {
    const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
}

/* Decode: rows r[0..3] (the lanes) against one token, in the order of matmul_x86.h, which the AVX2 tiles
 * of prefill also follow: VNNI's dots (Σ q·xq, q unsigned) become the whole dots of the four rows, and q8
 * takes 128·Σxq off so that they are Σ (q - 128)·xq, the tiles' (exact integers either way). q4 with
 * groups of 64 takes two groups a step (lanes 0-7 one, 8-15 the next) and folds them in turn. q4, GS
 * (the group size when a constant, else 0) are literals after inlining. s4, b4: scales4's; e[g] =
 * d_g·Σxq_g; o128[g] = 128·Σxq_g for q8. */
static inline __attribute__((always_inline)) __m128 rows4(const fm_mat *w, const int r[4], const fm_matmul_args *a,
                                                          const float *e, const int *o128, const float *s4,
                                                          const float *b4, const int q4, const int GS) {
    const int n = w->cols, gs = GS ? GS : w->group_size, ng = n / gs;
    const uint8_t *row[4];
    for (int i = 0; i < 4; i++) row[i] = (const uint8_t *)w->data + (size_t)r[i] * (q4 ? n / 2 : n);
    __m128 acc = _mm_setzero_ps(), accb = _mm_setzero_ps();
    int g = 0;
    if (q4 && gs == 64)
        for (; g + 2 <= ng; g += 2) {
            __m512i xl, xh, p[4];
            x_pair(a->xq + g * 64, &xl, &xh);
            for (int k = 0; k < 4; k++) p[k] = q4_dot128(row[k] + g * 32, xl, xh, _mm512_setzero_si512());
            const __m512i v = reduce4_512(p[0], p[1], p[2], p[3]); /* lanes 0, 1: group g; 2, 3: g + 1 */
            const __m256i d = _mm512_castsi512_si256(
                _mm512_add_epi32(_mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(0, 0, 2, 0)),
                                 _mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(0, 0, 3, 1))));
            fold4(_mm256_castsi256_si128(d), s4 + 4 * g, b4 + 4 * g, a->xd[g], e[g], &acc, &accb);
            fold4(_mm256_extracti128_si256(d, 1), s4 + 4 * g + 4, b4 + 4 * g + 4, a->xd[g + 1], e[g + 1], &acc, &accb);
        }
    for (; g < ng; g++) {
        __m512i p[4];
        for (int k = 0; k < 4; k++) {
            __m512i dot = _mm512_setzero_si512();
            int i = 0;
            if (q4)
                for (; i + 128 <= gs; i += 128) {
                    __m512i xl, xh;
                    x_pair(a->xq + g * gs + i, &xl, &xh);
                    dot = q4_dot128(row[k] + (g * gs + i) / 2, xl, xh, dot);
                }
            for (; i < gs; i += 64) {
                const __m512i wq = q4 ? q4_bytes64(row[k] + (g * gs + i) / 2)
                                      : _mm512_loadu_si512((const void *)(row[k] + g * gs + i));
                dot = _mm512_dpbusd_epi32(dot, wq, _mm512_loadu_si512((const void *)(a->xq + g * gs + i)));
            }
            p[k] = dot;
        }
        const __m512i v = reduce4_512(p[0], p[1], p[2], p[3]);
        __m128i dot = halves_sum(_mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1)));
        if (!q4) dot = _mm_sub_epi32(dot, _mm_set1_epi32(o128[g]));
        fold4(dot, s4 + 4 * g, b4 + 4 * g, a->xd[g], e[g], &acc, &accb);
    }
    return _mm_add_ps(acc, accb);
}

/* One token (decode), 4 rows at a time (rows past r1 repeat the first, their results dropped); group size
 * 64 as a constant, as in AVX2. SB: bf16 scales, a literal. */
static inline __attribute__((always_inline)) void rows_1(const fm_matmul_args *a, int r0, int r1, const int SB) {
    const fm_mat *w = a->w;
    const int q4 = w->dtype == FM_Q4, g64 = w->group_size == 64, ng = w->cols / w->group_size, ng8 = (ng + 7) & ~7;
    float e[ng], s4[4 * ng8], b4[4 * ng8];
    int o128[ng];
    for (int g = 0; g < ng; g++) e[g] = a->xd[g] * a->xqs[g], o128[g] = 128 * (int)a->xqs[g];
    const fm_row_prefetch pf = fm_row_prefetch_init(w);
    for (int rb = r0; rb < r1; rb += 4) {
        int r[4];
        for (int i = 0; i < 4; i++) {
            r[i] = rb + i < r1 ? rb + i : rb;
            fm_row_prefetch_at(w, pf, rb + i, r1);
        }
        scales4(w, r, q4 ? 0.0f : 128.0f, s4, b4, SB);
        const __m128 y = q4 && g64 ? rows4(w, r, a, e, o128, s4, b4, 1, 64)
                         : q4      ? rows4(w, r, a, e, o128, s4, b4, 1, 0)
                         : g64     ? rows4(w, r, a, e, o128, s4, b4, 0, 64)
                                   : rows4(w, r, a, e, o128, s4, b4, 0, 0);
        float o[4];
        _mm_storeu_ps(o, y);
        for (int i = 0; i < 4 && rb + i < r1; i++) a->y[rb + i] = o[i];
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
