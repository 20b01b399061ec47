/*
 * matmul.cu — the CUDA matmul, the routed experts' FFNs and the embedding lookup (cuda_kernels.h):
 * y[T, rows] = x[T, cols] · Wᵀ for W f32, bf16, q8 or q4 (group-wise affine, docs/FORMAT.md) as cpu.h's
 * fm_cpu_matmul computes it, on fp32 activations or, for q4/q8 with w->int8_act, on int8 ones; any number of
 * experts' down(silu(gate x) · up x) in two launches; the end of a MoE layer whose shared expert ran among them
 * (its gate's matvec, the gating and the weighted combine, in one); and out[t] = row ids[t] of W dequantized.
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
 * Grouped experts (fmc_experts): the same kernel with blockIdx.y an expert of the call and blockIdx.x its row
 * groups, each block walking that expert's token tiles (blockIdx.z spreading an expert of many tokens). Gate
 * and up in one kernel: a warp holds rows of both, reads each x chunk once for them, and stores
 * silu(gate)·up (eltwise.cu's formula, the same PTX) to h; its tokens are listed rows of xn (and, on int8
 * activations, of xn's quantized rows: each token quantized once for every expert). Down is the matmul of
 * the expert's rows of h (quantized, for int8, over those rows only). The per-(row, token) arithmetic above is
 * untouched, so the results are bitwise those of a matmul per expert on its gathered rows, with silu_mul
 * between: the per-expert path cuda_experts.cu keeps behind FLASHMOE_CUDA_GROUPED=0.
 *
 * Tensor cores: only a prefill on int8 activations (T >= FMC_IMMA_MIN_T, sm_80+: matmul_mma.cu, which fmc_matmul
 * hands the call to where its blocks fill half the GPU; a grouped call's experts of FMC_IMMA_MIN_EXPERT_T tokens
 * or more likewise, fm_mm skipping them (mm_args.big) and taking the others in a launch of their own;
 * FLASHMOE_CUDA_IMMA=0 keeps all here, =1 sends there whatever it takes). It is exact because the int8 path's only reduction an
 * MMA could reorder is a chunk's d = Σ q·xq, an integer (mma.sync's s32 sum of u8·s8 products is the same
 * integer in any order); its fp32 terms it applies as fm_mm does: per (row, token) each lane's chunks in order,
 * then the butterfly's tree (a warp's subtree in registers, the warps' subtree sums added in shared memory in the
 * tree's order). So a token's outputs are the same bits in decode (here) and
 * at any place of any prefill (there). Not for fp32 activations: an MMA's K order is its tile's (and unspecified)
 * and its inputs bf16/fp16/tf32, which would change the numerics of f32 x; decode would have to run the same
 * MMA tiles (a token padded to 8 or 16) to stay invariant.
 */
#include <cuda_fp16.h>
#include <stdint.h>

#include "cuda_kernels.h"
#include "eltwise.cuh"
#include "launch.cuh"

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
    int hlo; /* a grouped call's lowest row0: an expert's rows of h start at its row0 - hlo */
    int big; /* a grouped call's experts of at least this many tokens are matmul_mma.cu's (0: none) */
};

/* one matrix's arrays, of mm_args' shape (a grouped call's: an expert's gate, up or down) */
struct mm_mat {
    const void *w;
    const uint16_t *scales, *biases;
};

/* The x row of a tile's token j: consecutive from t0 (a matmul's tokens; an expert's rows of h), ... */
struct tok_seq {
    int t0;
    __device__ __forceinline__ size_t operator[](int j) const { return (size_t)(t0 + j); }
};
/* ... or listed (the rows of xn an expert's tokens are) */
template <int NT>
struct tok_list {
    int t[NT];
    __device__ __forceinline__ size_t operator[](int j) const { return (size_t)t[j]; }
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
#ifdef FLASHMOE_CUDA_EMU /* tests/cuda_emu (the CPU emulator): the same sum in C, exact as dp4a's */
    for (int i = 0; i < 4; i++) c += (int)((a >> 8 * i) & 0xFFu) * (int)(int8_t)(b >> 8 * i);
    return c;
#else
    int d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
#endif
}

__device__ __forceinline__ uint32_t word(const uint4 &v, int m) { return m == 0 ? v.x : m == 1 ? v.y : m == 2 ? v.z : v.w; }

/* The chunk of row `row` at column k (k < cols). VEC: one 16-byte load (the launcher checked the alignment
 * and that every chunk is whole); else word or element loads, 0 past the end of the row. */
template <int P, bool VEC>
__device__ __forceinline__ uint4 load_w(const mm_args &a, const mm_mat &mat, int row, int k) {
    constexpr int V = mm_chunk(P);
    const char *p = (const char *)mat.w + (size_t)row * a.row_bytes + (size_t)(k / V) * 16;
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
            const float4 f = fmc_ld((const float4 *)(xt + k) + i);
            v[4 * i] = f.x, v[4 * i + 1] = f.y, v[4 * i + 2] = f.z, v[4 * i + 3] = f.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; i++) v[i] = k + i < cols ? fmc_ld(xt + k + i) : 0.0f;
    }
}

/* ---- one chunk of R rows (wv, and sb: scale | bias << 16 per group of the chunk) for the tile's tokens, token j
 * x row tm[j] */

template <int P, int R, int NT, bool VEC, class TM>
__device__ __forceinline__ void chunk_dense(const mm_args &a, float (&acc)[R][NT], const uint4 (&wv)[R], int k,
                                            const TM &tm, int nt) {
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
            load_x<4, VEC>(xv, a.x + tm[j] * a.cols, k + p, a.cols);
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int i = 0; i < 4; i++)
                    if (VEC || k + p + i < a.cols) acc[r][j] = fmaf(wf[r][i], xv[i], acc[r][j]);
        }
    }
}

