/*
 * matmul_avx2.c — y[T, rows] = x[T, cols] · Wᵀ for rows [r0, r1), AVX2 + FMA (x86-64).
 *
 * Compiled with -mavx2 -mfma -mf16c and called only when the CPU has AVX2 and FMA (ops.c dispatches;
 * every AVX2 CPU has F16C).
 *
 * Batch invariance: every path computes a (row, token) output in one fixed order, so a token's outputs are
 * bitwise the same whatever batch, position in it, or thread count it ran with (tests/test_batch_invariance.py).
 * fp32 activations: the row as fp32 (bf16 widened; q4/q8 as fma(q, scale, bias)), one 8-lane chain
 * acc = fma(w[c, c+8), x[c, c+8), acc) for c = 0, 8, .., hsum, then the last cols % 8 by fmaf in order.
 * Decode runs 4 rows at a time (4 chains for the ILP), quantized rows dequantized in registers; several
 * tokens dequantize 4 rows once into rowbuf and multiply them with 3 tokens at a time in register tiles.
 * int8 activations: the order of matmul_x86.h, in 4-row decode groups and in 2-row × 4-token tiles.
 *
 * q4 bytes hold elements 2j (low nibble) and 2j+1 (high nibble); instead of shuffling nibbles into
 * order, the caller passes x permuted per 32-element block (16 even elements, then 16 odd ones), so a
 * masked byte vector lines up with 16 consecutive floats (the chain above runs in that order).
 */
#include "../../core/util.h"
#include "matmul_x86.h"

static inline __m256 u8x8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }

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

/* ---------------------------------------------------------------- int8 activations (cpu.h) */

/* 16 bytes of q4 as 32 unsigned bytes: the low nibbles (elements 0, 2, .., 30) in the low lane, the high
 * nibbles (1, 3, .., 31) in the high lane: the permuted order xq comes in. */
static inline __m256i q4_bytes32(const uint8_t *q) {
    const __m128i v = _mm_loadu_si128((const __m128i *)q);
    return _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1),
                            _mm256_set1_epi8(0x0F));
}

/* Several tokens on int8 activations (prefill): a row pair is unpacked to one byte per weight (q4: the
 * nibbles, in xq's permuted order; q8: q - 128 as signed bytes) so the inner loop is loads and maddubs,
 * then multiplied in 2-row × 4-token tiles (int8_tile). The tokens go in blocks whose activations fit in
 * L2 (a pass over the task's rows per block), so they are not streamed from L3 once per row pair. The
 * same bits as decode's int8_rows4 (the order of matmul_x86.h).
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
 * sums. The row is unpacked (a row pair stream: q4 nibbles as bytes, q8 as q - 128) or, PK, packed as
 * stored. q4: pairs q·xq (<= 2·15·127) summed over the group's NB blocks in int16, returned as 16 int16
 * (I16) or widened to 8 int32. q8: Σ (q - 128)·xq per block via |q - 128| and xq signed like q - 128
 * (pairs reach 2·128·127, so each block is widened at once), 8 int32. */
static inline __attribute__((always_inline)) __m256i group_part(const uint8_t *wr, const int8_t *xt, const int q4,
                                                                const int NB, const int I16, const int PK) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (q4) {
        __m256i p = _mm256_setzero_si256();
        for (int b = 0; b < NB; b++) { /* <= 8 blocks (cpu.h): no int16 overflow */
            const __m256i wb = PK ? q4_bytes32(wr + 16 * b) : _mm256_loadu_si256((const __m256i *)(wr + 32 * b));
            const __m256i m = _mm256_maddubs_epi16(wb, _mm256_loadu_si256((const __m256i *)(xt + 32 * b)));
            p = b ? _mm256_add_epi16(p, m) : m;
        }
        return I16 ? p : _mm256_madd_epi16(p, ones);
    }
    __m256i s = _mm256_setzero_si256();
    for (int b = 0; b < NB; b++) {
        __m256i ws = _mm256_loadu_si256((const __m256i *)(wr + 32 * b));
        if (PK) ws = _mm256_xor_si256(ws, _mm256_set1_epi8((char)0x80));
        const __m256i xs = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xt + 32 * b)), ws);
        s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(ws), xs), ones));
    }
    return s;
}

