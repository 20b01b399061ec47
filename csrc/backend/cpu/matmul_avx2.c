/*
 * matmul_avx2.c — y[T, rows] = x[T, cols] · Wᵀ for rows [r0, r1), AVX2 + FMA (x86-64).
 *
 * Compiled with -mavx2 -mfma -mf16c and called only when the CPU has AVX2 and FMA (ops.c dispatches;
 * every AVX2 CPU has F16C).
 *
 * One token (decode): each row is dotted with x straight from its packed form. Per group of g inputs
 * the kernel accumulates Σ q·x in fp32 and then adds scale·that, and the bias term Σ_g bias_g·Σx_g
 * uses per-group sums of x computed once per call: w·x = Σ_g (s_g Σ q x + b_g Σ x).
 * q4 bytes hold elements 2j (low nibble) and 2j+1 (high nibble); instead of shuffling nibbles into
 * order, the caller passes x permuted per 32-element block (16 even elements, then 16 odd ones), so a
 * masked byte vector lines up with 16 consecutive floats. Several tokens (prefill): 4 rows at a time
 * are dequantized into fp32 (in the same permuted order) and multiplied with the tokens in 4×3 register
 * tiles, so each load feeds several FMAs.
 */
#include "../../core/util.h"
#include "matmul_x86.h"

static inline __m256 u8x8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }

/* n scales or biases as fp32 (bf16 a literal, as in load8s). */
static inline __attribute__((always_inline)) void scales_to_f32(const uint16_t *src, float *dst, int n, const int bf16) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8s(src + i, 8, bf16));
    for (; i < n; i++) dst[i] = bf16 ? fm_bf16_to_f32(src[i]) : fm_f16_to_f32(src[i]);
}

/* Row r's scales and biases as fp32, s[ng] and b[ng] (ng = cols / group_size, which the caller has): the
 * scale dtype is looked at once per row. Inlined: as a call (and its division) it made the fp32 matvecs
 * 3-9% slower. */
static inline __attribute__((always_inline)) void row_scales(const fm_mat *w, int r, int ng, float *s, float *b) {
    const uint16_t *sc = w->scales + (size_t)r * ng, *bi = w->biases + (size_t)r * ng;
    if (w->scale_bf16) {
        scales_to_f32(sc, s, ng, 1);
        scales_to_f32(bi, b, ng, 1);
    } else {
        scales_to_f32(sc, s, ng, 0);
        scales_to_f32(bi, b, ng, 0);
    }
}

static inline __m256 bf16x8_to_ps(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* 8 elements of a row of fp32 or bf16 (converted in registers) as fp32. */
static inline __attribute__((always_inline)) __m256 load_row8(const void *w, int i, const int bf16) {
    return bf16 ? bf16x8_to_ps((const uint16_t *)w + i) : _mm256_loadu_ps((const float *)w + i);
}

/* Σ w·x over n, w fp32 or bf16: one pass over the row, no dequantized copy. bf16 is a literal. */
static inline __attribute__((always_inline)) float dot_row(const void *w, const int bf16, const float *x, int n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(load_row8(w, i, bf16), _mm256_loadu_ps(x + i), s0);
        s1 = _mm256_fmadd_ps(load_row8(w, i + 8, bf16), _mm256_loadu_ps(x + i + 8), s1);
        s2 = _mm256_fmadd_ps(load_row8(w, i + 16, bf16), _mm256_loadu_ps(x + i + 16), s2);
        s3 = _mm256_fmadd_ps(load_row8(w, i + 24, bf16), _mm256_loadu_ps(x + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(load_row8(w, i, bf16), _mm256_loadu_ps(x + i), s0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; i < n; i++) s += (bf16 ? fm_bf16_to_f32(((const uint16_t *)w)[i]) : ((const float *)w)[i]) * x[i];
    return s;
}

static float dot_f32(const float *a, const float *b, int n) { return dot_row(a, 0, b, n); }
static float dot_bf16(const uint16_t *w, const float *x, int n) { return dot_row(w, 1, x, n); }

/* 16 bytes of q4 (32 weights) as fp32: l0/l1 the low nibbles of bytes 0-7/8-15 (elements 0,2,..,14 and
 * 16,..,30), h0/h1 the high nibbles (1,..,15 and 17,..,31). One byte per dword comes from a single
 * in-lane byte shuffle of the broadcast bytes; the nibbles are then a mask and a shift. */
typedef struct {
    __m256 l0, l1, h0, h1;
} q4x32;

static inline q4x32 q4_unpack32(const uint8_t *q) {
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)q));
    const __m256i pick0 = _mm256_setr_epi8(0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1, /* dwords 0-3 */
                                           4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1, -1, -1);
    const __m256i pick1 = _mm256_setr_epi8(8, -1, -1, -1, 9, -1, -1, -1, 10, -1, -1, -1, 11, -1, -1, -1,
                                           12, -1, -1, -1, 13, -1, -1, -1, 14, -1, -1, -1, 15, -1, -1, -1);
    const __m256i b0 = _mm256_shuffle_epi8(v, pick0), b1 = _mm256_shuffle_epi8(v, pick1);
    const __m256i m = _mm256_set1_epi32(0x0F);
    q4x32 r;
    r.l0 = _mm256_cvtepi32_ps(_mm256_and_si256(b0, m));
    r.l1 = _mm256_cvtepi32_ps(_mm256_and_si256(b1, m));
    r.h0 = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));
    r.h1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));
    return r;
}