/* q4 (SPLIT: a group per 16-column half, for group sizes 16·odd) or q8 on fp32 activations */
template <int P, int R, int NT, bool VEC, bool SPLIT, class TM>
__device__ __forceinline__ void chunk_q(const mm_args &a, float (&acc)[R][NT], const uint4 (&wv)[R],
                                        const uint32_t (&sb)[R][SPLIT ? 2 : 1], int k, const TM &tm, int nt) {
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
                load_x<WV, VEC>(xv, a.x + tm[j] * a.cols, k + m * WV, a.cols);
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
template <int P, int R, int NT, class TM>
__device__ __forceinline__ void chunk_i8(const mm_args &a, float (&acc)[R][NT], const uint4 (&wv)[R],
                                         const uint32_t (&sb)[R][1], int k, const TM &tm, int nt) {
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
        const size_t t = tm[j];
        const uint4 *xp = (const uint4 *)(a.xq + t * a.cols + k);
        uint32_t xw[V / 4];
#pragma unroll
        for (int i = 0; i < V / 16; i++) {
            const uint4 v = fmc_ld(xp + i);
            xw[4 * i] = v.x, xw[4 * i + 1] = v.y, xw[4 * i + 2] = v.z, xw[4 * i + 3] = v.w;
        }
        const float xsum = fmc_ld(a.xs + t * (a.cols / V) + k / V), xd = fmc_ld(a.xd + t * a.ng + g);
#pragma unroll
        for (int r = 0; r < R; r++) {
            int d = 0;
#pragma unroll
            for (int i = 0; i < V / 4; i++) d = dp4a_us(wq[r][i], xw[i], d);
            acc[r][j] = fmaf(xd, fmaf(s[r], (float)d, __fmul_rn(b[r], xsum)), acc[r][j]);
        }
    }
}

/* acc[r][j] += lane's part of the dot of the warp's row r with token j (x row tm[j]), over every column in the
 * file comment's order. The warp's rows are M matrices' rows rw[0..R): row r is row rw[r % R] of m[r / R] (M 2:
 * an expert's gate and up, sharing each x load). */
template <int P, int M, int R, int NT, int U, bool VEC, bool SPLIT, class TM>
__device__ __forceinline__ void mm_dot(const mm_args &a, const mm_mat (&m)[M], const int (&rw)[R], const TM &tm, int nt,
                                       float (&acc)[M * R][NT]) {
    constexpr int V = mm_chunk(P), STEP = 32 * V, NG = SPLIT ? 2 : 1, RR = M * R;
    constexpr bool QUANT = P != MM_F32 && P != MM_BF16;
    const int lane = threadIdx.x & 31;
    for (int k0 = 0; k0 < a.cols; k0 += STEP * U) { /* warp-uniform trip count */
        uint4 wv[U][RR];
        uint32_t sb[U][RR][NG];
#pragma unroll
        for (int u = 0; u < U; u++) { /* every load of the U chunks first: more bytes in flight */
            const int k = k0 + u * STEP + lane * V;
#pragma unroll
            for (int r = 0; r < RR; r++) {
                const mm_mat &w = m[r / R];
                const int row = rw[r % R];
                wv[u][r] = k < a.cols ? load_w<P, VEC>(a, w, row, k) : make_uint4(0, 0, 0, 0);
#pragma unroll
                for (int h = 0; h < NG; h++) {
                    sb[u][r][h] = 0;
                    if (QUANT && k + 16 * h < a.cols) {
                        const size_t i = (size_t)row * a.ng + (k + 16 * h) / a.gs;
                        sb[u][r][h] = __ldg(w.scales + i) | ((uint32_t)__ldg(w.biases + i) << 16);
                    }
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int k = k0 + u * STEP + lane * V;
            if (k >= a.cols) break; /* chunks run in column order: the rest are past the end too */
            if constexpr (P == MM_F32 || P == MM_BF16) chunk_dense<P, RR, NT, VEC>(a, acc, wv[u], k, tm, nt);
            else if constexpr (P == MM_Q4 || P == MM_Q8)
                chunk_q<P, RR, NT, VEC, SPLIT>(a, acc, wv[u], sb[u], k, tm, nt);
            else chunk_i8<P, RR, NT>(a, acc, wv[u], sb[u], k, tm, nt);
        }
    }
}

/* the three uses of fm_mm */
enum { K_MM, K_DOWN, K_GU };

/* y rows [row0, row0 + R) of this warp × token tiles of NT; see the file comment. K:
 *   K_MM: a matmul, a.w over a.T tokens, y [T, rows] (ex unused);
 *   K_DOWN: a grouped call's down, expert blockIdx.y's over its n rows of a.x = h (from row0 - a.hlo), into its
 *       rows of a.y = ye (from row0);
 *   K_GU: a grouped call's gate and up, expert blockIdx.y's (R rows of each per warp) over its tokens tok[0..n)
 *       of a.x = xn, silu(gate)·up (as eltwise.cu's silu_mul_k) into its rows of a.y = h. Its registers are
 *       capped near fm_mm's largest (3 blocks of 128 threads an SM: 168 a thread), which keeps fm_mm's
 *       occupancy: uncapped, ptxas takes up to 248 (two matrices' addresses, the listed tokens' rows). Not q4 on
 *       scalar loads (weights or xn rows not 16-byte aligned: rare), which spills under the cap on sm_80.
 * A tile's arithmetic is fm_mm's whichever: an expert's rows are the bits of a matmul of them alone. */
template <int K, int P, int R, int NT, int U, bool VEC, bool SPLIT>
__global__ void __launch_bounds__(128, K == K_GU && (VEC || P != MM_Q4) ? 3 : 1)
    fm_mm(const __grid_constant__ mm_args a, const fmc_expert *ex) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    constexpr int M = K == K_GU ? 2 : 1;
    const int lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * R;
    if (row0 >= a.rows) return; /* a whole warp past the last row (no block barriers below) */
    int rw[R];
#pragma unroll
    for (int r = 0; r < R; r++) rw[r] = min(row0 + r, a.rows - 1); /* past the end: a repeated row, never written */
    mm_mat m[M];
    int n = a.T, xr = 0, yr = 0; /* the tokens, and the rows of x (but for K_GU) and of y the first one takes */
    const int32_t *tok = nullptr;
    if constexpr (K == K_MM) {
        m[0] = {a.w, a.scales, a.biases};
    } else {
        const fmc_expert &e = ex[blockIdx.y];
        n = e.n;
        if (a.big && n >= a.big) return; /* the whole warp: on tensor cores (fmc_experts) */
        if constexpr (K == K_GU) {
            m[0] = {e.gate.data, e.gate.scales, e.gate.biases};
            m[M - 1] = {e.up.data, e.up.scales, e.up.biases};
            tok = e.tok, yr = e.row0 - a.hlo;
        } else {
            m[0] = {e.down.data, e.down.scales, e.down.biases};
            xr = e.row0 - a.hlo, yr = e.row0;
        }
    }
    const int tiles = (n + NT - 1) / NT;
    for (int tile = blockIdx.z; tile < tiles; tile += gridDim.z) {
        const int t0 = tile * NT, nt = min(NT, n - t0);
        float acc[M * R][NT];
#pragma unroll
        for (int r = 0; r < M * R; r++)
#pragma unroll
            for (int j = 0; j < NT; j++) acc[r][j] = 0.0f;
        if constexpr (K == K_GU) {
            tok_list<NT> tm;
#pragma unroll
            for (int j = 0; j < NT; j++) tm.t[j] = j < nt ? fmc_ld(tok + t0 + j) : 0;
            mm_dot<P, M, R, NT, U, VEC, SPLIT>(a, m, rw, tm, nt, acc);
        } else {
            mm_dot<P, M, R, NT, U, VEC, SPLIT>(a, m, rw, tok_seq{xr + t0}, nt, acc);
        }
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int j = 0; j < NT; j++) {
                float v[M];
#pragma unroll
                for (int i = 0; i < M; i++) {
                    v[i] = acc[i * R + r][j];
#pragma unroll
                    for (int o = 16; o > 0; o >>= 1) v[i] += __shfl_xor_sync(0xFFFFFFFFu, v[i], o); /* a + b == b + a */
                }
                if (lane == 0 && j < nt && row0 + r < a.rows) {
                    float *y = a.y + (size_t)(yr + t0 + j) * a.rows + row0 + r;
                    if constexpr (K == K_GU) *y = fmc_silu_mul(v[0], v[M - 1]);
                    else *y = v[0];
                }
            }
    }
}

