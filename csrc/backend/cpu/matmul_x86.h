/* matmul_x86.h — helpers shared by the AVX2 and AVX-512 kernels (each file compiles them for its ISA). */
#ifndef FM_CPU_MATMUL_X86_H
#define FM_CPU_MATMUL_X86_H

#include <immintrin.h>

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

#endif /* FM_CPU_MATMUL_X86_H */