/* Σ q·x over one q4 group of gs elements (gs a multiple of 32), x permuted per block. */
static inline __m256 q4_group_dot(const uint8_t *q, const float *xp, int gs) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int b = 0; b < gs / 32; b++, q += 16, xp += 32) {
        const q4x32 w = q4_unpack32(q);
        a0 = _mm256_fmadd_ps(w.l0, _mm256_loadu_ps(xp), a0);
        a1 = _mm256_fmadd_ps(w.l1, _mm256_loadu_ps(xp + 8), a1);
        a2 = _mm256_fmadd_ps(w.h0, _mm256_loadu_ps(xp + 16), a2);
        a3 = _mm256_fmadd_ps(w.h1, _mm256_loadu_ps(xp + 24), a3);
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

/* Quantized row: fused dot for one token. */
static float quant_row_dot(const fm_mat *w, int r, const float *x, const float *xsum) {
    const int n = w->cols, gs = w->group_size, ng = n / gs;
    float s[ng], b[ng];
    row_scales(w, r, ng, s, b);
    __m256 acc = _mm256_setzero_ps();
    if (w->dtype == FM_Q4) {
        const uint8_t *q = (const uint8_t *)w->data + (size_t)r * (n / 2);
        for (int g = 0; g < ng; g++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(s[g]), q4_group_dot(q + g * gs / 2, x + g * gs, gs), acc);
    } else {
        const uint8_t *q = (const uint8_t *)w->data + (size_t)r * n;
        for (int g = 0; g < ng; g++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(s[g]), q8_group_dot(q + g * gs, x + g * gs, gs), acc);
    }
    return hsum(acc) + dot_f32(b, xsum, ng);
}

/* Quantized row r against TT ≤ 4 tokens at once: each group's weights are converted to fp32 once, in
 * registers, and used for every token (few tokens per expert in a prefill chunk). out[t] = W[r]·x[t]. */
static void quant_row_dot_multi(const fm_mat *w, int r, const float *const x[4], const float *const xsum[4], int TT,
                                float out[4]) {
    const int n = w->cols, gs = w->group_size, ng = n / gs;
    float sc[ng], bi[ng];
    row_scales(w, r, ng, sc, bi);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int g = 0; g < ng; g++) {
        __m256 ag[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        const int c0 = g * gs;
        if (w->dtype == FM_Q4) {
            const uint8_t *q = (const uint8_t *)w->data + (size_t)r * (n / 2) + c0 / 2;
            for (int b = 0; b < gs / 32; b++, q += 16) {
                const q4x32 wq = q4_unpack32(q);
                const int c = c0 + b * 32;
                for (int t = 0; t < TT; t++) {
                    const float *xt = x[t] + c;
                    ag[t] = _mm256_fmadd_ps(wq.l0, _mm256_loadu_ps(xt), ag[t]);
                    ag[t] = _mm256_fmadd_ps(wq.l1, _mm256_loadu_ps(xt + 8), ag[t]);
                    ag[t] = _mm256_fmadd_ps(wq.h0, _mm256_loadu_ps(xt + 16), ag[t]);
                    ag[t] = _mm256_fmadd_ps(wq.h1, _mm256_loadu_ps(xt + 24), ag[t]);
                }
            }
        } else {
            const uint8_t *q = (const uint8_t *)w->data + (size_t)r * n + c0;
            for (int i = 0; i < gs; i += 16) {
                const __m128i v = _mm_loadu_si128((const __m128i *)(q + i));
                const __m256 q0 = u8x8_to_ps(v), q1 = u8x8_to_ps(_mm_srli_si128(v, 8));
                for (int t = 0; t < TT; t++) {
                    ag[t] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(x[t] + c0 + i), ag[t]);
                    ag[t] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(x[t] + c0 + i + 8), ag[t]);
                }
            }
        }
        const __m256 sg = _mm256_set1_ps(sc[g]);
        for (int t = 0; t < TT; t++) acc[t] = _mm256_fmadd_ps(sg, ag[t], acc[t]);
    }
    for (int t = 0; t < TT; t++) out[t] = hsum(acc[t]) + dot_f32(bi, xsum[t], ng);
}

/* ---------------------------------------------------------------- int8 activations (cpu.h) */