/* fmc_shared_combine: token blockIdx.y's columns blockIdx.x · 256 + thread. Warp 0 takes sg = the one row of a.w ·
 * x[t] as fm_mm does (mm_dot, then the butterfly: the bits of a matmul of it, U aside, which only says how many
 * chunks' loads are in flight: 8, so that the block waits about one load's latency for it); then each thread its
 * column: the shared FFN's value times sigmoid(sg), rounded as gate_rows stores it (no FMA with what follows), then
 * the choices added as moe_combine adds them. Every block of the token computes sg again (a row of H: a few KiB). */
template <int P, bool VEC, bool SPLIT>
__global__ void __launch_bounds__(256) fm_shared_combine(const __grid_constant__ mm_args a, float *out,
                                                         const float *ye, const int32_t *row, const float *wt, int k,
                                                         int h) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    __shared__ float sg[1];
    const int t = blockIdx.y;
    if (threadIdx.x < 32) {
        const mm_mat m[1] = {{a.w, a.scales, a.biases}};
        const int rw[1] = {0};
        float acc[1][1] = {{0.0f}};
        mm_dot<P, 1, 1, 1, 8, VEC, SPLIT>(a, m, rw, tok_seq{t}, 1, acc);
        float v = acc[0][0];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
        if (threadIdx.x == 0) sg[0] = v;
    }
    __syncthreads();
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= h) return;
    const float shared = __fmul_rn(ye[((size_t)a.T * k + t) * h + c], fmc_sigmoid(sg[0]));
    out[(size_t)t * h + c] = fmc_combine(shared, ye, row + (size_t)t * k, wt + (size_t)t * k, k, h, c);
}

/* int8 activations of x [T, cols] per group of gs (a multiple of 32, <= 256), here group g of row t by one warp:
 * xq (PERM, for q4: each 8 as its evens then its odds), xd [T, ng] = m / 127, xs [T, cols / V] = Σ xq per chunk
 * of V. The CPU's roundings: max|x| is exact in any order, 127 / m and m / 127 correctly rounded divisions,
 * x·inv one correctly rounded product, rounded half to even (rintf); sums of integers. */
template <int V, bool PERM>
__device__ __forceinline__ void quantize_group(const float *x, int8_t *xq, float *xd, float *xs, size_t t, int g,
                                               int cols, int gs) {
    const int lane = threadIdx.x & 31, ng = cols / gs, E = gs / 32;
    const float *xg = x + t * cols + (size_t)g * gs;
    float v[8], m = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; e++) { /* lane takes values lane + 32e: coalesced */
        v[e] = e < E ? fmc_ld(xg + lane + 32 * e) : 0.0f;
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

/* quantize_group for every (token, group) of x [T, cols], a warp each */
template <int V, bool PERM>
__global__ void __launch_bounds__(256) fm_quantize_x(const float *x, int8_t *xq, float *xd, float *xs, int T, int cols,
                                                     int gs) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    const int ng = cols / gs;
    const size_t gw = (size_t)blockIdx.x * 8 + (threadIdx.x >> 5);
    if (gw >= (size_t)T * ng) return; /* a whole warp */
    quantize_group<V, PERM>(x, xq, xd, xs, gw / ng, (int)(gw % ng), cols, gs);
}

