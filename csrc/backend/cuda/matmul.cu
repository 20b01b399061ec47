/*
 * matmul.cu — the CUDA matmul and embedding lookup (cuda_kernels.h): y[T, rows] = x[T, cols] · Wᵀ for W f32,
 * bf16, q8 or q4 (group-wise affine, docs/FORMAT.md) as cpu.h's fm_cpu_matmul computes it, on fp32
 * activations or, for q4/q8 with w->int8_act, on int8 ones; and out[t] = row ids[t] of W dequantized.
 *
 * One kernel template, fm_mm, for every weight type and every token count. A warp owns R rows; a lane takes
 * 16 bytes of a row at a time, a chunk of V columns (f32 4, bf16 8, q8 16, q4 32), lane l the chunks at
 * columns (32·s + l)·V for s = 0, 1, ..., so each load instruction of the warp reads 512 contiguous bytes
 * of a row. Per (row, token) a lane sums its chunks in column order (fp32, explicit fmaf: no contraction
 * left to the compiler), and the warp adds its 32 lanes in one xor butterfly (16, 8, 4, 2, 1).
 *   f32/bf16: acc = fma(w, x, acc) per column.
 *   q4/q8 on fp32 x: per chunk (q4 with groups of 16·odd: per 16-column half) dot = Σ q·x, xs = Σ x, then
 *       acc = fma(scale, dot, fma(bias, xs, acc)) (the factorisation of the CPU's SIMD kernels).
 *   q4/q8 on int8 x (cpu.h): fm_quantize_x first rounds each token's x per weight group exactly as the CPU
 *       does (m = max|x|, xq = rint(x·(127/m)), xd = m/127, correctly rounded), then per chunk
 *       dot = Σ q·xq (dp4a, exact) and acc = fma(xd, fma(scale, dot, bias·Σxq), acc): the CPU's group terms
 *       split at chunk boundaries (Σ xq of each chunk comes from the quantizer).
 * The kernel keeps NT tokens' accumulators (1: decode; 4, 8: prefill, each weight load used NT times) and
 * unrolls U chunks of loads ahead (decode: more bytes in flight).
 *
 * Batch invariance (backend.h): a (row, token)'s arithmetic is fixed by the columns alone — which lane takes
 * which chunk, the order within a lane, the butterfly — while T, NT, R, U, the grid and the choice of vector
 * or scalar loads (by alignment) only change how many accumulators exist and which loads fill them. So a
 * token's outputs are the same bits in decode and at any place of any prefill.
 *
 * Not tensor cores: an MMA's K order is its tile's (and unspecified), so decode would have to run the same
 * MMA tiles (a token padded to 8 or 16, and the weights staged as fp16/bf16/tf32 tiles, which changes the
 * numerics for f32 x) to stay invariant. A tensor-core prefill would need: the decode matvec built from the
 * same m16n8k16 (or wgmma) tiles with one fixed K split, x in bf16/fp16 or int8 (the int8 path maps onto
 * IMMA s8·u8 exactly, since integer sums are order-free: only the per-group fp32 terms need a fixed order).
 */
#include <cuda_fp16.h>
#include <stdint.h>

#include "cuda_kernels.h"

namespace {

enum { MM_F32, MM_BF16, MM_Q4, MM_Q8, MM_Q4I8, MM_Q8I8 };

/* columns per 16-byte chunk of a weight row */
__host__ __device__ constexpr int mm_chunk(int p) {
    return p == MM_F32 ? 4 : p == MM_BF16 ? 8 : (p == MM_Q8 || p == MM_Q8I8) ? 16 : 32;
}

struct mm_args {
    const void *w;                   /* [rows, cols]: f32, bf16 or packed q */
    const uint16_t *scales, *biases; /* [rows, ng] fp16 or bf16 bits (q4, q8) */
    const float *x;                  /* [T, cols] fp32 activations */
    const int8_t *xq;                /* [T, cols] int8 activations (q4: each 8 as evens then odds) */
    const float *xd;                 /* [T, ng] the step of each group */
    const float *xs;                 /* [T, cols / V] Σ xq of each chunk */
    float *y;                        /* [T, rows] */
    size_t row_bytes;
    int rows, cols, gs, ng, T, sbf16;
};

/* a stored scale or bias: fp16 (subnormals exact), or bfloat16, the top 16 bits of a float32 */
__device__ __forceinline__ float scale_value(uint32_t bits, int bf16) {
    return bf16 ? __uint_as_float(bits << 16) : __half2float(__ushort_as_half((unsigned short)bits));
}

/* byte e of w (0..255) as an exact float: the float 2^23 + q (one byte permute), less 2^23 */
__device__ __forceinline__ float byte_at(uint32_t w, int e) {
    return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440u + e)) - 8388608.0f;
}