/* 16 bytes of q4 as 32 unsigned bytes: the low nibbles (elements 0, 2, .., 30) in the low lane, the high
 * nibbles (1, 3, .., 31) in the high lane: the permuted order xq comes in. */
static inline __m256i q4_bytes32(const uint8_t *q) {
    const __m128i v = _mm_loadu_si128((const __m128i *)q);
    return _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1),
                            _mm256_set1_epi8(0x0F));
}

/* Σ (q - 128)·xq of one q8 group: maddubs multiplies unsigned by signed bytes, so it takes |q - 128| and
 * xq carrying the sign of q - 128 (pairs at most 2·128·127, no saturation); callers add 128·Σ xq. */
static inline __m256i q8_group_idot(const uint8_t *q, const int8_t *xq, int gs) {
    const __m256i ones = _mm256_set1_epi16(1), off = _mm256_set1_epi8((char)0x80);
    __m256i acc = _mm256_setzero_si256();
    for (int i = 0; i < gs; i += 32) {
        const __m256i qs = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(q + i)), off);
        const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(qs),
                                               _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xq + i)), qs));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
    }
    return acc;
}

/* Row r against one token's int8 activations (decode): Σ_g d_g·(scale_g·Σ q·xq + bias_g·Σ xq), where for
 * q8 Σ q·xq = Σ (q - 128)·xq + 128·Σ xq, so the offset joins the bias: b' = bias + 128·scale. Groups go
 * 8 at a time so the scales and biases convert in one or two instructions each. q4, GS (the group size
 * when a constant, else 0) and SB (bf16 scales and biases) are literals after inlining: one loop per
 * case. More tokens go to the tiles below. */
static inline __attribute__((always_inline)) float int8_row(const fm_mat *w, int r, const fm_matmul_args *a,
                                                            const int q4, const int GS, const int SB) {
    const int n = w->cols, gs = GS ? GS : w->group_size, ng = n / gs;
    const uint8_t *row = (const uint8_t *)w->data + (size_t)r * (q4 ? n / 2 : n);
    const uint16_t *sc = w->scales + (size_t)r * ng, *bi = w->biases + (size_t)r * ng;
    const int8_t *xq = a->xq;
    const __m256 off = _mm256_set1_ps(q4 ? 0.0f : 128.0f);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps(), accb = _mm256_setzero_ps();
    float d[8];
    for (int g0 = 0; g0 < ng; g0 += 8) {
        const int G = ng - g0 < 8 ? ng - g0 : 8;
        const __m256 s = load8s(sc + g0, G, SB), b = _mm256_fmadd_ps(off, s, load8s(bi + g0, G, SB));
        const __m256 dx = load8(a->xd + g0, G);
        accb = _mm256_fmadd_ps(_mm256_mul_ps(b, dx), load8(a->xqs + g0, G), accb);
        _mm256_storeu_ps(d, _mm256_mul_ps(s, dx));
        for (int k = 0; k < G; k++) {
            const int g = g0 + k;
            __m256i dot;
            if (q4) {
                const uint8_t *qg = row + g * gs / 2;
                const int8_t *xg = xq + g * gs;
                __m256i p = _mm256_maddubs_epi16(q4_bytes32(qg), _mm256_loadu_si256((const __m256i *)xg));
                for (int blk = 1; blk < gs / 32; blk++) /* <= 8 blocks (cpu.h): int16 sums do not overflow */
                    p = _mm256_add_epi16(p, _mm256_maddubs_epi16(q4_bytes32(qg + 16 * blk),
                                                                 _mm256_loadu_si256((const __m256i *)(xg + 32 * blk))));
                dot = _mm256_madd_epi16(p, ones);
            } else {
                dot = q8_group_idot(row + g * gs, xq + g * gs, gs);
            }
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d[k]), acc);
        }
    }
    return hsum(_mm256_add_ps(acc, accb));
}

/* Several tokens on int8 activations (prefill): a row pair is unpacked to one byte per weight (q4: the
 * nibbles, in xq's permuted order; q8: q - 128 as signed bytes) so the inner loop is loads and maddubs,
 * then multiplied in 2-row × 4-token tiles (int8_tile). The tokens go in blocks whose activations fit in
 * L2 (a pass over the task's rows per block), so they are not streamed from L3 once per row pair. Same
 * function as int8_row.
 *
 * The tiles read two streams, each front to back through one pointer, so the loop needs few registers
 * (with a pointer per row and per token, GCC spilled the activations to the stack and read them back).
 * A row pair: per group, both rows (gs bytes each), then [s0 s0 s1 s1 b'0 b'0 b'1 b'1] (b' = bias, plus
 * 128·scale for q8). A tile of four tokens: per group, the four tokens' xq (gs bytes each), then
 * [d0 d1 d0 d1 d2 d3 d2 d3] and [e0 e1 e0 e1 e2 e3 e2 e3] (e = d·Σxq), in the order the tile uses them. */
