/*
 * matmul_mma.cu — prefill on int8 activations (q4 or q8 weights, matmul.cu's MM_Q4I8 / MM_Q8I8) on tensor cores:
 * fmc_matmul's, and fmc_experts' gate·up and down for the experts of many tokens. mma.sync's integer MMA (u8
 * weights · s8 activations, s32 sums) for each chunk's dot, then the fp32 terms in exactly the order of
 * matmul.cu's fm_mm, so that every (row, token) is bitwise fm_mm's (and so a token's outputs in a prefill are
 * those of decode, where fm_mm runs).
 *
 * fm_mm's arithmetic for a (row r, token t) on int8 x (matmul.cu's file comment): the row's columns are cut into
 * chunks of V (q4 32, q8 16), chunk c inside group g = c·V / gs; d = Σ q·xq over the chunk (an exact integer);
 * lane v = c mod 32 of the warp folds its chunks v, v + 32, ... in order, acc = fma(xd[t, g], fma(s[r, g], d,
 * b[r, g]·xs[t, c]), acc) from +0, and the 32 lanes' accumulators A_0..A_31 are added by the xor butterfly 16, 8,
 * 4, 2, 1, lane 0's sum stored. That sum is a fixed binary tree over the lanes: its leaves in bit-reversed order
 * (position i holds lane rev5(i): 0, 16, 8, 24, 4, ...), neighbours added pairwise, level after level (A_0 + A_16,
 * then (A_0 + A_16) + (A_8 + A_24), ...; lane 0's own side the left operand at each level).
 *
 * Here: d comes from an MMA (any order of an integer sum is the same integer; the MMA's C input is 0x4B400000,
 * so its output's bits are the float 1.5·2^23 + d, less 1.5·2^23 exactly (d, |d| < 2^22) the float d, as
 * (float)d is, in one FADD rather than a conversion at a quarter of the rate). The tree's aligned subtrees are
 * sums of their own: the NW warps of a block split the 32 positions, warp w positions PW·w.. (PW = 32 / NW), each
 * warp over every output of the block's tile. A thread walks its warp's positions in order: for each, the chunks
 * of lane v = rev5(i) in order (lane v's fold, from +0), then A_v pushed onto a binary counter of log2(PW) levels
 * (the pending left subtrees: P_k + x at each set bit of i, the left operand the older), a lane with no chunk
 * (cols < 32 V) pushing +0 as fm_mm's idle lane adds its +0. After its last position the counter holds its
 * subtree's sum; the warps' sums meet in shared memory, added level by level, lower positions on the left: the
 * same operations on the same operands (+ is commutative, but the emulator's NaN payloads are not, so even the
 * operand order is lane 0's). So a warp reads its chunks in that order (not the columns'), in a cp.async pipeline
 * of its own (each chunk's 16 bytes of the tile's rows, V of each token, each token's xd and xs; the rows' scales
 * and biases a few chunks ahead through registers, stored as floats), with no barrier between the warps until the
 * end: a warp waits only on its own loads.
 *
 * Tiles: a block of NW warps over 16·MT rows × 8·NT tokens (MT × NT MMA tiles: 4·MT·NT outputs a thread, 1 +
 * log2(PW) floats each: the lane being folded and the counter's levels, all in registers), ST stages a warp in
 * static shared memory (under 48 KiB: no opt-in attribute). q4: m16n8k32, a chunk one MMA's K; q8: m16n8k16 (a
 * chunk of 16 columns: one MMA per chunk, since each chunk's d is needed alone). The calls (fm_mm's K): a matmul
 * (IM_MM) over T tokens; a grouped call's down (IM_DOWN) over an expert's n rows of h; its gate and up (IM_GU)
 * over its listed tokens of xn, the m-tiles half the gate's rows, half the same rows of up, so that a thread holds
 * both of a (row, token) and stores silu(gate)·up (eltwise.cuh's fmc_silu_mul, as fm_mm). Experts of fewer than
 * `big` tokens are fm_mm's, in a launch of their own; a grouped call's blocks are its (expert, token tile) pairs.
 * A call whose blocks would not fill half the GPU stays on fm_mm (FLASHMOE_CUDA_IMMA unset; 1 forces this kernel,
 * 0 keeps fm_mm): its warps of 4 rows × 8 tokens spread a few dozen tokens over far more SMs than these tiles.
 *
 * Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k32" and "... for mma.m16n8k16 with integer type";
 * groupID g = lane >> 2, threadID_in_group q = lane & 3, elements low to high in each .b32):
 *   m16n8k32 A (16 × 32, row): a0..a3 row g, k 4q..4q+3 | a4..a7 row g + 8, k 4q.. | a8..a11 row g, k 16 + 4q..
 *            | a12..a15 row g + 8, k 16 + 4q..;  B (32 × 8, col): b0..b3 k 4q.., col g | b4..b7 k 16 + 4q.., col g
 *   m16n8k16 A (16 × 16, row): a0..a3 row g, k 4q.. | a4..a7 row g + 8, k 4q..;  B (16 × 8, col): b0..b3 k 4q.., col g
 *   C, D (16 × 8, s32): c0, c1 row g, cols 2q, 2q + 1 | c2, c3 row g + 8, cols 2q, 2q + 1.
 * K is a sum's index only, so any pairing of weight and activation bytes that meets fm_mm's works: q4's word m of
 * a chunk (columns 8m..8m+7) as even nibbles | odd nibbles, xq's words 2m, 2m + 1 (stored evens then odds, the
 * quantizer's PERM) — thread q takes word q of its rows (k 4q.. its even nibbles, k 16 + 4q.. its odd ones) and
 * bytes 8q..8q+7 of its token's chunk; q8: word q of each.
 */