/* Σ 4 bytes: a (unsigned) · b (signed) + c, exact */
__device__ __forceinline__ int dp4a_us(uint32_t a, uint32_t b, int c) {
    int d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ uint32_t word(const uint4 &v, int m) { return m == 0 ? v.x : m == 1 ? v.y : m == 2 ? v.z : v.w; }

/* The chunk of row `row` at column k (k < cols). VEC: one 16-byte load (the launcher checked the alignment
 * and that every chunk is whole); else word or element loads, 0 past the end of the row. */
template <int P, bool VEC>
__device__ __forceinline__ uint4 load_w(const mm_args &a, int row, int k) {
    constexpr int V = mm_chunk(P);
    const char *p = (const char *)a.w + (size_t)row * a.row_bytes + (size_t)(k / V) * 16;
    if (VEC) return __ldg((const uint4 *)p);
    uint32_t u[4];
    if (P == MM_BF16) { /* rows of an odd length are only 2-byte aligned */
        const uint16_t *h = (const uint16_t *)p;
#pragma unroll
        for (int m = 0; m < 4; m++) {
            const uint32_t lo = k + 2 * m < a.cols ? __ldg(h + 2 * m) : 0u;
            const uint32_t hi = k + 2 * m + 1 < a.cols ? __ldg(h + 2 * m + 1) : 0u;
            u[m] = lo | (hi << 16);
        }
    } else { /* a word is V/4 columns; rows end on a whole word (f32: 1, q4: 8 of cols % 16 == 0, q8: 4) */
        const uint32_t *q = (const uint32_t *)p;
#pragma unroll
        for (int m = 0; m < 4; m++) u[m] = k + m * (V / 4) < a.cols ? __ldg(q + m) : 0u;
    }
    return make_uint4(u[0], u[1], u[2], u[3]);
}

/* N fp32 activations of row xt from column k; 0 past cols (scalar loads unless VEC) */
template <int N, bool VEC>
__device__ __forceinline__ void load_x(float (&v)[N], const float *xt, int k, int cols) {
    if (VEC) {
#pragma unroll
        for (int i = 0; i < N / 4; i++) {
            const float4 f = __ldg((const float4 *)(xt + k) + i);
            v[4 * i] = f.x, v[4 * i + 1] = f.y, v[4 * i + 2] = f.z, v[4 * i + 3] = f.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; i++) v[i] = k + i < cols ? __ldg(xt + k + i) : 0.0f;
    }
}

/* ---- one chunk of R rows (wv, and sb: scale | bias << 16 per group of the chunk) for the tile's tokens */

template <int P, int R, int NT, bool VEC>
__device__ __forceinline__ void chunk_dense(const mm_args &a, float (&acc)[R][NT], const uint4 (&wv)[R], int k, int t0,
                                            int nt) {
    constexpr int V = mm_chunk(P);
#pragma unroll
    for (int p = 0; p < V; p += 4) { /* 4 columns at a time (fewer live registers; the same order per output) */
        float wf[R][4];
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const uint32_t u = word(wv[r], P == MM_F32 ? i : (p + i) / 2);
                wf[r][i] = P == MM_F32 ? __uint_as_float(u) : __uint_as_float(i & 1 ? u & 0xFFFF0000u : u << 16);
            }
#pragma unroll
        for (int j = 0; j < NT; j++) {
            if (j >= nt) break;
            float xv[4];
            load_x<4, VEC>(xv, a.x + (size_t)(t0 + j) * a.cols, k + p, a.cols);
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int i = 0; i < 4; i++)
                    if (VEC || k + p + i < a.cols) acc[r][j] = fmaf(wf[r][i], xv[i], acc[r][j]);
        }
    }
}