/* ... for the rows [row0 - lo, row0 - lo + n) of x [·, cols] of each expert blockIdx.y of ex (a grouped call's
 * rows of h, which are all it has written: the rows between are left alone) */
template <int V, bool PERM>
__global__ void __launch_bounds__(256) fm_quantize_rows(const float *x, int8_t *xq, float *xd, float *xs,
                                                        const fmc_expert *ex, int lo, int cols, int gs) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    const fmc_expert &e = ex[blockIdx.y];
    const int ng = cols / gs;
    const size_t gw = (size_t)blockIdx.x * 8 + (threadIdx.x >> 5);
    if (gw >= (size_t)e.n * ng) return; /* a whole warp */
    quantize_group<V, PERM>(x, xq, xd, xs, (size_t)(e.row0 - lo) + gw / ng, (int)(gw % ng), cols, gs);
}

/* out[t, i] = element i of row ids[t] (fm_cpu_get_row): scale·q is exact in fp32, so the one rounding is that
 * of + bias, as on the CPU with or without contraction. An id outside [0, rows) writes NaN (the host is to
 * reject it first) rather than read outside W. */
__global__ void __launch_bounds__(256) fm_embed(float *out, const int32_t *ids, const fm_mat w, int T) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= w.cols) return;
    for (int t = blockIdx.y; t < T; t += gridDim.y) {
        const int id = fmc_ld(ids + t);
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

/* What the kernels need of a weight matrix beyond its shape; op names the call in the message. */
fm_status check_weights(const fm_mat *w, const char *op) {
    if (w->dtype != FM_F32 && w->dtype != FM_BF16 && !quantized(w))
        return fm_fail(FM_ERR_INVALID, "cuda backend: %s of weight dtype %d", op, (int)w->dtype);
    const int cols = w->cols, gs = w->group_size;
    if (quantized(w)) {
        /* every 16-column piece of a row in one group (q8: a chunk; q4: a chunk or a half of one) */
        if (gs <= 0 || gs % 16 || cols % gs)
            return fm_fail(FM_ERR_INVALID, "cuda backend: %s in groups of %d over %d columns (the kernels take "
                           "group sizes that are multiples of 16 and divide the columns)", op, gs, cols);
        if (!w->data || !w->scales || !w->biases || !aligned(w->data, 4) || !aligned(w->scales, 2) ||
            !aligned(w->biases, 2))
            return fm_fail(FM_ERR_INVALID, "cuda backend: %s of a q%d matrix without aligned data, scales, biases", op,
                           w->dtype == FM_Q4 ? 4 : 8);
    } else if (!w->data || !aligned(w->data, w->dtype == FM_F32 ? 4 : 2)) {
        return fm_fail(FM_ERR_INVALID, "cuda backend: %s of misaligned weights", op);
    }
    return FM_OK;
}

/* Grouped calls: a block takes at most GROUP_TILES of its expert's token tiles (blockIdx.z the rest, so that an
 * expert of many tokens spreads as a matmul's tiles do), and the grid at least GROUP_WARPS warps where the
 * experts' tiles allow. Neither changes a token's arithmetic. */
constexpr int GROUP_TILES = 8;
constexpr int SMALL_ROWS = 2048; /* decode of fewer f32/bf16 rows: a row a warp (dispatch_t) */
constexpr long long GROUP_WARPS = 2048;

/* fm_mm for a matmul (K_MM: max_n = T) or a grouped call's gate·up or down */
template <int K, int P, int R, int NT, int U, bool VEC, bool SPLIT>
void launch_mm(cudaStream_t s, const mm_args &a, const fmc_expert *ex, int n_ex, int max_n) {
    const int warps = (a.rows + R - 1) / R;
    /* enough blocks for every SM where the rows are few (decode of a small matrix), else 4 warps a block */
    const int bw = warps >= 1024 ? 4 : warps >= 256 ? 2 : 1;
    const int tiles = (max_n + NT - 1) / NT;
    int z = tiles; /* a matmul: a block per tile */
    if (K != K_MM) {
        const long long all = (long long)warps * n_ex, fill = (GROUP_WARPS + all - 1) / all;
        z = (tiles + GROUP_TILES - 1) / GROUP_TILES;
        if (fill > z) z = fill < tiles ? (int)fill : tiles;
    }
    const dim3 grid((unsigned)((warps + bw - 1) / bw), (unsigned)(K == K_MM ? 1 : n_ex),
                    (unsigned)(z < 65535 ? z : 65535));
    fmc_launch(fm_mm<K, P, R, NT, U, VEC, SPLIT>, grid, 32 * bw, 0, s, a, ex);
}

/* The kernel shape by T (a grouped call: the most tokens an expert has): only the accumulators per warp change,
 * never a token's order (file comment). */
template <int K, int P, bool VEC, bool SPLIT>
void dispatch_t(cudaStream_t s, const mm_args &a, const fmc_expert *ex, int n_ex, int max_n) {
    /* decode: RD rows × UD chunks of 16 bytes in flight per lane. 4 rows where x's loads or the unpacking
     * dominate (f32, bf16, q4 on fp32 x: an x load serves 4 rows), else 2 for twice the warps (measured on
     * an H100: q8 and the int8 paths stream ~25% faster with 2). Gate and up (K_GU): half as many rows of each,
     * so that a warp holds the loads and accumulators of a matmul's. */
    constexpr int M = K == K_GU ? 2 : 1, R = 4 / M, RD = (P == MM_F32 || P == MM_BF16 || P == MM_Q4 ? 4 : 2) / M,
                  UD = P == MM_F32 ? 4 : 2;
    /* A small f32/bf16 matrix (a router's, DeltaNet's a and b: 32 to 512 rows) has too few warps to keep bytes
     * in flight with 4 rows a warp: a row a warp and 8 chunks of it per lane at once (a bf16 row of 2048 in one
     * round trip); measured 4.9 us a call with 4 rows (H100). */
    constexpr bool DENSE = P == MM_F32 || P == MM_BF16;
    if (max_n == 1 && K == K_MM && DENSE && a.rows < SMALL_ROWS) launch_mm<K, P, 1, 1, 8, VEC, SPLIT>(s, a, ex, n_ex, max_n);
    else if (max_n == 1) launch_mm<K, P, RD, 1, UD, VEC, SPLIT>(s, a, ex, n_ex, max_n);
    else if (max_n <= 4) launch_mm<K, P, R, 4, 1, VEC, SPLIT>(s, a, ex, n_ex, max_n);
    else launch_mm<K, P, R, 8, 1, VEC, SPLIT>(s, a, ex, n_ex, max_n);
}

template <int K, int P, bool SPLIT = false>
void dispatch(cudaStream_t s, const mm_args &a, bool vec, const fmc_expert *ex, int n_ex, int max_n) {
    if (vec) dispatch_t<K, P, true, SPLIT>(s, a, ex, n_ex, max_n);
    else dispatch_t<K, P, false, SPLIT>(s, a, ex, n_ex, max_n);
}

/* The kernel for w's dtype and activations: 16-byte loads of w's rows where w16, and of x too where vec (only
 * the loads differ, never the arithmetic). */
template <int K>
void dispatch_w(cudaStream_t s, const mm_args &a, const fm_mat *w, bool w16, bool vec, const fmc_expert *ex, int n_ex,
                int max_n) {
    if (fmc_int8_path(w)) {
        if (w->dtype == FM_Q4) dispatch<K, MM_Q4I8>(s, a, w16, ex, n_ex, max_n);
        else dispatch<K, MM_Q8I8>(s, a, w16, ex, n_ex, max_n);
        return;
    }
    switch (w->dtype) {
    case FM_F32: dispatch<K, MM_F32>(s, a, vec, ex, n_ex, max_n); break;
    case FM_BF16: dispatch<K, MM_BF16>(s, a, vec, ex, n_ex, max_n); break;
    case FM_Q8: dispatch<K, MM_Q8>(s, a, vec, ex, n_ex, max_n); break;
    case FM_Q4: /* groups of 16·odd columns: a group per 16-column half of a chunk */
        if (w->group_size % 32) dispatch<K, MM_Q4, true>(s, a, vec, ex, n_ex, max_n);
        else dispatch<K, MM_Q4>(s, a, vec, ex, n_ex, max_n);
        break;
    }
}

/* blocks of 8 warps for n rows of x quantized in groups of w, or 0 when too many for a grid */
size_t quantize_blocks(const fm_mat *w, size_t n) {
    const size_t blocks = (n * (size_t)(w->cols / w->group_size) + 7) / 8;
    return blocks > 0x7FFFFFFFu ? 0 : blocks;
}

/* x's int8 activations for w in scratch (i8_scratch(w, T)), and a's xq, xd, xs pointed at them: of x's T rows,
 * or (ex) of its experts' rows alone (from row0 - a.hlo); blocks: quantize_blocks of T (ex: of the most rows an
 * expert has). have_q: scratch holds them already (only the pointers are set). */
void quantize(cudaStream_t s, const fm_mat *w, const float *x, int T, void *scratch, mm_args &a, size_t blocks,
              const fmc_expert *ex, int n_ex, bool have_q = false) {
    const i8_layout l = i8_scratch(w, T);
    float *xd = (float *)scratch, *xs = (float *)((char *)scratch + l.xs);
    int8_t *xq = (int8_t *)((char *)scratch + l.xq);
    const int cols = w->cols, gs = w->group_size;
    if (!have_q && ex) {
        const dim3 grid((unsigned)blocks, (unsigned)n_ex);
        if (w->dtype == FM_Q4)
            fmc_launch(fm_quantize_rows<32, true>, grid, 256, 0, s, x, xq, xd, xs, ex, a.hlo, cols, gs);
        else
            fmc_launch(fm_quantize_rows<16, false>, grid, 256, 0, s, x, xq, xd, xs, ex, a.hlo, cols, gs);
    } else if (!have_q) {
        if (w->dtype == FM_Q4)
            fmc_launch(fm_quantize_x<32, true>, (unsigned)blocks, 256, 0, s, x, xq, xd, xs, T, cols, gs);
        else
            fmc_launch(fm_quantize_x<16, false>, (unsigned)blocks, 256, 0, s, x, xq, xd, xs, T, cols, gs);
    }
    a.xq = xq, a.xd = xd, a.xs = xs;
}

/* a matmul's arguments for w over T tokens of x [T, w->cols]; w16: 16-byte loads of w's rows, vec: of x's too
 * (only the loads differ, never the arithmetic) */
mm_args matmul_args(const fm_mat *w, const float *x, int T, bool *w16, bool *vec) {
    mm_args a = {};
    a.w = w->data, a.scales = w->scales, a.biases = w->biases, a.x = x;
    a.row_bytes = (size_t)fm_tensor_data_bytes(w->dtype, 1, w->cols);
    a.rows = w->rows, a.cols = w->cols, a.gs = w->group_size, a.ng = quantized(w) ? w->cols / w->group_size : 0;
    a.T = T, a.sbf16 = w->scale_bf16;
    *w16 = aligned(w->data, 16) && a.row_bytes % 16 == 0;
    *vec = *w16 && aligned(x, 16) && w->cols % 4 == 0;
    return a;
}

/* A grouped call's experts of many tokens on tensor cores (matmul_mma.cu), where w (an int8 path's, i8) takes them
 * (its rows 16-byte aligned: ok) and one has that many: a.big set to the threshold (else 0); the most tokens of
 * the other experts, fm_mm's (0: none). */
int imma_split(bool ok, const fm_mat *w, int gu, mm_args &a, const fmc_expert *ex_host, int n_ex, int max_n) {
    const int big = ok && max_n > 0 ? fmc_experts_imma_min(w, gu, ex_host, n_ex) : 0;
    a.big = big && max_n >= big ? big : 0;
    if (!a.big) return max_n;
    int small_n = 0;
    for (int e = 0; e < n_ex; e++)
        if (ex_host[e].n < big && ex_host[e].n > small_n) small_n = ex_host[e].n;
    return small_n;
}

/* A grouped call's checks: gate [I, H] and down [H, I] for hidden size H; then (T > 0) its activations, and the
 * scratch of int8 ones */
fm_status grouped_shape(const fm_mat *g0, const fm_mat *d0, int H) {
    const int I = g0->rows;
    if (I <= 0 || g0->cols != H || d0->rows != H || d0->cols != I)
        return fm_fail(FM_ERR_INVALID, "cuda backend: experts of gate %d x %d and down %d x %d for hidden size %d", I,
                       g0->cols, d0->rows, d0->cols, H);
    return FM_OK;
}
fm_status grouped_buffers(const fm_mat *g0, const fm_mat *d0, const float *xn, int T, const float *h, const float *ye,
                          const void *scratch) {
    if (T == 0 || !xn || !h || !ye || !aligned(xn, 4) || !aligned(h, 4) || !aligned(ye, 4))
        return fm_fail(FM_ERR_INVALID, "cuda backend: experts over %d tokens: no or misaligned activations", T);
    if ((fmc_int8_path(g0) || fmc_int8_path(d0)) && (!scratch || !aligned(scratch, 16)))
        return fm_fail(FM_ERR_INVALID, "cuda backend: experts on int8 activations without their scratch");
    return FM_OK;
}

/* A grouped call's arguments: gate·up, xn [T, H] → h [rows, I]; down, h → ye [·, H] (fm_mm's comment) */
void grouped_args(const fm_mat *g0, const fm_mat *d0, const float *xn, int T, float *h, float *ye, int rows, int lo,
                  mm_args &gu, mm_args &dn) {
    const int I = g0->rows, H = g0->cols;
    gu = {}, dn = {};
    gu.x = xn, gu.y = h, gu.row_bytes = (size_t)fm_tensor_data_bytes(g0->dtype, 1, H);
    gu.rows = I, gu.cols = H, gu.gs = g0->group_size, gu.ng = quantized(g0) ? H / g0->group_size : 0, gu.T = T;
    gu.sbf16 = g0->scale_bf16, gu.hlo = lo;
    dn.x = h, dn.y = ye, dn.row_bytes = (size_t)fm_tensor_data_bytes(d0->dtype, 1, I);
    dn.rows = H, dn.cols = I, dn.gs = d0->group_size, dn.ng = quantized(d0) ? I / d0->group_size : 0, dn.T = rows;
    dn.sbf16 = d0->scale_bf16, dn.hlo = lo;
}

} // namespace

