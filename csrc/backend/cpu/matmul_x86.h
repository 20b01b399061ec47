/* matmul_x86.h — helpers shared by the AVX2 and AVX-512 kernels (each file compiles them for its ISA). */
#ifndef FM_CPU_MATMUL_X86_H
#define FM_CPU_MATMUL_X86_H

#include <immintrin.h>

#include "../../core/util.h"
#include "matmul.h"

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* G <= 8 floats as a vector, zero-filled past G (the last groups of a row). */
static inline __m256 load8(const float *p, int G) {
    if (G == 8) return _mm256_loadu_ps(p);
    float t[8] = {0};
    for (int k = 0; k < G; k++) t[k] = p[k];
    return _mm256_loadu_ps(t);
}

/* G <= 8 scales or biases as fp32, zero-filled past G: bf16 bits when bf16 (fm_mat.scale_bf16), else
 * fp16. bf16 is a literal after inlining: fp16 takes one cvtph, bf16 a widening and a shift. */
static inline __attribute__((always_inline)) __m256 load8s(const uint16_t *p, int G, const int bf16) {
    __m128i v;
    if (G == 8) {
        v = _mm_loadu_si128((const __m128i *)p);
    } else {
        uint16_t t[8] = {0};
        for (int k = 0; k < G; k++) t[k] = p[k];
        v = _mm_loadu_si128((const __m128i *)t);
    }
    return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)) : _mm256_cvtph_ps(v);
}

/* n scales or biases as fp32 (bf16 a literal, as in load8s). */
static inline __attribute__((always_inline)) void scales_to_f32(const uint16_t *src, float *dst, int n, const int bf16) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8s(src + i, 8, bf16));
    for (; i < n; i++) dst[i] = bf16 ? fm_bf16_to_f32(src[i]) : fm_f16_to_f32(src[i]);
}

/* ---------------------------------------------------------------- int8 activations (cpu.h)
 *
 * The one order of the AVX2 and AVX-512 variants, for every path and batch (decode rows, prefill tiles):
 * per (row, token), with dot_g = Σ (q - off)·xq over group g as an exact int32 (off = 128 for q8, else 0),
 * b'_g = fma(off, scale_g, bias_g), d_g the token's step and e_g = d_g·Σxq_g (each rounded once),
 *   acc = fma(dot_g, scale_g·d_g, acc), accb = fma(b'_g, e_g, accb)  for g = 0, 1, .. in order,
 *   y = acc + accb.
 * The integer dots may be summed in any lane order (they are exact); only these float steps are fixed. */

/* Four rows' lane-partial int32 dots [8 lanes each] → 8 lanes [A, B, C, D, A, B, C, D], each a sum of a
 * quarter of its row's lanes. Unpacks and adds, which run beside the multiplies. I16: int16 lanes (each
 * output int16 before the final madd sums 4 of them, so lanes <= 8191). */
static inline __attribute__((always_inline)) __m256i reduce4(__m256i a, __m256i b, __m256i c, __m256i d,
                                                            const int I16) {
    if (I16) {
        const __m256i ab = _mm256_add_epi16(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
        const __m256i cd = _mm256_add_epi16(_mm256_unpacklo_epi32(c, d), _mm256_unpackhi_epi32(c, d));
        return _mm256_madd_epi16(_mm256_add_epi16(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd)),
                                 _mm256_set1_epi16(1));
    }
    const __m256i ab = _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
    const __m256i cd = _mm256_add_epi32(_mm256_unpacklo_epi32(c, d), _mm256_unpackhi_epi32(c, d));
    return _mm256_add_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
}

/* reduce4's [A, B, C, D, A, B, C, D] → the whole dots [A, B, C, D]. */
static inline __m128i halves_sum(__m256i v) {
    return _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
}

/* Decode's 4 rows (lanes) of one token: their scales s and b' = fma(off, scale, bias), as [ng][4] so that
 * a group's four are one load; s4, b4 have room for ng rounded up to 8 groups. 8 groups of the 4 rows at a
 * time, transposed in registers. SB: bf16 scales, a literal. */
static inline __attribute__((always_inline)) void scales4(const fm_mat *w, const int r[4], float off, float *s4,
                                                          float *b4, const int SB) {
    const int ng = w->cols / w->group_size;
    const __m256 o = _mm256_set1_ps(off);
    for (int g0 = 0; g0 < ng; g0 += 8) {
        const int G = ng - g0 < 8 ? ng - g0 : 8;
        __m256 v[2][4];
        for (int i = 0; i < 4; i++) {
            v[0][i] = load8s(w->scales + (size_t)r[i] * ng + g0, G, SB);
            v[1][i] = _mm256_fmadd_ps(o, v[0][i], load8s(w->biases + (size_t)r[i] * ng + g0, G, SB));
        }
        for (int k = 0; k < 2; k++) { /* rows × groups → groups × rows: [g, g+1] per store */
            float *dst = (k ? b4 : s4) + 4 * g0;
            const __m256 t0 = _mm256_unpacklo_ps(v[k][0], v[k][1]), t1 = _mm256_unpackhi_ps(v[k][0], v[k][1]);
            const __m256 t2 = _mm256_unpacklo_ps(v[k][2], v[k][3]), t3 = _mm256_unpackhi_ps(v[k][2], v[k][3]);
            const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE); /* g0|g4, g1|g5 */
            const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE); /* g2|g6, g3|g7 */
            _mm256_storeu_ps(dst, _mm256_permute2f128_ps(u0, u1, 0x20));
            _mm256_storeu_ps(dst + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
            _mm256_storeu_ps(dst + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
            _mm256_storeu_ps(dst + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
        }
    }
}

/* One group of decode's 4 rows: the float steps of the order above, lanes = rows. */
static inline __attribute__((always_inline)) void fold4(__m128i dot, const float *s4, const float *b4, float d,
                                                        float e, __m128 *acc, __m128 *accb) {
    *acc = _mm_fmadd_ps(_mm_cvtepi32_ps(dot), _mm_mul_ps(_mm_loadu_ps(s4), _mm_set1_ps(d)), *acc);
    *accb = _mm_fmadd_ps(_mm_loadu_ps(b4), _mm_set1_ps(e), *accb);
}

#endif /* FM_CPU_MATMUL_X86_H */