/* q4 (SPLIT: a group per 16-column half, for group sizes 16·odd) or q8 on fp32 activations */
template <int P, int R, int NT, bool VEC, bool SPLIT>
__device__ __forceinline__ void chunk_q(const mm_args &a, float (&acc)[R][NT], const uint4 (&wv)[R],
                                        const uint32_t (&sb)[R][SPLIT ? 2 : 1], int k, int t0, int nt) {
    constexpr int WV = P == MM_Q4 ? 8 : 4; /* columns per word */
    constexpr int HALVES = SPLIT ? 2 : 1, WORDS = 4 / HALVES;
    float dot[R][NT], xs[NT];
#pragma unroll
    for (int h = 0; h < HALVES; h++) {
        if (h == 1 && k + 16 >= a.cols) break; /* a q4 row of 16·odd columns ends on a half chunk */
#pragma unroll
        for (int j = 0; j < NT; j++) {
            xs[j] = 0.0f;
#pragma unroll
            for (int r = 0; r < R; r++) dot[r][j] = 0.0f;
        }
#pragma unroll
        for (int m = h * WORDS; m < (h + 1) * WORDS; m++) {
            float wf[R][WV];
#pragma unroll
            for (int r = 0; r < R; r++) {
                const uint32_t u = word(wv[r], m);
                if (P == MM_Q4) { /* the even and the odd nibbles as bytes, then a byte each */
                    const uint32_t lo = u & 0x0F0F0F0Fu, hi = (u >> 4) & 0x0F0F0F0Fu;
#pragma unroll
                    for (int e = 0; e < WV; e++) wf[r][e] = byte_at(e & 1 ? hi : lo, e >> 1);
                } else {
#pragma unroll
                    for (int e = 0; e < WV; e++) wf[r][e] = byte_at(u, e);
                }
            }
#pragma unroll
            for (int j = 0; j < NT; j++) {
                if (j >= nt) break;
                float xv[WV];
                load_x<WV, VEC>(xv, a.x + (size_t)(t0 + j) * a.cols, k + m * WV, a.cols);
#pragma unroll
                for (int e = 0; e < WV; e++) xs[j] += xv[e];
#pragma unroll
                for (int r = 0; r < R; r++)
#pragma unroll
                    for (int e = 0; e < WV; e++) dot[r][j] = fmaf(wf[r][e], xv[e], dot[r][j]);
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            const float s = scale_value(sb[r][h] & 0xFFFFu, a.sbf16), b = scale_value(sb[r][h] >> 16, a.sbf16);
#pragma unroll
            for (int j = 0; j < NT; j++) acc[r][j] = fmaf(s, dot[r][j], fmaf(b, xs[j], acc[r][j]));
        }
    }
}

/* q4 or q8 on int8 activations: a chunk lies in one group (group sizes are multiples of 32) */
template <int P, int R, int NT>
__device__ __forceinline__ void chunk_i8(const mm_args &a, float (&acc)[R][NT], const uint4 (&wv)[R],
                                         const uint32_t (&sb)[R][1], int k, int t0, int nt) {
    constexpr int V = mm_chunk(P);
    uint32_t wq[R][8]; /* q4: per word its even and odd nibbles as bytes (xq is stored in that order); q8: as is */
    float s[R], b[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
        for (int m = 0; m < 4; m++) {
            const uint32_t u = word(wv[r], m);
            if (P == MM_Q4I8) wq[r][2 * m] = u & 0x0F0F0F0Fu, wq[r][2 * m + 1] = (u >> 4) & 0x0F0F0F0Fu;
            else wq[r][m] = u;
        }
        s[r] = scale_value(sb[r][0] & 0xFFFFu, a.sbf16), b[r] = scale_value(sb[r][0] >> 16, a.sbf16);
    }
    const int g = k / a.gs;
#pragma unroll
    for (int j = 0; j < NT; j++) {
        if (j >= nt) break;
        const size_t t = t0 + j;
        const uint4 *xp = (const uint4 *)(a.xq + t * a.cols + k);
        uint32_t xw[V / 4];
#pragma unroll
        for (int i = 0; i < V / 16; i++) {
            const uint4 v = __ldg(xp + i);
            xw[4 * i] = v.x, xw[4 * i + 1] = v.y, xw[4 * i + 2] = v.z, xw[4 * i + 3] = v.w;
        }
        const float xsum = __ldg(a.xs + t * (a.cols / V) + k / V), xd = __ldg(a.xd + t * a.ng + g);
#pragma unroll
        for (int r = 0; r < R; r++) {
            int d = 0;
#pragma unroll
            for (int i = 0; i < V / 4; i++) d = dp4a_us(wq[r][i], xw[i], d);
            acc[r][j] = fmaf(xd, fmaf(s[r], (float)d, __fmul_rn(b[r], xsum)), acc[r][j]);
        }
    }
}

/* y rows [row0, row0 + R) of this warp × token tiles of NT; see the file comment */
template <int P, int R, int NT, int U, bool VEC, bool SPLIT>
__global__ void __launch_bounds__(128, 1) fm_mm(const __grid_constant__ mm_args a) {
    constexpr int V = mm_chunk(P), STEP = 32 * V, NG = SPLIT ? 2 : 1;
    constexpr bool QUANT = P != MM_F32 && P != MM_BF16;
    const int lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * R;
    if (row0 >= a.rows) return; /* a whole warp past the last row (no block barriers below) */
    int rw[R];
#pragma unroll
    for (int r = 0; r < R; r++) rw[r] = min(row0 + r, a.rows - 1); /* past the end: a repeated row, never written */
    const int tiles = (a.T + NT - 1) / NT;
    for (int tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
        const int t0 = tile * NT, nt = min(NT, a.T - t0);
        float acc[R][NT];
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int j = 0; j < NT; j++) acc[r][j] = 0.0f;
        for (int k0 = 0; k0 < a.cols; k0 += STEP * U) { /* warp-uniform trip count */
            uint4 wv[U][R];
            uint32_t sb[U][R][NG];
#pragma unroll
            for (int u = 0; u < U; u++) { /* every load of the U chunks first: more bytes in flight */
                const int k = k0 + u * STEP + lane * V;
#pragma unroll
                for (int r = 0; r < R; r++) {
                    wv[u][r] = k < a.cols ? load_w<P, VEC>(a, rw[r], k) : make_uint4(0, 0, 0, 0);
#pragma unroll
                    for (int h = 0; h < NG; h++) {
                        sb[u][r][h] = 0;
                        if (QUANT && k + 16 * h < a.cols) {
                            const size_t i = (size_t)rw[r] * a.ng + (k + 16 * h) / a.gs;
                            sb[u][r][h] = __ldg(a.scales + i) | ((uint32_t)__ldg(a.biases + i) << 16);
                        }
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int k = k0 + u * STEP + lane * V;
                if (k >= a.cols) break; /* chunks run in column order: the rest are past the end too */
                if constexpr (P == MM_F32 || P == MM_BF16) chunk_dense<P, R, NT, VEC>(a, acc, wv[u], k, t0, nt);
                else if constexpr (P == MM_Q4 || P == MM_Q8) chunk_q<P, R, NT, VEC, SPLIT>(a, acc, wv[u], sb[u], k, t0, nt);
                else chunk_i8<P, R, NT>(a, acc, wv[u], sb[u], k, t0, nt);
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int j = 0; j < NT; j++) {
                float v = acc[r][j];
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o); /* a + b == b + a */
                if (lane == 0 && j < nt && row0 + r < a.rows) a.y[(size_t)(t0 + j) * a.rows + row0 + r] = v;
            }
    }
}

/* int8 activations of x [T, cols] per group of gs (a multiple of 32, <= 256), a warp per (token, group): xq
 * (PERM, for q4: each 8 as its evens then its odds), xd [T, ng] = m / 127, xs [T, cols / V] = Σ xq per chunk
 * of V. The CPU's roundings: max|x| is exact in any order, 127 / m and m / 127 correctly rounded divisions,
 * x·inv one correctly rounded product, rounded half to even (rintf); sums of integers. */
template <int V, bool PERM>
__global__ void __launch_bounds__(256) fm_quantize_x(const float *x, int8_t *xq, float *xd, float *xs, int T, int cols,
                                                     int gs) {
    const int lane = threadIdx.x & 31, ng = cols / gs, E = gs / 32;
    const size_t gw = (size_t)blockIdx.x * 8 + (threadIdx.x >> 5);
    if (gw >= (size_t)T * ng) return; /* a whole warp */
    const size_t t = gw / ng;
    const int g = (int)(gw % ng);
    const float *xg = x + t * cols + (size_t)g * gs;
    float v[8], m = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; e++) { /* lane takes values lane + 32e: coalesced */
        v[e] = e < E ? __ldg(xg + lane + 32 * e) : 0.0f;
        m = fmaxf(m, fabsf(v[e]));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
    const float inv = m > 0.0f ? __fdiv_rn(127.0f, m) : 0.0f;
    int8_t *qg = xq + t * cols + (size_t)g * gs;
    float *st = xs + t * (cols / V) + (size_t)g * (gs / V);
#pragma unroll
    for (int e = 0; e < 8; e++) {
        if (e >= E) break; /* E is the warp's: the shuffles below see every lane */
        const int i = lane + 32 * e;
        const int q = __float2int_rn(__fmul_rn(v[e], inv)); /* |q| <= 127 */
        qg[PERM ? (i & ~7) | ((i & 1) << 2) | ((i & 7) >> 1) : i] = (int8_t)q;
        int sum = q;
#pragma unroll
        for (int o = V / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, o);
        if ((lane & (V - 1)) == 0) st[i / V] = (float)sum;
    }
    if (lane == 0) xd[t * ng + g] = __fdiv_rn(m, 127.0f);
}

/* out[t, i] = element i of row ids[t] (fm_cpu_get_row): scale·q is exact in fp32, so the one rounding is that
 * of + bias, as on the CPU with or without contraction. An id outside [0, rows) writes NaN (the host is to
 * reject it first) rather than read outside W. */
__global__ void __launch_bounds__(256) fm_embed(float *out, const int32_t *ids, const fm_mat w, int T) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= w.cols) return;
    for (int t = blockIdx.y; t < T; t += gridDim.y) {
        const int id = __ldg(ids + t);
        float *o = out + (size_t)t * w.cols + i;
        if (id < 0 || id >= w.rows) {
            *o = __uint_as_float(0x7FC00000u);
            continue;
        }
        const size_t e = (size_t)id * w.cols + i;
        if (w.dtype == FM_F32) {
            *o = __ldg((const float *)w.data + e);
        } else if (w.dtype == FM_BF16) {
            *o = __uint_as_float((uint32_t)__ldg((const uint16_t *)w.data + e) << 16);
        } else {
            const uint8_t *q = (const uint8_t *)w.data;
            const uint32_t lv = w.dtype == FM_Q8 ? __ldg(q + e) : (__ldg(q + e / 2) >> (4 * (i & 1))) & 15u;
            const size_t sb = (size_t)id * (w.cols / w.group_size) + i / w.group_size;
            const float s = scale_value(__ldg(w.scales + sb), w.scale_bf16), b = scale_value(__ldg(w.biases + sb), w.scale_bf16);
            *o = __fadd_rn(__fmul_rn(s, (float)lv), b);
        }
    }
}