#include <cuda_fp16.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>

#include "cuda_kernels.h"
#include "eltwise.cuh"
#include "launch.cuh"

namespace {

/* the three calls (matmul.cu's K_MM, K_DOWN, K_GU) */
enum { IM_MM, IM_DOWN, IM_GU };

struct imma_args {
    const char *w;                   /* IM_MM: [rows, row_bytes]: q4 or q8, rows 16-byte aligned */
    const uint16_t *scales, *biases; /* [rows, ng] fp16 or bf16 bits */
    const fmc_expert *ex;            /* IM_DOWN, IM_GU: the call's experts */
    const int8_t *xq;                /* [·, cols] (q4: each 8 as evens then odds) */
    const float *xd, *xs;            /* [·, ng] steps, [·, nc] Σ xq of each chunk */
    float *y;                        /* [·, rows] */
    size_t row_bytes;
    unsigned long long mg;           /* ceil(2^32 / (gs / V)): a chunk's group (the kernel's group()) */
    int rows, cols, ng, nc, T, sbf16;
    int hlo;  /* grouped: the lowest row0 (h's rows of an expert from row0 - hlo) */
    int big;  /* grouped: the experts of at least this many tokens are this kernel's */
    int n_ex; /* grouped: experts in ex */
    const int2 *map; /* grouped, routed on the device: token tile x's (expert, tile), expert -1 past the last */
};

/* a weight matrix's arrays */
struct im_mat {
    const char *w;
    const uint16_t *scales, *biases;
};

/* matmul.cu's: a stored scale or bias, fp16 or bfloat16 */
__device__ __forceinline__ float scale_value(uint32_t bits, int bf16) {
    return bf16 ? __uint_as_float(bits << 16) : __half2float(__ushort_as_half((unsigned short)bits));
}

/* the lane at position i of the butterfly's tree (and the position of lane i): i's 5 bits reversed */
__host__ __device__ constexpr int rev5(int i) {
    return ((i & 1) << 4) | ((i & 2) << 2) | (i & 4) | ((i & 8) >> 2) | ((i & 16) >> 4);
}

constexpr int MAGIC_BITS = 0x4B400000; /* 1.5·2^23 */
constexpr float MAGIC = 12582912.0f;

/* D = A·B + (c, c, c, c): m16n8k32 (K32: a[4], b[2]) or m16n8k16 (a[2], b[1]), u8 A, s8 B, s32 D */
template <bool K32>
__device__ __forceinline__ void mma_u8s8(int (&d)[4], const uint32_t (&a)[K32 ? 4 : 2], const uint32_t (&b)[K32 ? 2 : 1],
                                         int c) {
#ifdef FLASHMOE_CUDA_EMU
    /* tests/cuda_emu: what the instruction computes, its operands gathered from the warp's lanes by the fragment
     * layouts of the file comment (each lane posting 8 bytes a shuffle). */
    constexpr int H = K32 ? 2 : 1; /* halves of K: k 0..15 and 16..31 */
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    int acc[4] = {c, c, c, c};
    for (int j = 0; j < 4; j++) { /* lane 4·row + j of a quad holds k 4j..4j+3 (+ 16) of row (A) or col (B) */
        uint32_t ar[2][H], bc[2][H]; /* [row g, g + 8][half]; [col 2q, 2q + 1][half] */
        if (K32) {
            const uint64_t lo = __shfl_sync(0xFFFFFFFFu, (uint64_t)a[0] | (uint64_t)a[2] << 32, 4 * g + j);
            const uint64_t hi = __shfl_sync(0xFFFFFFFFu, (uint64_t)a[1] | (uint64_t)a[3] << 32, 4 * g + j);
            ar[0][0] = (uint32_t)lo, ar[0][H - 1] = (uint32_t)(lo >> 32);
            ar[1][0] = (uint32_t)hi, ar[1][H - 1] = (uint32_t)(hi >> 32);
        } else {
            const uint64_t r = __shfl_sync(0xFFFFFFFFu, (uint64_t)a[0] | (uint64_t)a[1] << 32, 4 * g + j);
            ar[0][0] = (uint32_t)r, ar[1][0] = (uint32_t)(r >> 32);
        }
        const uint64_t bp = (uint64_t)b[0] | (uint64_t)b[H - 1] << 32;
        const uint64_t b0 = __shfl_sync(0xFFFFFFFFu, bp, 4 * (2 * q) + j);
        const uint64_t b1 = __shfl_sync(0xFFFFFFFFu, bp, 4 * (2 * q + 1) + j);
        for (int h = 0; h < H; h++) bc[0][h] = (uint32_t)(b0 >> 32 * h), bc[1][h] = (uint32_t)(b1 >> 32 * h);
        for (int i = 0; i < 2; i++)
            for (int n = 0; n < 2; n++)
                for (int h = 0; h < H; h++)
                    for (int e = 0; e < 4; e++)
                        acc[2 * i + n] += (int)((ar[i][h] >> 8 * e) & 0xFFu) * (int)(int8_t)(bc[n][h] >> 8 * e);
    }
    for (int i = 0; i < 4; i++) d[i] = acc[i];
#elif __CUDA_ARCH__ >= 800
    if constexpr (K32)
        asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%10, %11, %12, %13};"
            : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(c), "r"(c), "r"(c), "r"(c));
    else
        asm("mma.sync.aligned.m16n8k16.row.col.s32.u8.s8.s32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%7, %8, %9, %10};"
            : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(b[0]), "r"(c), "r"(c), "r"(c), "r"(c));