static inline size_t row_pair_stride(int gs) { return 2 * (size_t)gs + 8 * sizeof(float); }
static inline size_t tile_stride(int gs) { return 4 * (size_t)gs + 16 * sizeof(float); }

/* Row r unpacked into the row pair stream W as its row i (0 or 1). NB: blocks of 32 per group, a
 * literal after inlining, so the copy is one straight loop per group. */
static inline __attribute__((always_inline)) void unpack_row_i8(const fm_mat *w, int r, int i, uint8_t *W,
                                                                const int NB) {
    const int n = w->cols, gs = 32 * NB;
    const size_t ws = row_pair_stride(gs);
    uint8_t *o = W + (size_t)i * gs;
    if (w->dtype == FM_Q4) {
        const uint8_t *q = (const uint8_t *)w->data + (size_t)r * (n / 2);
        for (int c0 = 0; c0 < n; c0 += gs, o += ws, q += gs / 2)
            for (int b = 0; b < NB; b++) _mm256_storeu_si256((__m256i *)(o + 32 * b), q4_bytes32(q + 16 * b));
    } else {
        const uint8_t *q = (const uint8_t *)w->data + (size_t)r * n;
        const __m256i off = _mm256_set1_epi8((char)0x80);
        for (int c0 = 0; c0 < n; c0 += gs, o += ws, q += gs)
            for (int b = 0; b < NB; b++)
                _mm256_storeu_si256((__m256i *)(o + 32 * b),
                                    _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(q + 32 * b)), off));
    }
}

/* The scales and biases of rows r0 and r1 into the row pair stream W (groups of gs), as the tile reads
 * them. SB: bf16 scales and biases, a literal. */
static inline __attribute__((always_inline)) void pair_scales(const fm_mat *w, int r0, int r1, uint8_t *W, const int gs,
                                                              const int SB) {
    const int ng = w->cols / gs;
    const size_t ws = row_pair_stride(gs);
    const __m256 off = _mm256_set1_ps(w->dtype == FM_Q4 ? 0.0f : 128.0f);
    const uint16_t *sc0 = w->scales + (size_t)r0 * ng, *sc1 = w->scales + (size_t)r1 * ng;
    const uint16_t *bi0 = w->biases + (size_t)r0 * ng, *bi1 = w->biases + (size_t)r1 * ng;
    for (int g0 = 0; g0 < ng; g0 += 8) { /* 8 groups at a time */
        const int G = ng - g0 < 8 ? ng - g0 : 8;
        const __m256 s0 = load8s(sc0 + g0, G, SB), s1 = load8s(sc1 + g0, G, SB);
        const __m256 b0 = _mm256_fmadd_ps(off, s0, load8s(bi0 + g0, G, SB));
        const __m256 b1 = _mm256_fmadd_ps(off, s1, load8s(bi1 + g0, G, SB));
        const __m256 s01[2] = {_mm256_unpacklo_ps(s0, s1), _mm256_unpackhi_ps(s0, s1)}; /* groups 0,1,4,5 | 2,3,6,7 */
        const __m256 b01[2] = {_mm256_unpacklo_ps(b0, b1), _mm256_unpackhi_ps(b0, b1)};
        for (int h = 0; h < 2; h++) {
            const __m256 S0 = _mm256_shuffle_ps(s01[h], s01[h], 0x50), B0 = _mm256_shuffle_ps(b01[h], b01[h], 0x50);
            const __m256 S1 = _mm256_shuffle_ps(s01[h], s01[h], 0xFA), B1 = _mm256_shuffle_ps(b01[h], b01[h], 0xFA);
            const __m256 v[4] = {_mm256_permute2f128_ps(S0, B0, 0x20), _mm256_permute2f128_ps(S1, B1, 0x20),
                                 _mm256_permute2f128_ps(S0, B0, 0x31), _mm256_permute2f128_ps(S1, B1, 0x31)};
            const int gi[4] = {2 * h, 2 * h + 1, 2 * h + 4, 2 * h + 5};
            for (int k = 0; k < 4; k++)
                if (gi[k] < G) _mm256_storeu_ps((float *)(W + (size_t)(g0 + gi[k]) * ws + 2 * gs), v[k]);
        }
    }
}

/* Rows r0 and r1 (r1 == r0 for a lone last row) into the row pair stream W: their bytes and scales. */
static inline __attribute__((always_inline)) void row_pair(const fm_mat *w, int r0, int r1, uint8_t *W,
                                                           const int NB) {
    unpack_row_i8(w, r0, 0, W, NB);
    unpack_row_i8(w, r1, 1, W, NB);
    if (w->scale_bf16) pair_scales(w, r0, r1, W, 32 * NB, 1);
    else pair_scales(w, r0, r1, W, 32 * NB, 0);
}