/* A row pair (stream W) × a tile (stream X) of ng groups of 32·NB: out[i][t], in the order of matmul_x86.h.
 * Per group the eight (row, token) dots are reduced into one vector [r0·ta, r0·tb, r1·ta, r1·tb | the same
 * for tc, td] and scaled at once by [s0, s0, s1, s1]·[da, db, da, db | dc, dd, dc, dd]; the bias term
 * likewise. NS = 1: the first token pair only (the upper half is then computed and dropped).
 * Software-pipelined: the multiplies of group g + 1 are issued before the reduction and scaling of group
 * g, so the reduction's inputs are ready when it enters the scheduler (the other way round, Zen 3 took
 * ~19 cycles a group instead of ~16.5). */
static inline __attribute__((always_inline)) void int8_tile(const uint8_t *W, const uint8_t *X, int ng,
                                                            float out[2][4], const int NS, const int q4,
                                                            const int NB) {
    const int I16 = q4 && NB <= 2, gs = 32 * NB;
    const size_t ws = row_pair_stride(gs), xs = tile_stride(gs);
    __m256 acc = _mm256_setzero_ps(), accb = _mm256_setzero_ps();
    __m256i p[2][4]; /* group_part of the next group */
#define TILE_PARTS(Wg, Xg)                                                                                        \
    for (int j = 0; j < NS; j++) {                                                                                \
        const int8_t *xa = (const int8_t *)(Xg) + 2 * j * gs, *xb = xa + gs;                                      \
        p[j][0] = group_part((Wg), xa, q4, NB, I16, 0), p[j][1] = group_part((Wg), xb, q4, NB, I16, 0);           \
        p[j][2] = group_part((Wg) + gs, xa, q4, NB, I16, 0), p[j][3] = group_part((Wg) + gs, xb, q4, NB, I16, 0); \
    }
    TILE_PARTS(W, X)
    for (int g = 0; g < ng; g++, W += ws, X += xs) {
        const __m256i d0 = reduce4(p[0][0], p[0][1], p[0][2], p[0][3], I16);
        const __m256i d1 = NS == 2 ? reduce4(p[1][0], p[1][1], p[1][2], p[1][3], I16) : d0;
        if (g + 1 < ng) TILE_PARTS(W + ws, X + xs)
        /* whole dots: [pair 0 | pair 1], each half the sum of its reduce4's two halves */
        const __m256i dot = _mm256_add_epi32(_mm256_permute2x128_si256(d0, d1, 0x20),
                                             _mm256_permute2x128_si256(d0, d1, 0x31));
        const float *rs = (const float *)(W + 2 * gs), *de = (const float *)(X + 4 * gs);
        const __m256 sd = _mm256_mul_ps(_mm256_broadcast_ps((const __m128 *)rs), _mm256_loadu_ps(de));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sd, acc);
        accb = _mm256_fmadd_ps(_mm256_broadcast_ps((const __m128 *)(rs + 4)), _mm256_loadu_ps(de + 8), accb);
    }
#undef TILE_PARTS
    float o[8];
    _mm256_storeu_ps(o, _mm256_add_ps(acc, accb));
    for (int j = 0; j < NS; j++)
        out[0][2 * j] = o[4 * j], out[0][2 * j + 1] = o[4 * j + 1], out[1][2 * j] = o[4 * j + 2],
        out[1][2 * j + 1] = o[4 * j + 3];
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
 * elements, then 16 odd ones (q4). The same numbers as the portable fm_quantize_x_c (quantize_x.h): the
 * product x·inv is rounded to fp32 first, then to the nearest integer, ties to even (cvtps in the default
 * MXCSR mode is rintf). */
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

/* Decode, q4: two blocks' xq in the AVX2 order (per 32-block: 16 evens, then 16 odds) → their evens (xl)
 * and odds (xh), so that a 32-byte load of the packed row needs one mask or shift per nibble and no
 * shuffle (q4_bytes32 takes four instructions per 16 bytes). */