#else
    __trap(); /* never launched below sm_80 (fmc_mm_imma) */
#endif
}

/* cp.async: 16 bytes (global → shared, L2 only) or 4, in flight until cp_wait; the emulator copies at once, or
 * (FM_CUDA_EMU_CP=late) at the wait that requires it */
__device__ __forceinline__ void cp16(void *dst, const void *src) {
#ifdef FLASHMOE_CUDA_EMU
    fm_cuda_emu::cp_async(dst, src, 16);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src)
                 : "memory");
#endif
}
__device__ __forceinline__ void cp4(void *dst, const void *src) {
#ifdef FLASHMOE_CUDA_EMU
    fm_cuda_emu::cp_async(dst, src, 4);
#else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src)
                 : "memory");
#endif
}
__device__ __forceinline__ void cp_commit() {
#ifdef FLASHMOE_CUDA_EMU
    fm_cuda_emu::cp_commit();
#else
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
/* every group but the last N committed has landed (this thread's copies) */
template <int N>
__device__ __forceinline__ void cp_wait() {
#ifdef FLASHMOE_CUDA_EMU
    fm_cuda_emu::cp_wait(N);
#else
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

/* The kernel's shape: NW warps, each over every output of the block's tile (16·MT rows of W × 8·NT tokens; IM_GU:
 * 8·MT rows of gate, the same rows of up) and over its own share of the chunks, the 32 / NW positions PW·w.. of the
 * butterfly's tree (warp w): its own cp.async pipeline of ST stages, no barrier between the warps until their sums
 * meet at the end. RES: blocks resident an SM (its registers). A warp's stage in shared memory: W [R][16] the
 * chunk's 16 bytes of each of its R = 16·MT rows (q4: 32 nibbles, split at the fragment load; q8: 16 bytes); X
 * [BN][V] the chunk's bytes of each token; SB [MT][8] float4 (s, b of rows g and g + 8 of each 16-row tile: one
 * load for a thread's two rows of an MMA tile); XS [NT][4] float4 (xd, xs of token 8n + 2q, xd, xs of 8n + 2q + 1).
 * Each fragment load of a warp reads 128 to 512 contiguous bytes, or broadcasts. */
template <int K_, bool Q4_, int NW_, int MT_, int NT_, int ST_, int RES_>
struct imma_cfg {
    static constexpr int K = K_, NW = NW_, MT = MT_, NT = NT_, ST = ST_, RES = RES_;
    static constexpr bool Q4 = Q4_;
    static constexpr int M = K == IM_GU ? 2 : 1, MTM = MT / M; /* matrices; 16-row tiles of each */
    static constexpr int NTHR = 32 * NW, R = 16 * MT, BM = 16 * MTM, BN = 8 * NT, V = Q4 ? 32 : 16;
    static constexpr int PW = 32 / NW, LV = __builtin_ctz(PW); /* positions a warp; its counter's levels */
    static constexpr int X_OFF = R * 16, SB_OFF = X_OFF + BN * V, XS_OFF = SB_OFF + MT * 8 * 16,
                         STAGE = XS_OFF + NT * 4 * 16;
    static constexpr int O = 4 * MT * NT;                            /* outputs a thread */
    static constexpr int WL = (R + 31) / 32, XL = (BN * V / 16 + 31) / 32, SL = (2 * BN + 31) / 32; /* loads a lane */
    static constexpr int RED = NW * O * 32 * 4, SMEM = NW * ST * STAGE > RED ? NW * ST * STAGE : RED;
    static_assert(MT % M == 0 && (NW & (NW - 1)) == 0 && NW <= 32 && ST >= 2 && STAGE % 16 == 0 &&
                      SMEM <= 48 * 1024, "warps a power of two, stages in static shared memory");
};

/* A lane's part of each stage of its warp, fixed for the block: its rows of W (and their scales), its tokens' 16-byte
 * pieces of X, and its xd or xs. Rows past the last and tokens past the n-th read the last one (their outputs are
 * never stored). Scales and biases are loaded ST - 1 chunks ahead into registers (ring, oldest first) and stored as
 * floats the iteration their chunk is computed (before the warp's barrier). */
template <class C>
struct loader {
    const char *w[C::WL];                    /* the row (+ 16·c: chunk c's bytes) */
    const uint16_t *sc[C::WL], *bi[C::WL];   /* its scales and biases (+ the chunk's group) */
    const int8_t *x[C::XL];                  /* the token's xq row + its 16-byte piece (+ V·c) */
    const float *f[C::SL];                   /* the token's xd (+ group) or xs (+ c) row */
    bool fs[C::SL];                          /* xs (else xd) */
    uint32_t ring[C::ST - 1][C::WL];         /* s | b << 16 of the chunks loaded, oldest first */

    /* m: the matrices; xrow(j): the row of x (xq, xd, xs) of the tile's token j < BN */
    template <class XR>
    __device__ __forceinline__ loader(const imma_args &a, const im_mat (&m)[C::M], int r0, const XR &xrow) {
        const int lane = threadIdx.x & 31;
#pragma unroll
        for (int i = 0; i < C::WL; i++) {
#pragma unroll
            for (int s = 0; s < C::ST - 1; s++) ring[s][i] = 0; /* (moved before the first loads reach it) */
            const int rr = min(lane + 32 * i, C::R - 1); /* row rr of the stage's W */
            const im_mat &mm = rr >= C::BM ? m[C::M - 1] : m[0]; /* (a constant index: no local array) */
            const int row = min(r0 + rr % C::BM, a.rows - 1);
            w[i] = mm.w + (size_t)row * a.row_bytes;
            sc[i] = mm.scales + (size_t)row * a.ng, bi[i] = mm.biases + (size_t)row * a.ng;
        }
#pragma unroll
        for (int i = 0; i < C::XL; i++) {
            const int idx = lane + 32 * i, t = idx / (C::V / 16) % C::BN, p = idx % (C::V / 16);
            x[i] = a.xq + xrow(t) * a.cols + 16 * p;
        }
#pragma unroll
        for (int i = 0; i < C::SL; i++) {
            const int idx = lane + 32 * i;
            const size_t row = xrow(idx / 2 % C::BN);
            fs[i] = idx & 1;
            f[i] = fs[i] ? a.xs + row * a.nc : a.xd + row * a.ng;
        }
    }

    /* chunk c (group gc) into buf: W, X, XS by cp.async; its scales into the ring's newest slot */
    __device__ __forceinline__ void issue(char *buf, int c, int gc) {
        const int lane = threadIdx.x & 31;
#pragma unroll
        for (int i = 0; i < C::WL; i++) {
            if (lane + 32 * i < C::R) cp16(buf + (lane + 32 * i) * 16, w[i] + (size_t)c * 16);
            ring[C::ST - 2][i] = __ldg(sc[i] + gc) | (uint32_t)__ldg(bi[i] + gc) << 16;
        }
#pragma unroll
        for (int i = 0; i < C::XL; i++)
            if (lane + 32 * i < C::BN * C::V / 16) cp16(buf + C::X_OFF + (lane + 32 * i) * 16, x[i] + (size_t)c * C::V);
#pragma unroll
        for (int i = 0; i < C::SL; i++) {
            const int idx = lane + 32 * i, t = idx / 2;
            if (idx < 2 * C::BN) {
                float *dst = (float *)(buf + C::XS_OFF) + ((t / 8 * 4 + t % 8 / 2) * 4 + 2 * (t & 1) + fs[i]);
                cp4(dst, f[i] + (fs[i] ? c : gc));
            }
        }
    }

    /* the ring's oldest scales (the chunk computed next) into buf's SB as floats; the ring moves on */
    __device__ __forceinline__ void store_scales(char *buf, int sbf16) {
        const int lane = threadIdx.x & 31;
#pragma unroll
        for (int i = 0; i < C::WL; i++) {
            const int rr = lane + 32 * i; /* tile rr / 16, its row g = rr % 8, of the pair's half rr / 8 % 2 */
            if (rr < C::R)
                ((float2 *)(buf + C::SB_OFF))[(rr / 16 * 8 + rr % 8) * 2 + rr / 8 % 2] =
                    make_float2(scale_value(ring[0][i] & 0xFFFFu, sbf16), scale_value(ring[0][i] >> 16, sbf16));
        }
        shift();
    }

    /* the ring one chunk on: its newest slot free for the next issue */
    __device__ __forceinline__ void shift() {
#pragma unroll
        for (int i = 0; i < C::WL; i++)
#pragma unroll
            for (int s = 0; s + 1 < C::ST - 1; s++) ring[s][i] = ring[s + 1][i];
    }
};

/* Chunk of the stage in buf, onto the thread's accumulators: one MMA per (m-tile, n-tile), then per output fm_mm's
 * acc = fma(xd, fma(s, d, b·xs), acc). Output o = 4·(NT·mt + nt) + e of the thread: row 16·mt + g + 8·(e >> 1) of the
 * stage's W, token 8·nt + 2q + (e & 1) of the tile. */
template <class C>
__device__ __forceinline__ void chunk_mma(const char *buf, float (&acc)[C::O]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const char *X = buf + C::X_OFF;
    const float4 *SB = (const float4 *)(buf + C::SB_OFF), *XS = (const float4 *)(buf + C::XS_OFF);
    uint32_t af[C::MT][C::Q4 ? 4 : 2], bf[C::NT][C::Q4 ? 2 : 1];
    float4 sb[C::MT], xx[C::NT];
#pragma unroll
    for (int mt = 0; mt < C::MT; mt++) { /* word q of rows g and g + 8 (q4: as even nibbles, k 4q.., then odd ones) */
        const uint32_t u0 = *(const uint32_t *)(buf + (16 * mt + g) * 16 + 4 * q);
        const uint32_t u1 = *(const uint32_t *)(buf + (16 * mt + g + 8) * 16 + 4 * q);
        if constexpr (C::Q4) {
            const uint32_t M4 = 0x0F0F0F0Fu;
            af[mt][0] = u0 & M4, af[mt][1] = u1 & M4, af[mt][2] = u0 >> 4 & M4, af[mt][3] = u1 >> 4 & M4;
        } else {
            af[mt][0] = u0, af[mt][1] = u1;
        }
        sb[mt] = SB[mt * 8 + g];
    }
#pragma unroll
    for (int nt = 0; nt < C::NT; nt++) {
        const int t = 8 * nt + g;
        if constexpr (C::Q4) { /* xq bytes 8q..8q+3: the columns of word q's even nibbles; 8q+4..8q+7: its odd ones */
            const uint2 v = *(const uint2 *)(X + t * 32 + 8 * q);
            bf[nt][0] = v.x, bf[nt][1] = v.y;
        } else {
            bf[nt][0] = *(const uint32_t *)(X + t * 16 + 4 * q);
        }
        xx[nt] = XS[nt * 4 + q];
    }
#pragma unroll
    for (int mt = 0; mt < C::MT; mt++)
#pragma unroll
        for (int nt = 0; nt < C::NT; nt++) {
            int d[4];
            mma_u8s8<C::Q4>(d, af[mt], bf[nt], MAGIC_BITS);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float s = e >> 1 ? sb[mt].z : sb[mt].x, b = e >> 1 ? sb[mt].w : sb[mt].y;
                const float xd = e & 1 ? xx[nt].z : xx[nt].x, xs = e & 1 ? xx[nt].w : xx[nt].y;
                const float dv = __fsub_rn(__int_as_float(d[e]), MAGIC); /* (float)d, exactly */
                float &o = acc[4 * (C::NT * mt + nt) + e];
                o = fmaf(xd, fmaf(s, dv, __fmul_rn(b, xs)), o);
            }
        }
}

/* x merged with the counter's levels below T (the older subtree left at each, as lane 0's: P[T-1] + (... + (P[0] +
 * x))), the sum left at level T (T = L: in x, the subtree's sum). Each case its own code, every index a constant:
 * the sums land in P's registers, no copies between them. */
template <int T, int L, int O>
__device__ __forceinline__ void merge(float (&x)[O], float (&P)[L > 0 ? L : 1][O]) {
#pragma unroll
    for (int o = 0; o < O; o++) {
        float v = x[o];
#pragma unroll
        for (int k = 0; k < T; k++) v = __fadd_rn(P[k][o], v);
        if constexpr (T < L) P[T][o] = v;
        else x[o] = v;
    }
}

/* Position i's lane done (its fold in x): onto the warp's binary counter P of L levels (its subtree of 2^L
 * positions). Its levels below the lowest clear bit of i hold left subtrees waiting for x (t: i's trailing ones),
 * merged in; the sum waits at that level. At i = 2^L - 1 x ends as the subtree's sum. */
template <int T, int L, int O>
__device__ __forceinline__ void push_at(int t, float (&x)[O], float (&P)[L > 0 ? L : 1][O]) {
    if constexpr (T >= L) merge<L, L>(x, P);
    else if (t == T) merge<T, L>(x, P);
    else push_at<T + 1, L>(t, x, P);
}
template <int L, int O>
__device__ __forceinline__ void push(int i, float (&x)[O], float (&P)[L > 0 ? L : 1][O]) {
    push_at<0, L>(__ffs(~i) - 1, x, P); /* t uniform */
}

/* The x row of the tile's token j (clamped to the call's or the expert's last): consecutive from x0 (a matmul's
 * tokens; an expert's rows of h), or listed (the rows of xn an expert's tokens are) */
struct xrow_seq {
    int x0, t0, last;
    __device__ __forceinline__ size_t operator()(int j) const { return (size_t)x0 + min(t0 + j, last); }
};
struct xrow_list {
    const int32_t *tok;
    int t0, last;
    __device__ __forceinline__ size_t operator()(int j) const { return (size_t)fmc_ld(tok + min(t0 + j, last)); }
};

/* A grouped call's block x: (expert, token tile) number x of the experts of at least big tokens, each's tiles of
 * BN in order (so no block is idle: a shared expert's hundreds of tokens beside experts of a few dozen), found
 * by warp 0 in a prefix sum of the experts' tiles, 32 experts at a time. */
template <int BN>
__device__ __forceinline__ int2 expert_tile(const imma_args &a) {
    __shared__ int2 found[1];
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x, x = blockIdx.x;
        int base = 0;
        for (int e0 = 0; e0 < a.n_ex && base <= x; e0 += 32) { /* base: tiles of the experts before e0 (uniform) */
            const int e = e0 + lane, n = e < a.n_ex ? fmc_ld(&a.ex[e].n) : 0, nt = n >= a.big ? (n + BN - 1) / BN : 0;
            int incl = nt;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int v = __shfl_up_sync(0xFFFFFFFFu, incl, o);
                if (lane >= o) incl += v;
            }
            if (x >= base + incl - nt && x < base + incl) found[0] = make_int2(e, x - (base + incl - nt));
            base += __shfl_sync(0xFFFFFFFFu, incl, 31);
        }
    }
    __syncthreads();
    return found[0];
}