/* Tokens t..t+3 of the int8 activations into the tile stream X; slots past te repeat token t. */
static void tile_pack(const fm_matmul_args *a, int t, int te, uint8_t *X) {
    const int n = a->w->cols, gs = a->w->group_size, ng = n / gs;
    const size_t xs = tile_stride(gs);
    for (int k = 0; k < 4; k++) {
        const int tk = t + k < te ? t + k : t, at = (k >> 1) * 4 + (k & 1); /* its places in the d and e rows */
        const int8_t *xq = a->xq + (size_t)tk * n;
        const float *xd = a->xd + (size_t)tk * ng, *xqs = a->xqs + (size_t)tk * ng;
        uint8_t *o = X + (size_t)k * gs;
        for (int g = 0; g < ng; g++, o += xs) {
            for (int c = 0; c < gs; c += 32)
                _mm256_storeu_si256((__m256i *)(o + c), _mm256_loadu_si256((const __m256i *)(xq + (size_t)g * gs + c)));
            float *de = (float *)(o - (size_t)k * gs + 4 * (size_t)gs);
            de[at] = de[at + 2] = xd[g];
            de[8 + at] = de[8 + at + 2] = xd[g] * xqs[g];
        }
    }
}

/* Σ over one group of a row against one token's xq (both at the group's first element), as lane partial
 * sums. q4: pairs q·xq (<= 2·15·127) summed over the group's NB blocks in int16, returned as 16 int16
 * (I16) or widened to 8 int32. q8: Σ (q - 128)·xq per block via |q - 128| and xq signed like q - 128
 * (pairs reach 2·128·127, so each block is widened at once), 8 int32. */
static inline __attribute__((always_inline)) __m256i group_part(const uint8_t *wr, const int8_t *xt, const int q4,
                                                                const int NB, const int I16) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (q4) {
        __m256i p = _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)wr),
                                         _mm256_loadu_si256((const __m256i *)xt));
        for (int b = 1; b < NB; b++) /* <= 8 blocks (cpu.h): no int16 overflow */
            p = _mm256_add_epi16(p, _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(wr + 32 * b)),
                                                         _mm256_loadu_si256((const __m256i *)(xt + 32 * b))));
        return I16 ? p : _mm256_madd_epi16(p, ones);
    }
    __m256i s = _mm256_setzero_si256();
    for (int b = 0; b < NB; b++) {
        const __m256i ws = _mm256_loadu_si256((const __m256i *)(wr + 32 * b));
        const __m256i xs = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xt + 32 * b)), ws);
        s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(ws), xs), ones));
    }
    return s;
}

/* Four lane-partial vectors (of the pairs A, B, C, D) → 8 int32 lanes [A, B, C, D, A, B, C, D], each a
 * sum of a quarter of its pair's lanes. The reduction is unpacks and adds, which run beside the
 * multiplies (on Zen 3 maddubs and madd share two pipes, and FMA, mul and the int→float conversion
 * compete for them; unpacks have two others): the group's conversion and scaling then cost one
 * instruction per four pairs instead of one per pair. I16: int16
 * lanes; each output int16 before the final madd sums 4 of them, so this needs lanes <= 8191 (q4,
 * groups of 32 or 64: 2·2·15·127 = 7620). */
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

/* A row pair (stream W) × a tile (stream X) of ng groups of 32·NB: out[i][t]. Per group and token pair
 * the four (row, token) dots are reduced into one vector [r0·ta, r0·tb, r1·ta, r1·tb] and scaled at once
 * by [s0, s0, s1, s1] ⊙ [da, db, da, db]; the bias term Σ_g b'_g·e_g likewise, both token pairs in one
 * vector. NS = 1: the first token pair only. Software-pipelined: the multiplies of group g + 1 are
 * issued before the reduction and scaling of group g, so the reduction's inputs are ready when it enters
 * the scheduler (the other way round, Zen 3 took ~19 cycles a group instead of ~16.5). */