extern "C" int fmc_same_kind(const fm_mat *a, const fm_mat *b) {
    return a->dtype == b->dtype && a->rows == b->rows && a->cols == b->cols && a->group_size == b->group_size &&
           a->int8_act == b->int8_act && a->scale_bf16 == b->scale_bf16;
}

extern "C" size_t fmc_matmul_scratch_bytes(const fm_mat *w, int T) {
    if (!w || T <= 0 || !fmc_int8_path(w) || w->cols <= 0 || w->cols % w->group_size) return 0;
    return i8_scratch(w, T).total;
}

extern "C" fm_status fmc_matmul(cudaStream_t s, const fm_mat *w, const float *x, int T, float *y, void *scratch,
                                int have_q) {
    if (!w || !w->data || T < 0 || (T > 0 && (!x || !y)) || w->rows <= 0 || w->cols <= 0)
        return fm_fail(FM_ERR_INVALID, "cuda backend: matmul of a %d x %d matrix over %d tokens",
                       w ? w->rows : 0, w ? w->cols : 0, T);
    const fm_status st = check_weights(w, "matmul");
    if (st != FM_OK) return st;
    if (!aligned(x, 4) || !aligned(y, 4)) return fm_fail(FM_ERR_INVALID, "cuda backend: matmul of misaligned activations");
    if (T == 0) return FM_OK;

    bool w16, vec;
    mm_args a = matmul_args(w, x, T, &w16, &vec);
    a.y = y;
    if (fmc_int8_path(w)) {
        if (!scratch || !aligned(scratch, 16))
            return fm_fail(FM_ERR_INVALID, "cuda backend: matmul on int8 activations without its scratch");
        const size_t blocks = quantize_blocks(w, (size_t)T);
        if (!blocks) return fm_fail(FM_ERR_INVALID, "cuda backend: matmul of %d tokens: too many", T);
        quantize(s, w, x, T, scratch, a, blocks, nullptr, 0, have_q != 0);
        if (fmc_mm_imma(s, w, a.xq, a.xd, a.xs, y, T)) return FM_OK; /* prefill on tensor cores (matmul_mma.cu) */
    }
    dispatch_w<K_MM>(s, a, w, w16, vec, nullptr, 1, T);
    return FM_OK;
}