/* the position of the warp's tree after position i whose lane has a chunk (nc chunks), or PW past its last */
template <int PW>
__device__ __forceinline__ int next_real(int base, int i, int nc) {
    while (i < PW && rev5(base + i) >= nc) i++;
    return i;
}

/* y tile [token tile blockIdx.x, row tile blockIdx.y] of the call (grouped: of the expert expert_tile finds): the
 * file comment */
template <class C>
__global__ void __launch_bounds__(C::NTHR, C::RES) fm_mm_imma(const __grid_constant__ imma_args a) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    const int r0 = blockIdx.y * C::BM;
    int t0 = blockIdx.x * C::BN;
    im_mat m[C::M];
    int n = a.T, xr = 0, yr = 0; /* the tokens; the rows of x (IM_MM, IM_DOWN) and y the first one takes */
    const int32_t *tok = nullptr;
    if constexpr (C::K == IM_MM) {
        m[0] = {a.w, a.scales, a.biases};
    } else {
        const int2 et = a.map ? fmc_ld(a.map + blockIdx.x) : expert_tile<C::BN>(a);
        if (et.x < 0) return; /* the whole block: a tile map's bound past its last tile */
        const fmc_expert &e = a.ex[et.x];
        n = e.n, t0 = et.y * C::BN;
        if constexpr (C::K == IM_GU) {
            m[0] = {(const char *)e.gate.data, e.gate.scales, e.gate.biases};
            m[C::M - 1] = {(const char *)e.up.data, e.up.scales, e.up.biases};
            tok = e.tok, yr = e.row0 - a.hlo;
        } else {
            m[0] = {(const char *)e.down.data, e.down.scales, e.down.biases};
            xr = e.row0 - a.hlo, yr = e.row0;
        }
    }
    __shared__ uint4 smem[C::SMEM / 16];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    char *const sw = (char *)smem + warp * C::ST * C::STAGE; /* the warp's stages */
    const int nc = a.nc, base = warp * C::PW;                /* its positions base.. */
    float acc[C::O], P[C::LV > 0 ? C::LV : 1][C::O];
    auto make_loader = [&]() {
        if constexpr (C::K == IM_GU) return loader<C>(a, m, r0, xrow_list{tok, t0, n - 1});
        else return loader<C>(a, m, r0, xrow_seq{xr, t0, n - 1});
    };
    loader<C> ld = make_loader();
    /* the load cursor: position li's lane, its chunk lc (-1 past the warp's last) */
    int li = next_real<C::PW>(base, 0, nc), lc = li < C::PW ? rev5(base + li) : -1;
    auto advance = [&]() {
        if (lc + 32 < nc) lc += 32;
        else li = next_real<C::PW>(base, li + 1, nc), lc = li < C::PW ? rev5(base + li) : -1;
    };
    auto group = [&](int c) { return (int)((unsigned long long)c * a.mg >> 32); };