static inline __attribute__((always_inline)) void int8_tile(const uint8_t *W, const uint8_t *X, int ng,
                                                            float out[2][4], const int NS, const int q4,
                                                            const int NB) {
    const int I16 = q4 && NB <= 2, gs = 32 * NB;
    const size_t ws = row_pair_stride(gs), xs = tile_stride(gs);
    __m256 acc[2], accb = _mm256_setzero_ps(); /* acc: both halves partial sums of the same 4 pairs */
    __m256i p[2][4];                           /* group_part of the next group */
    for (int j = 0; j < NS; j++) acc[j] = _mm256_setzero_ps();
#define TILE_PARTS(Wg, Xg)                                                                                        \
    for (int j = 0; j < NS; j++) {                                                                                \
        const int8_t *xa = (const int8_t *)(Xg) + 2 * j * gs, *xb = xa + gs;                                      \
        p[j][0] = group_part((Wg), xa, q4, NB, I16), p[j][1] = group_part((Wg), xb, q4, NB, I16);                 \
        p[j][2] = group_part((Wg) + gs, xa, q4, NB, I16), p[j][3] = group_part((Wg) + gs, xb, q4, NB, I16);       \
    }
    TILE_PARTS(W, X)
    for (int g = 0; g < ng; g++, W += ws, X += xs) {
        __m256i dot[2];
        for (int j = 0; j < NS; j++) dot[j] = reduce4(p[j][0], p[j][1], p[j][2], p[j][3], I16);
        if (g + 1 < ng) TILE_PARTS(W + ws, X + xs)
        const float *rs = (const float *)(W + 2 * gs), *de = (const float *)(X + 4 * gs);
        const __m256 S = _mm256_broadcast_ps((const __m128 *)rs);
        for (int j = 0; j < NS; j++)
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[j]),
                                     _mm256_mul_ps(S, _mm256_broadcast_ps((const __m128 *)(de + 4 * j))), acc[j]);
        accb = _mm256_fmadd_ps(_mm256_broadcast_ps((const __m128 *)(rs + 4)), _mm256_loadu_ps(de + 8), accb);
    }
#undef TILE_PARTS
    for (int j = 0; j < NS; j++) {
        float o[4];
        _mm_storeu_ps(o, _mm_add_ps(_mm_add_ps(_mm256_castps256_ps128(acc[j]), _mm256_extractf128_ps(acc[j], 1)),
                                    j ? _mm256_extractf128_ps(accb, 1) : _mm256_castps256_ps128(accb)));
        out[0][2 * j] = o[0], out[0][2 * j + 1] = o[1], out[1][2 * j] = o[2], out[1][2 * j + 1] = o[3];
    }
}

/* The tile streams of a block of tokens, per thread (fm_grow). NULL when it cannot be had. */
static uint8_t *tile_buffer(size_t bytes) {
    static _Thread_local void *buf;
    static _Thread_local size_t cap;
    return (uint8_t *)fm_grow(&buf, &cap, bytes, bytes);
}

/* Tokens per block: ~192 KiB of activations, which stay in L2 over the pass through the rows. */
static int tile_block(int n, int T) {
    int tb = (192 * 1024 / n) & ~3;
    if (tb < 4) tb = 4;
    return tb < ((T + 3) & ~3) ? tb : (T + 3) & ~3;
}

static inline __attribute__((always_inline)) void int8_tiles_nb(const fm_matmul_args *a, int r0, int r1, uint8_t *W,
                                                                uint8_t *Xb, const int q4, const int NB) {
    const fm_mat *w = a->w;
    const int n = w->cols, m = w->rows, T = a->T, ng = n / w->group_size, tblock = tile_block(n, T);
    const size_t tile_bytes = (size_t)ng * tile_stride(w->group_size), pair_bytes = (size_t)ng * row_pair_stride(w->group_size);
    for (int tb = 0; tb < T; tb += tblock) {
        const int te = T - tb < tblock ? T : tb + tblock;
        /* Over 8 tokens, 4 row pairs at a time, so a tile's activations are read from L2 once for all four
         * (DeltaNet in_proj at 512 tokens +8%); with one or two tiles, a pair at a time keeps it all in L1
         * (4 would be 10% slower at 8 tokens), bench/RESULTS.md. */
        const int RP = te - tb > 8 ? 4 : 1;
        for (int t = tb; t < te; t += 4) tile_pack(a, t, te, Xb + (size_t)((t - tb) / 4) * tile_bytes);
        for (int r = r0; r < r1; r += 2 * RP) {
            int np = 0, R[4];
            for (; np < RP && r + 2 * np < r1; np++) {
                const int rp = r + 2 * np;
                R[np] = r1 - rp < 2 ? 1 : 2; /* one row left: computed twice */
                row_pair(w, rp, rp + R[np] - 1, W + np * pair_bytes, NB);
            }
            for (int t = tb; t < te; t += 4) {
                const int TT = te - t < 4 ? te - t : 4;
                const uint8_t *X = Xb + (size_t)((t - tb) / 4) * tile_bytes;
                for (int p = 0; p < np; p++) {
                    float out[2][4];
                    if (TT <= 2) int8_tile(W + p * pair_bytes, X, ng, out, 1, q4, NB);
                    else int8_tile(W + p * pair_bytes, X, ng, out, 2, q4, NB);
                    for (int i = 0; i < R[p]; i++)
                        for (int j = 0; j < TT; j++) a->y[(size_t)(t + j) * m + r + 2 * p + i] = out[i][j];
                }
            }
        }
    }
}

/* x[n] → int8 activations (cpu.h) per group of gs (a multiple of 32); permute: each 32-block as 16 even
 * elements, then 16 odd ones (q4). The same numbers as the portable quantize_x: the product x·inv is
 * rounded to fp32 first, then to the nearest integer, ties to even (cvtps in the default MXCSR mode is
 * rintf). */