/* ---- host side */

size_t align256(size_t n) { return (n + 255) & ~(size_t)255; }

bool quantized(const fm_mat *w) { return w->dtype == FM_Q4 || w->dtype == FM_Q8; }

/* cpu.h's condition for int8 activations */
bool int8_path(const fm_mat *w) {
    return quantized(w) && w->int8_act && w->group_size > 0 && w->group_size % 32 == 0 && w->group_size <= 256;
}

/* the int8 scratch: xd [T, ng], xs [T, cols / V] floats, then xq [T, cols] int8, each 256-byte aligned */
struct i8_layout {
    size_t xs, xq, total;
};
i8_layout i8_scratch(const fm_mat *w, int T) {
    const size_t V = w->dtype == FM_Q4 ? 32 : 16, ng = (size_t)(w->cols / w->group_size);
    i8_layout l;
    l.xs = align256((size_t)T * ng * 4);
    l.xq = l.xs + align256((size_t)T * (w->cols / V) * 4);
    l.total = l.xq + align256((size_t)T * w->cols);
    return l;
}

bool aligned(const void *p, size_t n) { return ((uintptr_t)p & (n - 1)) == 0; }

template <int P, int R, int NT, int U, bool VEC, bool SPLIT>
void launch_mm(cudaStream_t s, const mm_args &a) {
    const int warps = (a.rows + R - 1) / R;
    /* enough blocks for every SM where the rows are few (decode of a small matrix), else 4 warps a block */
    const int bw = warps >= 1024 ? 4 : warps >= 256 ? 2 : 1;
    const int tiles = (a.T + NT - 1) / NT;
    const dim3 grid((unsigned)((warps + bw - 1) / bw), (unsigned)(tiles < 65535 ? tiles : 65535));
    fm_mm<P, R, NT, U, VEC, SPLIT><<<grid, 32 * bw, 0, s>>>(a);
}