#pragma unroll
    for (int s = 0; s < C::ST - 1; s++) { /* chunks 0..ST-2 (their scales: the ring, oldest first) */
        ld.shift();
        if (lc >= 0) ld.issue(sw + s * C::STAGE, lc, group(lc)), advance();
        cp_commit();
    }
    int k = 0; /* chunks computed: the next one's stage is k mod ST */
    for (int i = 0; i < C::PW; i++) {
#pragma unroll
        for (int o = 0; o < C::O; o++) acc[o] = 0.0f;
        for (int c = rev5(base + i); c < nc; c += 32, k++) { /* position i's lane's chunks, in order */
            char *const b = sw + k % C::ST * C::STAGE;
            ld.store_scales(b, a.sbf16);
            cp_wait<C::ST - 2>(); /* chunk k landed (this lane's copies), */
            __syncwarp();         /* every lane's, its scales stored; and chunk k - 1's stage is free */
            if (lc >= 0) ld.issue(sw + (k + C::ST - 1) % C::ST * C::STAGE, lc, group(lc)), advance();
            cp_commit();
            chunk_mma<C>(b, acc);
        }
        push<C::LV>(i, acc, P);
    }
    /* the warps' subtree sums (in acc) meet: the tree's levels above them, lower positions on the left */
    __syncthreads(); /* every warp done with its stages: the space is the sums' */
    float *const red = (float *)smem;