extern "C" size_t fmc_experts_scratch_bytes(const fm_mat *gate, const fm_mat *down, int T, int rows) {
    return fmc_matmul_scratch_bytes(gate, T) + fmc_matmul_scratch_bytes(down, rows);
}

extern "C" fm_status fmc_experts(cudaStream_t s, const fmc_expert *ex, const fmc_expert *ex_host, int n_ex,
                                 const float *xn, int T, int H, float *h, float *ye, int rows, void *scratch) {
    if (n_ex < 0 || n_ex > 65535 || (n_ex > 0 && (!ex || !ex_host)) || T < 0 || H <= 0 || rows < 0)
        return fm_fail(FM_ERR_INVALID, "cuda backend: experts: %d experts over %d tokens of %d into %d rows", n_ex, T,
                       H, rows);
    if (n_ex == 0) return FM_OK;
    const fm_mat *g0 = &ex_host[0].gate, *d0 = &ex_host[0].down;
    const int I = g0->rows;
    fm_status st = grouped_shape(g0, d0, H);
    if (st != FM_OK) return st;
    int max_n = 0, lo = 0x7FFFFFFF; /* the most tokens an expert has; the lowest row0 (h's first row) */
    int64_t hi = 0;
    bool g16 = true, d16 = true;
    for (int e = 0; e < n_ex; e++) {
        const fmc_expert *x = &ex_host[e];
        if (!fmc_same_kind(&x->gate, g0) || !fmc_same_kind(&x->up, g0) || !fmc_same_kind(&x->down, d0))
            return fm_fail(FM_ERR_INVALID, "cuda backend: experts: expert %d's matrices are not of expert 0's gate's "
                           "(and up's) and down's dtypes, shapes and options", e);
        if ((st = check_weights(&x->gate, "experts' gate")) != FM_OK ||
            (st = check_weights(&x->up, "experts' up")) != FM_OK ||
            (st = check_weights(&x->down, "experts' down")) != FM_OK)
            return st;
        if (x->n < 0 || x->row0 < 0 || (x->n > 0 && !x->tok))
            return fm_fail(FM_ERR_INVALID, "cuda backend: experts: expert %d's %d rows from row %d", e, x->n, x->row0);
        if (x->n > max_n) max_n = x->n;
        if (x->n > 0 && x->row0 < lo) lo = x->row0;
        if (x->n > 0 && (int64_t)x->row0 + x->n > hi) hi = (int64_t)x->row0 + x->n;
        g16 = g16 && aligned(x->gate.data, 16) && aligned(x->up.data, 16);
        d16 = d16 && aligned(x->down.data, 16);
    }
    if (max_n == 0) return FM_OK;
    if (hi - lo > rows)
        return fm_fail(FM_ERR_INVALID, "cuda backend: experts' rows %d to %lld, h has %d", lo, (long long)hi, rows);
    if ((st = grouped_buffers(g0, d0, xn, T, h, ye, scratch)) != FM_OK) return st;
    const bool gi8 = fmc_int8_path(g0), di8 = fmc_int8_path(d0);
    const size_t gblocks = gi8 ? quantize_blocks(g0, (size_t)T) : 1;
    const size_t dblocks = di8 ? quantize_blocks(d0, (size_t)max_n) : 1;
    if (!gblocks || !dblocks) return fm_fail(FM_ERR_INVALID, "cuda backend: experts over %d tokens: too many", T);

    mm_args gu, dn;
    grouped_args(g0, d0, xn, T, h, ye, rows, lo, gu, dn);
    g16 = g16 && gu.row_bytes % 16 == 0;
    d16 = d16 && dn.row_bytes % 16 == 0;
    if (gi8) quantize(s, g0, xn, T, scratch, gu, gblocks, nullptr, 0); /* every token once, for all the experts */
    int small_n = imma_split(gi8 && g16, g0, 1, gu, ex_host, n_ex, max_n); /* the most tokens of fm_mm's experts */
    if (gu.big && !fmc_experts_imma(s, 1, ex, ex_host, n_ex, g0, gu.xq, gu.xd, gu.xs, h, lo, gu.big))
        gu.big = 0, small_n = max_n; /* a grid too large there: all fm_mm's */
    if (small_n) dispatch_w<K_GU>(s, gu, g0, g16, g16 && aligned(xn, 16) && H % 4 == 0, ex, n_ex, small_n);
    if (di8) quantize(s, d0, h, rows, (char *)scratch + fmc_matmul_scratch_bytes(g0, T), dn, dblocks, ex, n_ex);
    small_n = imma_split(di8 && d16, d0, 0, dn, ex_host, n_ex, max_n);
    if (dn.big && !fmc_experts_imma(s, 0, ex, ex_host, n_ex, d0, dn.xq, dn.xd, dn.xs, ye, lo, dn.big))
        dn.big = 0, small_n = max_n;
    if (small_n) dispatch_w<K_DOWN>(s, dn, d0, d16, d16 && aligned(h, 16) && I % 4 == 0, ex, n_ex, small_n);
    return FM_OK;
}