/* The kernel shape by T: only the accumulators per warp change, never a token's order (file comment). */
template <int P, bool VEC, bool SPLIT>
void dispatch_t(cudaStream_t s, const mm_args &a) {
    /* decode: RD rows × UD chunks of 16 bytes in flight per lane. 4 rows where x's loads or the unpacking
     * dominate (f32, bf16, q4 on fp32 x: an x load serves 4 rows), else 2 for twice the warps (measured on
     * an H100: q8 and the int8 paths stream ~25% faster with 2) */
    constexpr int R = 4, RD = P == MM_F32 || P == MM_BF16 || P == MM_Q4 ? 4 : 2, UD = P == MM_F32 ? 4 : 2;
    if (a.T == 1) launch_mm<P, RD, 1, UD, VEC, SPLIT>(s, a);
    else if (a.T <= 4) launch_mm<P, R, 4, 1, VEC, SPLIT>(s, a);
    else launch_mm<P, R, 8, 1, VEC, SPLIT>(s, a);
}

template <int P, bool SPLIT = false>
void dispatch(cudaStream_t s, const mm_args &a, bool vec) {
    if (vec) dispatch_t<P, true, SPLIT>(s, a);
    else dispatch_t<P, false, SPLIT>(s, a);
}

} // namespace

extern "C" size_t fmc_matmul_scratch_bytes(const fm_mat *w, int T) {
    if (!w || T <= 0 || !int8_path(w) || w->cols <= 0 || w->cols % w->group_size) return 0;
    return i8_scratch(w, T).total;
}