#pragma unroll
    for (int o = 0; o < C::O; o++) red[(warp * C::O + o) * 32 + lane] = acc[o];
    __syncthreads();
    constexpr int OUT = C::K == IM_GU ? C::O / 2 : C::O; /* stored outputs a lane (IM_GU: gate's, with up's) */
    for (int o = warp; o < OUT; o += C::NW) {
        float v[C::M][C::NW];
#pragma unroll
        for (int mi = 0; mi < C::M; mi++) {
#pragma unroll
            for (int w = 0; w < C::NW; w++) v[mi][w] = red[(w * C::O + o + mi * OUT) * 32 + lane];
#pragma unroll
            for (int span = 1; span < C::NW; span *= 2)
#pragma unroll
                for (int w = 0; w + span < C::NW; w += 2 * span) v[mi][w] = __fadd_rn(v[mi][w], v[mi][w + span]);
        }
        const int mt = o / (4 * C::NT), nt = o / 4 % C::NT, e = o % 4; /* mt < MTM: the first matrix's rows */
        const int r = r0 + 16 * mt + g + 8 * (e >> 1), t = t0 + 8 * nt + 2 * q + (e & 1);
        if (r >= a.rows || t >= n) continue;
        float *y = a.y + (size_t)(yr + t) * a.rows + r;
        if constexpr (C::K == IM_GU) *y = fmc_silu_mul(v[0][0], v[1][0]);
        else *y = v[0][0];
    }
}

/* the kernel over the call's T tokens, or (ex_host: the call's experts) the experts of at least a.big tokens, or
 * (a.map) the tile map's a.T tiles */
template <class C>
bool launch_imma(cudaStream_t s, const imma_args &a, const fmc_expert *ex_host) {
    long long bx = 0; /* token tiles */
    if (C::K == IM_MM) bx = (a.T + C::BN - 1) / C::BN;
    else if (a.map) bx = a.T;
    else
        for (int e = 0; e < a.n_ex; e++)
            if (ex_host[e].n >= a.big) bx += (ex_host[e].n + C::BN - 1) / C::BN;
    const long long by = (a.rows + C::BM - 1) / C::BM;
    if (by > 65535 || bx > 0x7FFFFFFF) return false;
    if (bx) fmc_launch(fm_mm_imma<C>, dim3((unsigned)bx, (unsigned)by), C::NTHR, 0, s, a);
    return true;
}