void fm_quantize_x_avx2(const float *x, int n, int gs, int permute, int8_t *xq, float *xd, float *xqs) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); /* undo packs' per-lane interleave */
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int g = 0; g < n / gs; g++) {
        const float *xg = x + (size_t)g * gs;
        __m256 m = _mm256_setzero_ps();
        for (int i = 0; i < gs; i += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(xg + i), absmask));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
        const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        __m256i sum = _mm256_setzero_si256();
        for (int i = 0; i < gs; i += 32) {
            __m256i v[4];
            for (int k = 0; k < 4; k++) {
                v[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + i + 8 * k), inv));
                sum = _mm256_add_epi32(sum, v[k]);
            }
            __m256i b = _mm256_permutevar8x32_epi32(
                _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3])), order);
            if (permute) b = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(b, split), _MM_SHUFFLE(3, 1, 2, 0));
            _mm256_storeu_si256((__m256i *)(xq + (size_t)g * gs + i), b);
        }
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
        xd[g] = amax / 127.0f;
        xqs[g] = (float)_mm_cvtsi128_si32(s4);
    }
}

/* The int8 paths as functions of their own: inlined into fm_matmul_rows_avx2 they made GCC spill the
 * decode loop's state to the stack (decode 26 tok/s against 34). */
static __attribute__((noinline)) void int8_tiles(const fm_matmul_args *a, int r0, int r1, uint8_t *wbuf) {
    const fm_mat *w = a->w;
    const int q4 = w->dtype == FM_Q4, nb = w->group_size / 32, n = w->cols, ng = n / w->group_size;
    uint8_t *Xb = tile_buffer((size_t)(tile_block(n, a->T) / 4) * ng * tile_stride(w->group_size));
    if (!Xb) { /* no memory for the tile streams: token by token */
        for (int t = 0; t < a->T; t++) {
            fm_matmul_args b = *a;
            b.xq += (size_t)t * n, b.xd += (size_t)t * ng, b.xqs += (size_t)t * ng, b.y += (size_t)t * w->rows;
            for (int r = r0; r < r1; r++)
                b.y[r] = w->scale_bf16 ? int8_row(w, r, &b, q4, 0, 1) : int8_row(w, r, &b, q4, 0, 0);
        }
        return;
    }
    if (q4 && nb == 2) int8_tiles_nb(a, r0, r1, wbuf, Xb, 1, 2);
    else if (nb == 2) int8_tiles_nb(a, r0, r1, wbuf, Xb, 0, 2);
    else if (q4 && nb == 1) int8_tiles_nb(a, r0, r1, wbuf, Xb, 1, 1);
    else if (q4) int8_tiles_nb(a, r0, r1, wbuf, Xb, 1, nb);
    else int8_tiles_nb(a, r0, r1, wbuf, Xb, 0, nb);
}

/* Decode: group size 64 (the converter's default) as a constant lets GCC unroll the block loop: q4
 * matvec 12.5 -> 14.0 GB/s on one thread (bench/RESULTS.md). SB: bf16 scales, a literal. */
static inline __attribute__((always_inline)) void int8_rows(const fm_matmul_args *a, int r0, int r1, const int SB) {
    const fm_mat *w = a->w;
    const int q4 = w->dtype == FM_Q4, g64 = w->group_size == 64;
    const fm_row_prefetch pf = fm_row_prefetch_init(w);
    for (int r = r0; r < r1; r++) {
        fm_row_prefetch_at(w, pf, r, r1);
        a->y[r] = q4 && g64 ? int8_row(w, r, a, 1, 64, SB)
                  : q4      ? int8_row(w, r, a, 1, 0, SB)
                  : g64     ? int8_row(w, r, a, 0, 64, SB)
                            : int8_row(w, r, a, 0, 0, SB);
    }
}