extern "C" fm_status fmc_matmul(cudaStream_t s, const fm_mat *w, const float *x, int T, float *y, void *scratch) {
    if (!w || !w->data || T < 0 || (T > 0 && (!x || !y)) || w->rows <= 0 || w->cols <= 0)
        return fm_fail(FM_ERR_INVALID, "cuda backend: matmul of a %d x %d matrix over %d tokens",
                       w ? w->rows : 0, w ? w->cols : 0, T);
    if (w->dtype != FM_F32 && w->dtype != FM_BF16 && !quantized(w))
        return fm_fail(FM_ERR_INVALID, "cuda backend: matmul of weight dtype %d", (int)w->dtype);
    const int cols = w->cols, gs = w->group_size;
    if (quantized(w)) {
        /* every 16-column piece of a row in one group (q8: a chunk; q4: a chunk or a half of one) */
        if (gs <= 0 || gs % 16 || cols % gs)
            return fm_fail(FM_ERR_INVALID, "cuda backend: matmul in groups of %d over %d columns (the kernels take "
                           "group sizes that are multiples of 16 and divide the columns)", gs, cols);
        if (!w->scales || !w->biases || !aligned(w->data, 4) || !aligned(w->scales, 2) || !aligned(w->biases, 2))
            return fm_fail(FM_ERR_INVALID, "cuda backend: matmul of a q%d matrix without aligned data, scales, biases",
                           w->dtype == FM_Q4 ? 4 : 8);
    } else if (!aligned(w->data, w->dtype == FM_F32 ? 4 : 2)) {
        return fm_fail(FM_ERR_INVALID, "cuda backend: matmul of misaligned weights");
    }
    if (!aligned(x, 4) || !aligned(y, 4)) return fm_fail(FM_ERR_INVALID, "cuda backend: matmul of misaligned activations");
    if (T == 0) return FM_OK;

    mm_args a = {};
    a.w = w->data, a.scales = w->scales, a.biases = w->biases, a.x = x, a.y = y;
    a.row_bytes = (size_t)fm_tensor_data_bytes(w->dtype, 1, cols);
    a.rows = w->rows, a.cols = cols, a.gs = gs, a.ng = quantized(w) ? cols / gs : 0, a.T = T, a.sbf16 = w->scale_bf16;
    /* 16-byte loads where the row and x starts allow them (only the loads differ, never the arithmetic) */
    const bool w16 = aligned(w->data, 16) && a.row_bytes % 16 == 0;
    const bool vec = w16 && aligned(x, 16) && cols % 4 == 0;

    if (int8_path(w)) {
        if (!scratch || !aligned(scratch, 16))
            return fm_fail(FM_ERR_INVALID, "cuda backend: matmul on int8 activations without its scratch");
        const i8_layout l = i8_scratch(w, T);
        float *xd = (float *)scratch, *xs = (float *)((char *)scratch + l.xs);
        int8_t *xq = (int8_t *)((char *)scratch + l.xq);
        const size_t warps = (size_t)T * a.ng, blocks = (warps + 7) / 8;
        if (blocks > 0x7FFFFFFFu) return fm_fail(FM_ERR_INVALID, "cuda backend: matmul of %d tokens: too many", T);
        if (w->dtype == FM_Q4) fm_quantize_x<32, true><<<(unsigned)blocks, 256, 0, s>>>(x, xq, xd, xs, T, cols, gs);
        else fm_quantize_x<16, false><<<(unsigned)blocks, 256, 0, s>>>(x, xq, xd, xs, T, cols, gs);
        a.xq = xq, a.xd = xd, a.xs = xs;
        if (w->dtype == FM_Q4) dispatch<MM_Q4I8>(s, a, w16);
        else dispatch<MM_Q8I8>(s, a, w16);
        return FM_OK;
    }
    switch (w->dtype) {
    case FM_F32: dispatch<MM_F32>(s, a, vec); break;
    case FM_BF16: dispatch<MM_BF16>(s, a, vec); break;
    case FM_Q8: dispatch<MM_Q8>(s, a, vec); break;
    case FM_Q4: /* groups of 16·odd columns: a group per 16-column half of a chunk */
        if (gs % 32) dispatch<MM_Q4, true>(s, a, vec);
        else dispatch<MM_Q4>(s, a, vec);
        break;
    }
    return FM_OK;
}

extern "C" fm_status fmc_embed(cudaStream_t s, const fm_mat *w, const int32_t *ids, int T, float *out) {
    if (!w || !w->data || T < 0 || (T > 0 && (!ids || !out)) || w->rows <= 0 || w->cols <= 0)
        return fm_fail(FM_ERR_INVALID, "cuda backend: embed of a %d x %d matrix for %d tokens", w ? w->rows : 0,
                       w ? w->cols : 0, T);
    if (w->dtype != FM_F32 && w->dtype != FM_BF16 && !quantized(w))
        return fm_fail(FM_ERR_INVALID, "cuda backend: embed of weight dtype %d", (int)w->dtype);
    if (quantized(w) && (w->group_size <= 0 || w->cols % w->group_size || (w->dtype == FM_Q4 && w->cols % 2) ||
                         !w->scales || !w->biases))
        return fm_fail(FM_ERR_INVALID, "cuda backend: embed in groups of %d over %d columns", w->group_size, w->cols);
    if (T == 0) return FM_OK;
    const dim3 grid((unsigned)((w->cols + 255) / 256), (unsigned)(T < 65535 ? T : 65535));
    fm_embed<<<grid, 256, 0, s>>>(out, ids, *w, T);
    return FM_OK;
}
