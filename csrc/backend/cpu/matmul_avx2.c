/*
 * matmul_avx2.c — y[T, rows] = x[T, cols] · Wᵀ for rows [r0, r1), AVX2 + FMA (x86-64).
 *
 * Compiled with -mavx2 -mfma and called only when the CPU has both (ops.c dispatches).
 *
 * One token (decode): each row is dotted with x straight from its packed form. Per group of g inputs
 * the kernel accumulates Σ q·x in fp32 and then adds scale·that, and the bias term Σ_g bias_g·Σx_g
 * uses per-group sums of x computed once per call: w·x = Σ_g (s_g Σ q x + b_g Σ x).
 * q4 bytes hold elements 2j (low nibble) and 2j+1 (high nibble); instead of shuffling nibbles into
 * order, the caller passes x permuted per 32-element block (16 even elements, then 16 odd ones), so a
 * masked byte vector lines up with 16 consecutive floats. Several tokens (prefill): the row is
 * dequantized once into fp32 (in the same permuted order) and dotted with every token.
 */
#include <immintrin.h>

#include "../../core/util.h"
#include "matmul.h"

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 u8x8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }

static float dot_f32(const float *a, const float *b, int n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Σ q·x over one q4 group of gs elements (gs a multiple of 32), x permuted per block. */
static inline __m256 q4_group_dot(const uint8_t *q, const float *xp, int gs) {
    const __m128i m = _mm_set1_epi8(0x0F);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int b = 0; b < gs / 32; b++, q += 16, xp += 32) {
        const __m128i v = _mm_loadu_si128((const __m128i *)q);
        const __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
        a0 = _mm256_fmadd_ps(u8x8_to_ps(lo), _mm256_loadu_ps(xp), a0);
        a1 = _mm256_fmadd_ps(u8x8_to_ps(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(xp + 8), a1);
        a2 = _mm256_fmadd_ps(u8x8_to_ps(hi), _mm256_loadu_ps(xp + 16), a2);
        a3 = _mm256_fmadd_ps(u8x8_to_ps(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(xp + 24), a3);
    }
    return _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
}

/* Σ q·x over one q8 group (gs a multiple of 16). */
static inline __m256 q8_group_dot(const uint8_t *q, const float *x, int gs) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int i = 0; i < gs; i += 16) {
        const __m128i v = _mm_loadu_si128((const __m128i *)(q + i));
        a0 = _mm256_fmadd_ps(u8x8_to_ps(v), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(u8x8_to_ps(_mm_srli_si128(v, 8)), _mm256_loadu_ps(x + i + 8), a1);
    }
    return _mm256_add_ps(a0, a1);
}

static inline __m256 bf16x8_to_ps(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* Quantized row: fused dot for one token. */
static float quant_row_dot(const fm_mat *w, int r, const float *x, const float *xsum) {
    const int n = w->cols, gs = w->group_size, ng = n / gs;
    const uint16_t *sc = w->scales + (size_t)r * ng, *bi = w->biases + (size_t)r * ng;
    __m256 acc = _mm256_setzero_ps();
    float bias = 0.0f;
    if (w->dtype == FM_Q4) {
        const uint8_t *q = (const uint8_t *)w->data + (size_t)r * (n / 2);
        for (int g = 0; g < ng; g++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(fm_f16_to_f32(sc[g])), q4_group_dot(q + g * gs / 2, x + g * gs, gs), acc);
    } else {
        const uint8_t *q = (const uint8_t *)w->data + (size_t)r * n;
        for (int g = 0; g < ng; g++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(fm_f16_to_f32(sc[g])), q8_group_dot(q + g * gs, x + g * gs, gs), acc);
    }
    for (int g = 0; g < ng; g++) bias += fm_f16_to_f32(bi[g]) * xsum[g];
    return hsum(acc) + bias;
}

/* Row r dequantized into out[cols] (q4: in the permuted order). */
static void dequant_row(const fm_mat *w, int r, float *out) {
    const int n = w->cols;
    if (w->dtype == FM_BF16) {
        const uint16_t *src = (const uint16_t *)w->data + (size_t)r * n;
        int i = 0;
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, bf16x8_to_ps(src + i));
        for (; i < n; i++) out[i] = fm_bf16_to_f32(src[i]);
        return;
    }
    const int gs = w->group_size, ng = n / gs;
    const uint16_t *sc = w->scales + (size_t)r * ng, *bi = w->biases + (size_t)r * ng;
    const __m128i m = _mm_set1_epi8(0x0F);
    for (int g = 0; g < ng; g++) {
        const __m256 s = _mm256_set1_ps(fm_f16_to_f32(sc[g])), b = _mm256_set1_ps(fm_f16_to_f32(bi[g]));
        float *o = out + g * gs;
        if (w->dtype == FM_Q4) {
            const uint8_t *q = (const uint8_t *)w->data + (size_t)r * (n / 2) + g * gs / 2;
            for (int blk = 0; blk < gs / 32; blk++, q += 16, o += 32) {
                const __m128i v = _mm_loadu_si128((const __m128i *)q);
                const __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
                _mm256_storeu_ps(o, _mm256_fmadd_ps(u8x8_to_ps(lo), s, b));
                _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(u8x8_to_ps(_mm_srli_si128(lo, 8)), s, b));
                _mm256_storeu_ps(o + 16, _mm256_fmadd_ps(u8x8_to_ps(hi), s, b));
                _mm256_storeu_ps(o + 24, _mm256_fmadd_ps(u8x8_to_ps(_mm_srli_si128(hi, 8)), s, b));
            }
        } else {
            const uint8_t *q = (const uint8_t *)w->data + (size_t)r * n + g * gs;
            for (int i = 0; i < gs; i += 8)
                _mm256_storeu_ps(o + i, _mm256_fmadd_ps(u8x8_to_ps(_mm_loadl_epi64((const __m128i *)(q + i))), s, b));
        }
    }
}

int fm_matmul_avx2_supports(const fm_mat *w) {
    switch (w->dtype) {
    case FM_F32: case FM_BF16: return 1;
    case FM_Q8: return w->group_size % 16 == 0;
    case FM_Q4: return w->group_size % 32 == 0;
    }
    return 0;
}

void fm_matmul_rows_avx2(const fm_matmul_args *a, int r0, int r1, float *rowbuf) {
    const fm_mat *w = a->w;
    const int n = w->cols, m = w->rows, T = a->T;
    const float *x = w->dtype == FM_Q4 ? a->xp : a->x; /* q4 works in the permuted order */
    for (int r = r0; r < r1; r++) {
        if (T == 1 && (w->dtype == FM_Q4 || w->dtype == FM_Q8)) {
            a->y[r] = quant_row_dot(w, r, x, a->xsum);
            continue;
        }
        const float *wr = (const float *)w->data + (size_t)r * n;
        if (w->dtype != FM_F32) {
            dequant_row(w, r, rowbuf);
            wr = rowbuf;
        }
        for (int t = 0; t < T; t++) a->y[(size_t)t * m + r] = dot_f32(wr, x + (size_t)t * n, n);
    }
}