static __attribute__((noinline)) void int8_rows_1(const fm_matmul_args *a, int r0, int r1) {
    if (a->w->scale_bf16) int8_rows(a, r0, r1, 1);
    else int8_rows(a, r0, r1, 0);
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
    float sc[ng], bi[ng];
    row_scales(w, r, ng, sc, bi);
    for (int g = 0; g < ng; g++) {
        const __m256 s = _mm256_set1_ps(sc[g]), b = _mm256_set1_ps(bi[g]);
        float *o = out + g * gs;
        if (w->dtype == FM_Q4) {
            const uint8_t *q = (const uint8_t *)w->data + (size_t)r * (n / 2) + g * gs / 2;
            for (int blk = 0; blk < gs / 32; blk++, q += 16, o += 32) {
                const q4x32 wq = q4_unpack32(q);
                _mm256_storeu_ps(o, _mm256_fmadd_ps(wq.l0, s, b));
                _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(wq.l1, s, b));
                _mm256_storeu_ps(o + 16, _mm256_fmadd_ps(wq.h0, s, b));
                _mm256_storeu_ps(o + 24, _mm256_fmadd_ps(wq.h1, s, b));
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

/* acc[r][t] += Σ_c w[r][c]·x[t][c] for 4 rows × 3 tokens: 12 accumulators; each weight load feeds 3
 * FMAs and each x load 4. Missing rows/tokens point at real ones and their results are dropped. */
static void tile_4x3(const float *const w[4], const float *const x[3], int n, float out[4][3]) {
    __m256 acc[4][3];
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < 3; t++) acc[r][t] = _mm256_setzero_ps();
    int c = 0;
    for (; c + 8 <= n; c += 8) {
        const __m256 x0 = _mm256_loadu_ps(x[0] + c), x1 = _mm256_loadu_ps(x[1] + c), x2 = _mm256_loadu_ps(x[2] + c);
        for (int r = 0; r < 4; r++) {
            const __m256 wr = _mm256_loadu_ps(w[r] + c);
            acc[r][0] = _mm256_fmadd_ps(wr, x0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(wr, x1, acc[r][1]);
            acc[r][2] = _mm256_fmadd_ps(wr, x2, acc[r][2]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < 3; t++) {
            float v = hsum(acc[r][t]);
            for (int i = c; i < n; i++) v += w[r][i] * x[t][i];
            out[r][t] = v;
        }
}

void fm_matmul_rows_avx2(const fm_matmul_args *a, int r0, int r1, float *rowbuf) {
    const fm_mat *w = a->w;
    const int n = w->cols, m = w->rows, T = a->T;
    const float *x = w->dtype == FM_Q4 ? a->xp : a->x; /* q4 works in the permuted order */
    if (a->xq && T > 1) { /* int8 activations, several tokens: unpacked rows in tiles (2x the row kernel
                            * from 2 tokens on, bench/RESULTS.md) */
        int8_tiles(a, r0, r1, (uint8_t *)rowbuf); /* rowbuf: room for 4 row pair streams, 4·(2·cols + 32·ng) bytes */
        return;
    }
    if (a->xq) { /* int8 activations, one token: rows straight from their packed form */
        int8_rows_1(a, r0, r1);
        return;
    }
    if (a->xsum && T > 1) { /* few tokens, quantized: fused, tokens in groups of 4 */
        const int ng = n / w->group_size;
        for (int r = r0; r < r1; r++)
            for (int tb = 0; tb < T; tb += 4) {
                const int TT = T - tb < 4 ? T - tb : 4;
                const float *xt[4], *st[4];
                for (int j = 0; j < TT; j++) {
                    xt[j] = x + (size_t)(tb + j) * n;
                    st[j] = a->xsum + (size_t)(tb + j) * ng;
                }
                float out[4];
                quant_row_dot_multi(w, r, xt, st, TT, out);
                for (int j = 0; j < TT; j++) a->y[(size_t)(tb + j) * m + r] = out[j];
            }
        return;
    }
    if (T == 1) {
        const fm_row_prefetch pf = fm_row_prefetch_init(w);
        for (int r = r0; r < r1; r++) {
            fm_row_prefetch_at(w, pf, r, r1);
            if (w->dtype == FM_Q4 || w->dtype == FM_Q8) a->y[r] = quant_row_dot(w, r, x, a->xsum);
            else if (w->dtype == FM_BF16) a->y[r] = dot_bf16((const uint16_t *)w->data + (size_t)r * n, x, n);
            else a->y[r] = dot_f32((const float *)w->data + (size_t)r * n, x, n);
        }
        return;
    }
    /* Several tokens: dequantize 4 rows at a time (rowbuf holds 4 rows), then 4×3 register tiles. */
    for (int rb = r0; rb < r1; rb += 4) {
        const int R = r1 - rb < 4 ? r1 - rb : 4;
        const float *wr[4];
        for (int i = 0; i < 4; i++) {
            const int r = rb + (i < R ? i : 0);
            if (w->dtype == FM_F32) {
                wr[i] = (const float *)w->data + (size_t)r * n;
            } else {
                if (i < R) dequant_row(w, r, rowbuf + (size_t)i * n);
                wr[i] = rowbuf + (size_t)(i < R ? i : 0) * n;
            }
        }
        for (int tb = 0; tb < T; tb += 3) {
            const int TT = T - tb < 3 ? T - tb : 3;
            const float *xt[3];
            for (int j = 0; j < 3; j++) xt[j] = x + (size_t)(tb + (j < TT ? j : 0)) * n;
            float out[4][3];
            tile_4x3(wr, xt, n, out);
            for (int i = 0; i < R; i++)
                for (int j = 0; j < TT; j++) a->y[(size_t)(tb + j) * m + rb + i] = out[i][j];
        }
    }
}
