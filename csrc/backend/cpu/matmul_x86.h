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

/* G <= 8 floats or fp16 values as a vector, zero-filled past G (the last groups of a row). */
static inline __m256 load8(const float *p, int G) {
    if (G == 8) return _mm256_loadu_ps(p);
    float t[8] = {0};
    for (int k = 0; k < G; k++) t[k] = p[k];
    return _mm256_loadu_ps(t);
}
static inline __m256 load8h(const uint16_t *p, int G) {
    if (G == 8) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    uint16_t t[8] = {0};
    for (int k = 0; k < G; k++) t[k] = p[k];
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)t));
}

/* Rows [r0, r1) of an int8-activation product against all of a's tokens, in blocks of up to 4:
 * KERNEL(w, r, a, t0, out, TT, q4) with TT and q4 literal, so each of the 8 cases is its own
 * specialised loop (KERNEL is always_inline). */
#define FM_INT8_ROWS(KERNEL, a, r0, r1)                                                                  \
    do {                                                                                                 \
        const fm_mat *w_ = (a)->w;                                                                       \
        const int m_ = w_->rows, T_ = (a)->T, q4_ = w_->dtype == FM_Q4;                                  \
        for (int r_ = (r0); r_ < (r1); r_++)                                                             \
            for (int tb_ = 0; tb_ < T_; tb_ += 4) {                                                      \
                float out_[4];                                                                           \
                const int TT_ = T_ - tb_ < 4 ? T_ - tb_ : 4;                                             \
                switch (TT_ * 2 + q4_) {                                                                 \
                case 2: KERNEL(w_, r_, (a), tb_, out_, 1, 0); break;                                     \
                case 3: KERNEL(w_, r_, (a), tb_, out_, 1, 1); break;                                     \
                case 4: KERNEL(w_, r_, (a), tb_, out_, 2, 0); break;                                     \
                case 5: KERNEL(w_, r_, (a), tb_, out_, 2, 1); break;                                     \
                case 6: KERNEL(w_, r_, (a), tb_, out_, 3, 0); break;                                     \
                case 7: KERNEL(w_, r_, (a), tb_, out_, 3, 1); break;                                     \
                case 8: KERNEL(w_, r_, (a), tb_, out_, 4, 0); break;                                     \
                default: KERNEL(w_, r_, (a), tb_, out_, 4, 1); break;                                    \
                }                                                                                        \
                for (int j_ = 0; j_ < TT_; j_++) (a)->y[(size_t)(tb_ + j_) * m_ + r_] = out_[j_];         \
            }                                                                                            \
    } while (0)

#endif /* FM_CPU_MATMUL_X86_H */