/* an attribute of the current device (0: unknown), per device, asked once: the compute capability's major, the SMs */
int dev_attr(cudaDeviceAttr what) {
    static std::atomic<int> known[2][64];
    const int k = what == cudaDevAttrComputeCapabilityMajor ? 0 : 1;
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
    int v = known[k][dev].load(std::memory_order_relaxed);
    if (!v && cudaDeviceGetAttribute(&v, what, dev) == cudaSuccess && v > 0) known[k][dev].store(v, std::memory_order_relaxed);
    return v;
}

/* FLASHMOE_CUDA_IMMA: 0 every int8 matmul on fm_mm's dp4a kernel (benchmarks, tests: the baseline in the same
 * build); 1 the tensor cores wherever they take the call (tests: small shapes); unset (or else) also only where
 * the call fills half the GPU (IMMA_AUTO: a grid of fewer blocks, a few dozen rows of tokens over a matrix of a few
 * thousand rows, is fm_mm's, whose warps of 4 rows and 8 tokens spread further). Read at each call. */
enum { IMMA_OFF, IMMA_ON, IMMA_AUTO };
int imma_mode() {
    const char *e = getenv("FLASHMOE_CUDA_IMMA");
    return e && strcmp(e, "0") == 0 ? IMMA_OFF : e && strcmp(e, "1") == 0 ? IMMA_ON : IMMA_AUTO;
}

/* the fewest tokens of an expert on tensor cores: FLASHMOE_CUDA_IMMA_MIN_EXPERT_T (1-64; benchmarks), else
 * FMC_IMMA_MIN_EXPERT_T. Read at each call. */
int imma_min_expert_t() {
    const char *e = getenv("FLASHMOE_CUDA_IMMA_MIN_EXPERT_T");
    const int v = e ? atoi(e) : 0;
    return v >= 1 && v <= 64 ? v : FMC_IMMA_MIN_EXPERT_T;
}

/* whether w's shape and options can run here at all (rows 16-byte aligned: the caller checks the pointers) */
bool imma_takes(const fm_mat *w) {
    if (w->dtype != FM_Q4 && w->dtype != FM_Q8) return false;
    const size_t row_bytes = (size_t)fm_tensor_data_bytes(w->dtype, 1, w->cols);
    return row_bytes % 16 == 0 && w->cols / 16 < (1 << 24) && dev_attr(cudaDevAttrComputeCapabilityMajor) >= 8;
}

/* whether a grid of this many blocks, resident this many an SM, fills half the GPU (or the mode forces it) */
bool fills(int mode, long long blocks, int per_sm) {
    return mode == IMMA_ON || 2 * blocks >= (long long)dev_attr(cudaDevAttrMultiProcessorCount) * per_sm;
}

imma_args args_of(const fm_mat *w, const int8_t *xq, const float *xd, const float *xs, float *y, int T) {
    const int V = w->dtype == FM_Q4 ? 32 : 16;
    imma_args a = {};
    a.w = (const char *)w->data, a.scales = w->scales, a.biases = w->biases, a.xq = xq, a.xd = xd, a.xs = xs, a.y = y;
    a.row_bytes = (size_t)fm_tensor_data_bytes(w->dtype, 1, w->cols), a.rows = w->rows, a.cols = w->cols;
    a.ng = w->cols / w->group_size, a.nc = w->cols / V, a.T = T, a.sbf16 = w->scale_bf16;
    const unsigned long long cpg = (unsigned long long)(w->group_size / V); /* chunks a group */
    a.mg = ((1ull << 32) + cpg - 1) / cpg;
    return a;
}

/* The kernel shapes: blocks of 4 warps (three an SM: up to 170 registers a thread), each warp an eighth of the
 * butterfly's tree (8 positions: 3 levels of its counter) over the block's 32 rows (IM_GU: 16 of gate, 16 of up) ×
 * 16 tokens, in 4 stages. Against 8 warps of 4 positions (two blocks an SM) ×1.04 on a 2048 × 2048 matmul of 512
 * tokens, and wider tiles (32 tokens) or 3 stages no better (bench/RESULTS.md, session 23). */
template <bool Q4> using mm_cfg = imma_cfg<IM_MM, Q4, 4, 2, 2, 4, 3>;
template <bool Q4> using ex_gu = imma_cfg<IM_GU, Q4, 4, 2, 2, 4, 3>;
template <bool Q4> using ex_down = imma_cfg<IM_DOWN, Q4, 4, 2, 2, 4, 3>;
/* Grouped calls in tiles of 8 tokens, for experts of a few tokens (a short prompt's), whose 16-token tiles are
 * mostly padding: FLASHMOE_CUDA_IMMA_NARROW=1 always, auto where the experts of at least min_t tokens pad to 1.5
 * times the tokens in 16-token tiles that they do in 8-token ones; 0 or unset never (bench/RESULTS.md, sessions 20
 * and 21: no gain). Read at each call. */
template <bool Q4> using ex_gu_narrow = imma_cfg<IM_GU, Q4, 4, 2, 1, 4, 3>;
template <bool Q4> using ex_down_narrow = imma_cfg<IM_DOWN, Q4, 4, 2, 1, 4, 3>;
static_assert(ex_gu_narrow<true>::BM == ex_gu<true>::BM && ex_down_narrow<true>::BM == ex_down<true>::BM &&
                  ex_gu_narrow<true>::RES == ex_gu<true>::RES,
              "the 8-token tiles differ in tokens only: a call's row tiles are the same");