namespace {
extern "C" fm_status fmc_experts_routed(cudaStream_t s, const fmc_expert *ex, const fmc_expert *shape, int n_ex,
                                        const int2 *map, int map_n, int narrow, int big, const float *xn, int T, int H,
                                        float *h, float *ye, int rows, void *scratch) {
    const fm_mat *g0 = &shape->gate, *d0 = &shape->down;
    const int I = g0->rows;
    if (n_ex < 1 || n_ex > 65535 || !ex || T < 0 || rows < T || H <= 0 || big < 0 || (big && (!map || map_n < 0)))
        return fm_fail(FM_ERR_INVALID, "cuda backend: routed experts: %d experts over %d tokens of %d into %d rows",
                       n_ex, T, H, rows);
    fm_status st = grouped_shape(g0, d0, H);
    if (st != FM_OK) return st;
    if (!fmc_same_kind(&shape->up, g0))
        return fm_fail(FM_ERR_INVALID, "cuda backend: routed experts: up is not of gate's dtype, shape and options");
    if ((st = check_weights(g0, "experts' gate")) != FM_OK || (st = check_weights(&shape->up, "experts' up")) != FM_OK ||
        (st = check_weights(d0, "experts' down")) != FM_OK)
        return st;
    if (T == 0) return FM_OK;
    if ((st = grouped_buffers(g0, d0, xn, T, h, ye, scratch)) != FM_OK) return st;
    const bool gi8 = fmc_int8_path(g0), di8 = fmc_int8_path(d0);
    if (big && (!gi8 || !di8))
        return fm_fail(FM_ERR_INVALID, "cuda backend: routed experts on tensor cores without int8 activations");
    const size_t gblocks = gi8 ? quantize_blocks(g0, (size_t)T) : 1, dblocks = di8 ? quantize_blocks(d0, (size_t)rows) : 1;
    if (!gblocks || !dblocks) return fm_fail(FM_ERR_INVALID, "cuda backend: experts over %d tokens: too many", T);
    /* every expert of the layer has shape's alignment (the table's rule): 16-byte loads where its matrices have */
    mm_args gu, dn;
    grouped_args(g0, d0, xn, T, h, ye, rows, 0, gu, dn);
    const bool g16 = aligned(g0->data, 16) && aligned(shape->up.data, 16) && gu.row_bytes % 16 == 0;
    const bool d16 = aligned(d0->data, 16) && dn.row_bytes % 16 == 0;
    if (big && (!g16 || !d16))
        return fm_fail(FM_ERR_INVALID, "cuda backend: routed experts on tensor cores with rows not 16-byte aligned");
    /* an expert has T tokens at most (a token's choices are distinct); fm_mm takes those under big */
    const int small_n = big ? (big - 1 < T ? big - 1 : T) : T;
    gu.big = dn.big = big;
    if (gi8) quantize(s, g0, xn, T, scratch, gu, gblocks, nullptr, 0);
    if (big && !fmc_experts_imma_mapped(s, 1, ex, n_ex, map, map_n, narrow, g0, gu.xq, gu.xd, gu.xs, h, big))
        return fm_fail(FM_ERR_INVALID, "cuda backend: routed experts: %d tiles, too many for a grid", map_n);
    if (small_n) dispatch_w<K_GU>(s, gu, g0, g16, g16 && aligned(xn, 16) && H % 4 == 0, ex, n_ex, small_n);
    /* every row of h is an expert's (the choices fill rows [0, rows)): all quantized in one launch */
    if (di8) quantize(s, d0, h, rows, (char *)scratch + fmc_matmul_scratch_bytes(g0, T), dn, dblocks, nullptr, 0);
    if (big && !fmc_experts_imma_mapped(s, 0, ex, n_ex, map, map_n, narrow, d0, dn.xq, dn.xd, dn.xs, ye, big))
        return fm_fail(FM_ERR_INVALID, "cuda backend: routed experts: %d tiles, too many for a grid", map_n);
    if (small_n) dispatch_w<K_DOWN>(s, dn, d0, d16, d16 && aligned(h, 16) && I % 4 == 0, ex, n_ex, small_n);
    return FM_OK;
}

template <int P, bool SPLIT = false>
void launch_shared_combine(cudaStream_t s, const mm_args &a, bool vec, float *out, const float *ye,
                           const int32_t *row, const float *wt, int k, int h) {
    const dim3 grid((unsigned)((h + 255) / 256), (unsigned)a.T);
    if (vec) fmc_launch(fm_shared_combine<P, true, SPLIT>, grid, 256, 0, s, a, out, ye, row, wt, k, h);
    else fmc_launch(fm_shared_combine<P, false, SPLIT>, grid, 256, 0, s, a, out, ye, row, wt, k, h);
}
} // namespace