static inline void x_pair(const int8_t *xq, __m256i *xl, __m256i *xh) {
    const __m256i x0 = _mm256_loadu_si256((const __m256i *)xq), x1 = _mm256_loadu_si256((const __m256i *)(xq + 32));
    *xl = _mm256_permute2x128_si256(x0, x1, 0x20);
    *xh = _mm256_permute2x128_si256(x0, x1, 0x31);
}

/* Decode on int8 activations: rows r[0..3] (the lanes) against one token, straight from their packed form,
 * in the order of matmul_x86.h; a group's xq is loaded (and for q4 split, x_pair) once for the four rows.
 * s4, b4: scales4's; e[g] = d_g·Σxq_g. NB (32-blocks a group) is a literal for groups of 64 (the
 * converter's default), so GCC unrolls the block loop: q4 matvec 12.5 -> 14.0 GB/s on one thread
 * (bench/RESULTS.md). */
static inline __attribute__((always_inline)) __m128 int8_rows4(const fm_mat *w, const int r[4], const fm_matmul_args *a,
                                                               const float *e, const float *s4, const float *b4,
                                                               const int q4, const int NB) {
    const int n = w->cols, gs = 32 * NB, ng = n / gs, I16 = q4 && NB <= 2, gb = q4 ? gs / 2 : gs;
    const uint8_t *row[4];
    for (int i = 0; i < 4; i++) row[i] = (const uint8_t *)w->data + (size_t)r[i] * (q4 ? n / 2 : n);
    __m128 acc = _mm_setzero_ps(), accb = _mm_setzero_ps();
    for (int g = 0; g < ng; g++) {
        const int8_t *xg = a->xq + (size_t)g * gs;
        __m256i p[4];
        if (q4 && NB % 2 == 0) { /* pairs of blocks; int16 sums as group_part's */
            const __m256i m = _mm256_set1_epi8(0x0F);
            for (int i = 0; i < 4; i++) p[i] = _mm256_setzero_si256();
            for (int b = 0; b < NB; b += 2) {
                __m256i xl, xh;
                x_pair(xg + 32 * b, &xl, &xh);
                for (int i = 0; i < 4; i++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(row[i] + (size_t)g * gb + 16 * b));
                    p[i] = _mm256_add_epi16(p[i], _mm256_add_epi16(
                        _mm256_maddubs_epi16(_mm256_and_si256(v, m), xl),
                        _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m), xh)));
                }
            }
            if (!I16)
                for (int i = 0; i < 4; i++) p[i] = _mm256_madd_epi16(p[i], _mm256_set1_epi16(1));
        } else {
            for (int i = 0; i < 4; i++) p[i] = group_part(row[i] + (size_t)g * gb, xg, q4, NB, I16, 1);
        }
        fold4(halves_sum(reduce4(p[0], p[1], p[2], p[3], I16)), s4 + 4 * g, b4 + 4 * g, a->xd[g], e[g], &acc, &accb);
    }
    return _mm_add_ps(acc, accb);
}

/* Rows [r0, r1) against one token, 4 at a time (rows past r1 repeat the first, their results dropped). */
static inline __attribute__((always_inline)) void int8_rows_nb(const fm_matmul_args *a, int r0, int r1, const int q4,
                                                               const int NB, const int SB) {
    const fm_mat *w = a->w;
    const int ng = w->cols / w->group_size, ng8 = (ng + 7) & ~7;
    float e[ng], s4[4 * ng8], b4[4 * ng8];
    for (int g = 0; g < ng; g++) e[g] = a->xd[g] * a->xqs[g];
    const fm_row_prefetch pf = fm_row_prefetch_init(w);
    for (int rb = r0; rb < r1; rb += 4) {
        int r[4];
        for (int i = 0; i < 4; i++) {
            r[i] = rb + i < r1 ? rb + i : rb;
            fm_row_prefetch_at(w, pf, rb + i, r1);
        }
        scales4(w, r, q4 ? 0.0f : 128.0f, s4, b4, SB);
        float o[4];
        _mm_storeu_ps(o, int8_rows4(w, r, a, e, s4, b4, q4, NB));
        for (int i = 0; i < 4 && rb + i < r1; i++) a->y[rb + i] = o[i];
    }
}

/* The int8 paths as functions of their own: inlined into fm_matmul_rows_avx2 they made GCC spill the
 * decode loop's state to the stack (decode 26 tok/s against 34). */