/* FLASHMOE_CUDA_IMMA_NARROW: 1 (always), 0 (never, or unset), -1 (auto) */
int narrow_mode() {
    const char *e = getenv("FLASHMOE_CUDA_IMMA_NARROW");
    return e && strcmp(e, "auto") == 0 ? -1 : e && strcmp(e, "1") == 0;
}
/* auto's rule: experts of n tokens, 16-token tiles' padded tokens against 8-token ones' */
long long padded(int n, int bn) { return (n + bn - 1) / bn * bn; }
bool imma_narrow(const fmc_expert *ex_host, int n_ex, int min_t) {
    const int mode = narrow_mode();
    if (mode >= 0) return mode;
    long long wide = 0, narrow = 0;
    for (int i = 0; i < n_ex; i++)
        if (ex_host[i].n >= min_t) wide += padded(ex_host[i].n, 16), narrow += padded(ex_host[i].n, 8);
    return 2 * wide >= 3 * narrow;
}

/* a grouped call's kernel (gu: gate·up, else down) for w's dtype, in 8-token tiles or 16 */
bool launch_grouped(cudaStream_t s, const imma_args &a, const fmc_expert *ex_host, int gu, bool q4, bool narrow) {
    if (narrow) {
        if (gu) return q4 ? launch_imma<ex_gu_narrow<true>>(s, a, ex_host) : launch_imma<ex_gu_narrow<false>>(s, a, ex_host);
        return q4 ? launch_imma<ex_down_narrow<true>>(s, a, ex_host) : launch_imma<ex_down_narrow<false>>(s, a, ex_host);
    }
    if (gu) return q4 ? launch_imma<ex_gu<true>>(s, a, ex_host) : launch_imma<ex_gu<false>>(s, a, ex_host);
    return q4 ? launch_imma<ex_down<true>>(s, a, ex_host) : launch_imma<ex_down<false>>(s, a, ex_host);
}

template <class C>
long long blocks_of(long long token_tiles, int rows) { return token_tiles * ((rows + C::BM - 1) / C::BM); }

} // namespace

extern "C" int fmc_mm_imma(cudaStream_t s, const fm_mat *w, const int8_t *xq, const float *xd, const float *xs,
                           float *y, int T) {
    const int mode = imma_mode();
    if (T < FMC_IMMA_MIN_T || mode == IMMA_OFF || ((uintptr_t)w->data & 15) || !imma_takes(w)) return 0;
    const bool q4 = w->dtype == FM_Q4;
    using C = mm_cfg<true>;
    if (!fills(mode, blocks_of<C>((T + C::BN - 1) / C::BN, w->rows), C::RES)) return 0;
    const imma_args a = args_of(w, xq, xd, xs, y, T);
    return q4 ? launch_imma<mm_cfg<true>>(s, a, nullptr) : launch_imma<mm_cfg<false>>(s, a, nullptr);
}

extern "C" int fmc_experts_imma_min(const fm_mat *w, int gu, const fmc_expert *ex_host, int n_ex) {
    const int mode = imma_mode();
    if (mode == IMMA_OFF || !imma_takes(w)) return 0;
    const int min_t = imma_min_expert_t();
    const bool narrow = imma_narrow(ex_host, n_ex, min_t);
    const int BN = narrow ? ex_gu_narrow<true>::BN : ex_gu<true>::BN;
    long long tiles = 0;
    for (int e = 0; e < n_ex; e++)
        if (ex_host[e].n >= min_t) tiles += (ex_host[e].n + BN - 1) / BN;
    const long long blocks = gu ? blocks_of<ex_gu<true>>(tiles, w->rows) : blocks_of<ex_down<true>>(tiles, w->rows);
    return tiles && fills(mode, blocks, ex_gu<true>::RES) ? min_t : 0;
}

extern "C" int fmc_experts_imma(cudaStream_t s, int gu, const fmc_expert *ex, const fmc_expert *ex_host, int n_ex,
                                const fm_mat *w, const int8_t *xq, const float *xd, const float *xs, float *y, int hlo,
                                int big) {
    imma_args a = args_of(w, xq, xd, xs, y, 0);
    a.w = nullptr, a.scales = a.biases = nullptr, a.ex = ex, a.hlo = hlo, a.big = big, a.n_ex = n_ex;
    return launch_grouped(s, a, ex_host, gu, w->dtype == FM_Q4, imma_narrow(ex_host, n_ex, big));
}

extern "C" int fmc_experts_imma_mapped(cudaStream_t s, int gu, const fmc_expert *ex, int n_ex, const int2 *map,
                                       int map_n, int narrow, const fm_mat *w, const int8_t *xq, const float *xd,
                                       const float *xs, float *y, int big) {
    imma_args a = args_of(w, xq, xd, xs, y, map_n);
    a.w = nullptr, a.scales = a.biases = nullptr, a.ex = ex, a.big = big, a.n_ex = n_ex, a.map = map;
    return launch_grouped(s, a, nullptr, gu, w->dtype == FM_Q4, narrow);
}

extern "C" int fmc_experts_imma_routed_min(const fm_mat *gate, const fm_mat *down) {
    return imma_mode() != IMMA_OFF && fmc_int8_path(gate) && fmc_int8_path(down) && imma_takes(gate) && imma_takes(down)
               ? imma_min_expert_t()
               : 0;
}

extern "C" int fmc_experts_imma_tile(int narrow) { return narrow ? ex_gu_narrow<true>::BN : ex_gu<true>::BN; }

extern "C" int fmc_experts_imma_routed_narrow(int n, int n_ex) {
    const int mode = narrow_mode();
    if (mode >= 0) return mode;
    const int a = (n + n_ex - 1) / n_ex; /* the experts' tokens, were they spread evenly */
    return 2 * padded(a, 16) >= 3 * padded(a, 8);
}