extern "C" fm_status fmc_shared_combine(cudaStream_t s, const fm_mat *w, const float *xn, int T, float *out,
                                        const float *ye, const int32_t *row, const float *wt, int k, int h) {
    if (!w || !w->data || w->rows != 1 || w->cols != h || T < 0 || T > 65535 || k < 1 || h <= 0)
        return fm_fail(FM_ERR_INVALID, "cuda backend: shared expert's combine of a %d x %d gate over %d tokens of %d, "
                       "%d choices", w ? w->rows : 0, w ? w->cols : 0, T, h, k);
    const fm_status st = check_weights(w, "shared expert's gate");
    if (st != FM_OK) return st;
    if (fmc_int8_path(w)) /* its int8 activations would need a quantizer of their own: the core never asks */
        return fm_fail(FM_ERR_INVALID, "cuda backend: shared expert's gate on int8 activations");
    if (T == 0) return FM_OK;
    if (!xn || !out || !ye || !row || !wt || !aligned(xn, 4))
        return fm_fail(FM_ERR_INVALID, "cuda backend: shared expert's combine: no or misaligned activations");
    bool w16, vec;
    const mm_args a = matmul_args(w, xn, T, &w16, &vec);
    switch (w->dtype) {
    case FM_F32: launch_shared_combine<MM_F32>(s, a, vec, out, ye, row, wt, k, h); break;
    case FM_BF16: launch_shared_combine<MM_BF16>(s, a, vec, out, ye, row, wt, k, h); break;
    case FM_Q8: launch_shared_combine<MM_Q8>(s, a, vec, out, ye, row, wt, k, h); break;
    case FM_Q4:
        if (w->group_size % 32) launch_shared_combine<MM_Q4, true>(s, a, vec, out, ye, row, wt, k, h);
        else launch_shared_combine<MM_Q4>(s, a, vec, out, ye, row, wt, k, h);
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
    fmc_launch(fm_embed, grid, 256, 0, s, out, ids, *w, T);
    return FM_OK;
}