static __attribute__((noinline)) void int8_rows_1(const fm_matmul_args *a, int r0, int r1) {
    const int q4 = a->w->dtype == FM_Q4, nb = a->w->group_size / 32;
#define ROWS_SB(SB)                                                         \
    (q4 && nb == 2 ? int8_rows_nb(a, r0, r1, 1, 2, SB)                      \
     : q4          ? int8_rows_nb(a, r0, r1, 1, nb, SB)                     \
     : nb == 2     ? int8_rows_nb(a, r0, r1, 0, 2, SB)                      \
                   : int8_rows_nb(a, r0, r1, 0, nb, SB))
    if (a->w->scale_bf16) ROWS_SB(1);
    else ROWS_SB(0);
#undef ROWS_SB
}

static __attribute__((noinline)) void int8_tiles(const fm_matmul_args *a, int r0, int r1, uint8_t *wbuf) {
    const fm_mat *w = a->w;
    const int q4 = w->dtype == FM_Q4, nb = w->group_size / 32, n = w->cols, ng = n / w->group_size;
    uint8_t *Xb = tile_buffer((size_t)(tile_block(n, a->T) / 4) * ng * tile_stride(w->group_size));
    if (!Xb) { /* no memory for the tile streams: token by token (the same order) */
        for (int t = 0; t < a->T; t++) {
            fm_matmul_args b = *a;
            b.xq += (size_t)t * n, b.xd += (size_t)t * ng, b.xqs += (size_t)t * ng, b.y += (size_t)t * w->rows;
            int8_rows_1(&b, r0, r1);
        }
        return;
    }
    if (q4 && nb == 2) int8_tiles_nb(a, r0, r1, wbuf, Xb, 1, 2);
    else if (nb == 2) int8_tiles_nb(a, r0, r1, wbuf, Xb, 0, 2);
    else if (q4 && nb == 1) int8_tiles_nb(a, r0, r1, wbuf, Xb, 1, 1);
    else if (q4) int8_tiles_nb(a, r0, r1, wbuf, Xb, 1, nb);
    else int8_tiles_nb(a, r0, r1, wbuf, Xb, 0, nb);
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

/* out[r][t] = w[r]·x[t] for 4 rows × TT <= 3 tokens (a literal), in the one fp32 order of this file: per
 * (r, t) a chain of 8 lanes over the columns, hsum, then the last cols % 8 by fmaf. 12 accumulators at
 * TT = 3: each weight load feeds 3 FMAs and each x load 4. w: fp32 rows, or bf16 ones widened here (bf16,
 * a literal). Missing rows/tokens point at real ones and their results are dropped. */
static inline __attribute__((always_inline)) void dot_tile(const void *const w[4], const int bf16,
                                                           const float *const x[3], int n, float out[4][3],
                                                           const int TT) {
    __m256 acc[4][3];
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < TT; t++) acc[r][t] = _mm256_setzero_ps();
    int c = 0;
    for (; c + 8 <= n; c += 8) {
        __m256 xv[3];
        for (int t = 0; t < TT; t++) xv[t] = _mm256_loadu_ps(x[t] + c);
        for (int r = 0; r < 4; r++) {
            const __m256 wr = load_row8(w[r], c, bf16);
            for (int t = 0; t < TT; t++) acc[r][t] = _mm256_fmadd_ps(wr, xv[t], acc[r][t]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < TT; t++) {
            float v = hsum(acc[r][t]);
            for (int i = c; i < n; i++)
                v = fmaf(bf16 ? fm_bf16_to_f32(((const uint16_t *)w[r])[i]) : ((const float *)w[r])[i], x[t][i], v);
            out[r][t] = v;
        }
}

static void dot_tile_tt(const float *const w[4], const float *const x[3], int n, float out[4][3], int TT) {
    const void *const *wv = (const void *const *)w;
    if (TT == 3) dot_tile(wv, 0, x, n, out, 3);
    else if (TT == 2) dot_tile(wv, 0, x, n, out, 2);
    else dot_tile(wv, 0, x, n, out, 1);
}

/* Decode on q4/q8 weights: rows r[0..3] against one token, each dequantized in registers to dequant_row's
 * values (fma(q, scale, bias)) and dotted in dot_tile's order; the four chains give the ILP. */
static inline __attribute__((always_inline)) void quant_rows4(const fm_mat *w, const int r[4], const float *x,
                                                              float out[4], const int q4) {
    const int n = w->cols, gs = w->group_size, ng = n / gs;
    float sc[4][ng], bi[4][ng];
    const uint8_t *q[4];
    __m256 acc[4];
    for (int i = 0; i < 4; i++) {
        row_scales(w, r[i], ng, sc[i], bi[i]);
        q[i] = (const uint8_t *)w->data + (size_t)r[i] * (q4 ? n / 2 : n);
        acc[i] = _mm256_setzero_ps();
    }
    for (int g = 0; g < ng; g++) {
        __m256 S[4], B[4];
        for (int i = 0; i < 4; i++) S[i] = _mm256_set1_ps(sc[i][g]), B[i] = _mm256_set1_ps(bi[i][g]);
        for (int c = g * gs; c < (g + 1) * gs; c += q4 ? 32 : 8) /* the rows side by side: 4 chains in flight */
            for (int i = 0; i < 4; i++) {
                if (q4) {
                    const q4x32 wq = q4_unpack32(q[i] + c / 2);
                    acc[i] = _mm256_fmadd_ps(_mm256_fmadd_ps(wq.l0, S[i], B[i]), _mm256_loadu_ps(x + c), acc[i]);
                    acc[i] = _mm256_fmadd_ps(_mm256_fmadd_ps(wq.l1, S[i], B[i]), _mm256_loadu_ps(x + c + 8), acc[i]);
                    acc[i] = _mm256_fmadd_ps(_mm256_fmadd_ps(wq.h0, S[i], B[i]), _mm256_loadu_ps(x + c + 16), acc[i]);
                    acc[i] = _mm256_fmadd_ps(_mm256_fmadd_ps(wq.h1, S[i], B[i]), _mm256_loadu_ps(x + c + 24), acc[i]);
                } else {
                    const __m256 wv = _mm256_fmadd_ps(u8x8_to_ps(_mm_loadl_epi64((const __m128i *)(q[i] + c))), S[i], B[i]);
                    acc[i] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + c), acc[i]);
                }
            }
    }
    for (int i = 0; i < 4; i++) out[i] = hsum(acc[i]);
}

/* One token (decode), 4 rows at a time, each read once straight from its packed form (rows past r1 repeat
 * the first, their results dropped). */
static __attribute__((noinline)) void rows_1(const fm_matmul_args *a, const float *x, int r0, int r1) {
    const fm_mat *w = a->w;
    const int n = w->cols;
    const fm_row_prefetch pf = fm_row_prefetch_init(w);
    const size_t rb_bytes = (size_t)fm_tensor_data_bytes(w->dtype, 1, n);
    for (int rb = r0; rb < r1; rb += 4) {
        int r[4];
        const void *wr[4];
        for (int i = 0; i < 4; i++) {
            r[i] = rb + i < r1 ? rb + i : rb;
            wr[i] = (const uint8_t *)w->data + (size_t)r[i] * rb_bytes;
            fm_row_prefetch_at(w, pf, rb + i, r1);
        }
        float out[4][3], y[4];
        const float *const xt[3] = {x, x, x};
        switch (w->dtype) {
        case FM_Q4: quant_rows4(w, r, x, y, 1); break;
        case FM_Q8: quant_rows4(w, r, x, y, 0); break;
        case FM_BF16: dot_tile(wr, 1, xt, n, out, 1); break;
        case FM_F32: dot_tile(wr, 0, xt, n, out, 1); break;
        }
        const int quant = w->dtype == FM_Q4 || w->dtype == FM_Q8;
        for (int i = 0; i < 4 && rb + i < r1; i++) a->y[rb + i] = quant ? y[i] : out[i][0];
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
    if (T == 1) {
        rows_1(a, x, r0, r1);
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
            dot_tile_tt(wr, xt, n, out, TT);
            for (int i = 0; i < R; i++)
                for (int j = 0; j < TT; j++) a->y[(size_t)(tb + j) * m + rb + i] = out[i][j];
        }
    }
}
