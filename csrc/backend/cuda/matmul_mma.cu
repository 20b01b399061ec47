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
 * (float)d is, in one FADD rather than a conversion at a quarter of the rate). Each thread owns outputs of its
 * MMA tiles and walks the chunks position by position: for i = 0..31 the chunks of lane v = rev5(i) in order
 * (lane v's fold, from +0), then A_v pushed onto a binary counter of 5 levels (the pending left subtrees: P_k +
 * x at each set bit of i, the left operand the older), a lane with no chunk (cols < 32 V) pushing +0 as fm_mm's
 * idle lane adds its +0. After position 31 the counter holds the butterfly's sum: the same operations on the same
 * operands (+ is commutative, but the emulator's NaN payloads are not, so even the operand order is lane 0's).
 * So the chunks are read in that order (not the columns'): stage s of the pipeline holds the next KC chunks of
 * it, 16 bytes of each row (loaded into registers during the stage before, q4's nibbles then stored as bytes)
 * and V of each token (cp.async), with each chunk's scales and biases (as floats) and each token's xd and xs.
 *
 * Tiles: a block of WM × WN warps, a warp 16·MT rows × 8·NT tokens (MT × NT MMA tiles: 4·MT·NT outputs a thread,
 * 6 floats each: the lane being folded and the counter's 5 levels, all in registers), ST stages of KC chunks
 * in static shared memory (under 48 KiB: no opt-in attribute). q4: m16n8k32, a chunk one MMA's K; q8:
 * m16n8k16 (a chunk of 16 columns: one MMA per chunk, since each chunk's d is needed alone). The calls (fm_mm's
 * K): a matmul (IM_MM) over T tokens; a grouped call's down (IM_DOWN) over an expert's n rows of h; its gate and
 * up (IM_GU) over its listed tokens of xn, a warp's m-tiles half the gate's rows, half the same rows of up, so
 * that a thread holds both of a (row, token) and stores silu(gate)·up (eltwise.cuh's fmc_silu_mul, as fm_mm).
 * Experts of fewer than `big` tokens are fm_mm's, in a launch of their own; a grouped call's blocks are its
 * (expert, token tile) pairs. A call whose blocks would not fill half the GPU stays on fm_mm (FLASHMOE_CUDA_IMMA
 * unset; 1 forces this kernel, 0 keeps fm_mm): its warps of 4 rows × 8 tokens spread a few dozen tokens over far
 * more SMs than these tiles of 16 × 32 outputs a warp.
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
    unsigned long long mg;           /* ceil(2^32 / (gs / V)): a chunk's group (next_stage) */
    int rows, cols, gs, ng, nc, T, sbf16;
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

/* the chunk after c in the order of the file comment (lane rev5(i) for i = 0..31, each lane's in column order),
 * or -1 past the last */
__device__ __forceinline__ int next_chunk(int c, int nc) {
    if (c + 32 < nc) return c + 32;
    for (int i = rev5(c & 31) + 1; i < 32; i++)
        if (rev5(i) < nc) return rev5(i);
    return -1;
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

/* The kernel's shape: WM × WN warps of 16·MT rows × 8·NT tokens (IM_GU: 8·MT rows of gate and the same of up);
 * ST stages of KC chunks. A stage in shared memory: W [KC][M·BM / 16] tiles of 16 rows (IM_GU: BM rows of gate,
 * then of up), each [8 g][4 q] slots of a thread's A fragment for the tile, in the order of its registers (one
 * load, no moves before the MMA): q4 16 bytes (word q of rows g and g + 8 as bytes: g's even nibbles, g + 8's, g's
 * odd nibbles, g + 8's), q8 8 bytes (word q of rows g, g + 8); slot q of row g at g·4 + (q ^ swz(g, tile)) (the
 * stores conflict-free, the loads contiguous whatever the swizzle); X [KC][BN] V bytes of each token; SB [KC][M·BM /
 * 16][8] float4 (s, b of row 16m + g, s, b of row 16m + g + 8: one load for a thread's two rows of an MMA tile); XS
 * [KC][BN / 8][4] float4 (xd, xs of token 8n + 2q, xd, xs of token 8n + 2q + 1); the stage's chunk numbers. Each
 * fragment load of a warp reads 128 to 512 contiguous bytes, or broadcasts. */
template <int K_, bool Q4_, int WM_, int WN_, int MT_, int NT_, int KC_, int ST_>
struct imma_cfg {
    static constexpr int K = K_, WM = WM_, WN = WN_, MT = MT_, NT = NT_, KC = KC_, ST = ST_;
    static constexpr bool Q4 = Q4_;
    static constexpr int M = K == IM_GU ? 2 : 1, MTM = MT / M; /* matrices; m-tiles of each a warp */
    static constexpr int NTHR = 32 * WM * WN, BM = 16 * MTM * WM, BN = 8 * NT * WN, V = Q4 ? 32 : 16, WB = Q4 ? 32 : 16;
    static constexpr int X_OFF = KC * M * BM * WB, SB_OFF = X_OFF + KC * BN * V, XS_OFF = SB_OFF + KC * M * BM * 8,
                         C_OFF = XS_OFF + KC * BN * 8, STAGE = C_OFF + 16;
    /* a thread's loads of a stage: (rows g and g + 8 of a tile, chunk) items of w (16 bytes, a scale and a bias
     * each row: through registers), 16-byte pieces of xq and xd or xs floats (cp.async) */
    static constexpr int NW = (KC * M * BM / 2 + NTHR - 1) / NTHR, NX = (KC * BN * V / 16 + NTHR - 1) / NTHR,
                         NXS = (KC * BN * 2 + NTHR - 1) / NTHR;
    static constexpr int O = 4 * MT * NT; /* outputs a thread */
    static_assert(MT % M == 0 && KC <= 4 && STAGE % 16 == 0 && ST >= 2 && ST * STAGE <= 48 * 1024,
                  "stages in static shared memory");
};

/* the slot swizzle of W's tiles (the stage comment): a warp's stores of the slots' q-th words, 8 (q4: 16 bytes) or
 * 16 (q8: 8 bytes) threads a bank cycle, each thread its tile's row pair g, land in distinct banks */
template <bool Q4>
__device__ __forceinline__ int swz(int g, int tile) {
    return Q4 ? g >> 1 & 3 : (g >> 2 & 1) | (tile & 1) << 1;
}

/* element kc of a stage's list (kc not a constant: selects, not a local array) */
template <int KC>
__device__ __forceinline__ int pick(const int (&v)[KC], int kc) {
    int c = v[0];
#pragma unroll
    for (int k = 1; k < KC; k++)
        if (kc == k) c = v[k];
    return c;
}

/* a stage's chunks (-1 past the last) and their groups */
template <int KC>
struct stage_list {
    int c[KC], g[KC];
};

/* the next KC chunks from cur; g = c / (gs / V) as (c · mg) >> 32, mg = ceil(2^32 / (gs / V)) (exact for c < 2^24) */
template <int KC>
__device__ __forceinline__ void next_stage(int &cur, stage_list<KC> &l, int nc, unsigned long long mg) {
#pragma unroll
    for (int k = 0; k < KC; k++) {
        l.c[k] = cur;
        l.g[k] = cur >= 0 ? (int)((unsigned long long)cur * mg >> 32) : 0;
        if (cur >= 0) cur = next_chunk(cur, nc);
    }
}

/* A thread's part of each stage, fixed for the block: which rows, tokens and chunk of the stage (kc) its loads
 * take. Rows past the last and tokens past the n-th read the last one (their outputs are never stored). */
template <class C, int KC>
struct loader {
    const char *w[C::NW][2];                   /* rows g, g + 8 of the tile (w items) */
    const uint16_t *sc[C::NW][2], *bi[C::NW][2]; /* their scales and biases */
    const int8_t *x[C::NX];              /* the token's xq row, + its 16-byte piece (x items) */
    const float *f[C::NXS];              /* the token's xd or xs row (xs items) */
    bool fs[C::NXS];                     /* xs (else xd) */
    uint4 wv[C::NW][2];                  /* loaded, to store after the stage's compute */
    uint32_t sb[C::NW][2];

    /* m: the matrices; xrow(j): the row of x (xq, xd, xs) of the tile's token j < BN */
    template <class XR>
    __device__ __forceinline__ loader(const imma_args &a, const im_mat (&m)[C::M], int r0, const XR &xrow) {
        const int tid = threadIdx.x;
#pragma unroll
        for (int i = 0; i < C::NW; i++) {
            const int p = (tid + i * C::NTHR) % (C::M * C::BM / 2), rr = p / 8 * 16 + p % 8; /* row g of tile p / 8 */
            const im_mat &mm = rr >= C::BM ? m[C::M - 1] : m[0];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int row = min(r0 + (rr + 8 * h) % C::BM, a.rows - 1);
                w[i][h] = mm.w + (size_t)row * a.row_bytes;
                sc[i][h] = mm.scales + (size_t)row * a.ng, bi[i][h] = mm.biases + (size_t)row * a.ng;
            }
        }
#pragma unroll
        for (int i = 0; i < C::NX; i++) {
            const int idx = tid + i * C::NTHR, t = idx / (C::V / 16) % C::BN, p = idx % (C::V / 16);
            x[i] = a.xq + xrow(t) * a.cols + 16 * p;
        }
#pragma unroll
        for (int i = 0; i < C::NXS; i++) {
            const int idx = tid + i * C::NTHR;
            const size_t row = xrow(idx / 2 % C::BN);
            fs[i] = idx & 1;
            f[i] = fs[i] ? a.xs + row * a.nc : a.xd + row * a.ng;
        }
    }

    /* the stage's copies (cp.async: X, XS) and loads (W, SB: into wv, sb) */
    __device__ __forceinline__ void issue(char *buf, const stage_list<KC> &l) {
        const int tid = threadIdx.x;
#pragma unroll
        for (int i = 0; i < C::NW; i++) {
            const int idx = tid + i * C::NTHR, kc = idx / (C::M * C::BM / 2), c = pick(l.c, kc);
            if (idx < KC * C::M * C::BM / 2 && c >= 0) {
                const int g = pick(l.g, kc);
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    wv[i][h] = __ldg((const uint4 *)(w[i][h] + (size_t)c * 16));
                    sb[i][h] = __ldg(sc[i][h] + g) | (uint32_t)__ldg(bi[i][h] + g) << 16;
                }
            }
        }
#pragma unroll
        for (int i = 0; i < C::NX; i++) {
            const int idx = tid + i * C::NTHR, kc = idx / (C::BN * C::V / 16), c = pick(l.c, kc);
            if (idx < KC * C::BN * C::V / 16 && c >= 0) cp16(buf + C::X_OFF + idx * 16, x[i] + (size_t)c * C::V);
        }
#pragma unroll
        for (int i = 0; i < C::NXS; i++) {
            const int idx = tid + i * C::NTHR, kc = idx / (C::BN * 2), t = idx / 2 % C::BN;
            const int c = pick(l.c, kc);
            if (idx < KC * C::BN * 2 && c >= 0) {
                float *dst = (float *)(buf + C::XS_OFF) + ((kc * (C::BN / 8) + t / 8) * 4 + t % 8 / 2) * 4 + 2 * (t & 1) + fs[i];
                cp4(dst, f[i] + (fs[i] ? c : pick(l.g, kc)));
            }
        }
        if (tid < KC) ((int *)(buf + C::C_OFF))[tid] = pick(l.c, tid);
    }

    /* W and SB from the loads issue made (q4: each word's nibbles as bytes, evens then odds) */
    template <bool Q4>
    __device__ __forceinline__ void store(char *buf, const stage_list<KC> &l, int sbf16) {
#pragma unroll
        for (int i = 0; i < C::NW; i++) {
            const int idx = threadIdx.x + i * C::NTHR, kc = idx / (C::M * C::BM / 2), g = idx % 8;
            const int tile = idx / 8 % (C::M * C::BM / 16);
            if (idx < KC * C::M * C::BM / 2 && pick(l.c, kc) >= 0) {
                char *const t = buf + (kc * (C::M * C::BM / 16) + tile) * 16 * C::WB; /* the tile's slots */
                const uint32_t u0[4] = {wv[i][0].x, wv[i][0].y, wv[i][0].z, wv[i][0].w};
                const uint32_t u1[4] = {wv[i][1].x, wv[i][1].y, wv[i][1].z, wv[i][1].w};
                const int sw = swz<Q4>(g, tile);
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    char *const slot = t + (g * 4 + (q ^ sw)) * (C::WB / 2);
                    if constexpr (Q4) {
                        const uint32_t M4 = 0x0F0F0F0Fu;
                        *(uint4 *)slot = make_uint4(u0[q] & M4, u1[q] & M4, (u0[q] >> 4) & M4, (u1[q] >> 4) & M4);
                    } else {
                        *(uint2 *)slot = make_uint2(u0[q], u1[q]);
                    }
                }
                float4 *sd = (float4 *)(buf + C::SB_OFF) + (kc * (C::M * C::BM / 16) + tile) * 8 + g;
                *sd = make_float4(scale_value(sb[i][0] & 0xFFFFu, sbf16), scale_value(sb[i][0] >> 16, sbf16),
                                  scale_value(sb[i][1] & 0xFFFFu, sbf16), scale_value(sb[i][1] >> 16, sbf16));
            }
        }
    }
};

/* Chunk kc of the stage in buf for the warp's tiles (rows wr.. of each matrix, tokens wt.. of the block's): one
 * MMA per tile, then per output fm_mm's acc = fma(xd, fma(s, d, b·xs), acc). Output o = 4·(NT·mt + nt) + e of
 * the thread: matrix mt / MTM's row wr + 16 (mt % MTM) + g + 8 (e >> 1), token wt + 8 nt + 2q + (e & 1). */
template <class C, bool Q4, int MT, int NT>
__device__ __forceinline__ void chunk_mma(const char *buf, int kc, int wr, int wt, float (&acc)[C::O]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const char *W = buf + kc * C::M * C::BM * C::WB, *X = buf + C::X_OFF + kc * C::BN * C::V;
    const float4 *SB = (const float4 *)(buf + C::SB_OFF) + kc * (C::M * C::BM / 16) * 8;
    const float4 *XS = (const float4 *)(buf + C::XS_OFF) + kc * (C::BN / 8) * 4;
    uint32_t af[MT][Q4 ? 4 : 2], bf[NT][Q4 ? 2 : 1];
    float4 sb[MT], xx[NT];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        const int tile = (mt / C::MTM * C::BM + wr) / 16 + mt % C::MTM; /* in the stage's W */
        const char *slot = W + tile * 16 * C::WB + (g * 4 + (q ^ swz<Q4>(g, tile))) * (C::WB / 2);
        if constexpr (Q4) { /* a0, a2: row g's word q as even nibbles (k 4q..), odd ones (k 16 + 4q..); a1, a3: row g + 8 */
            const uint4 u = *(const uint4 *)slot;
            af[mt][0] = u.x, af[mt][1] = u.y, af[mt][2] = u.z, af[mt][3] = u.w;
        } else {
            const uint2 u = *(const uint2 *)slot;
            af[mt][0] = u.x, af[mt][1] = u.y;
        }
        sb[mt] = SB[tile * 8 + g];
    }
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        const int t = wt + 8 * nt + g;
        if constexpr (Q4) { /* xq bytes 8q..8q+3: the columns of word q's even nibbles; 8q+4..8q+7: its odd ones */
            const uint2 v = *(const uint2 *)(X + t * 32 + 8 * q);
            bf[nt][0] = v.x, bf[nt][1] = v.y;
        } else {
            bf[nt][0] = *(const uint32_t *)(X + t * 16 + 4 * q);
        }
        xx[nt] = XS[(wt / 8 + nt) * 4 + q];
    }
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            int d[4];
            mma_u8s8<Q4>(d, af[mt], bf[nt], MAGIC_BITS);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float s = e >> 1 ? sb[mt].z : sb[mt].x, b = e >> 1 ? sb[mt].w : sb[mt].y;
                const float xd = e & 1 ? xx[nt].z : xx[nt].x, xs = e & 1 ? xx[nt].w : xx[nt].y;
                const float dv = __fsub_rn(__int_as_float(d[e]), MAGIC); /* (float)d, exactly */
                float &o = acc[4 * (NT * mt + nt) + e];
                o = fmaf(xd, fmaf(s, dv, __fmul_rn(b, xs)), o);
            }
        }
}

/* x merged with the counter's levels below T (the older subtree left at each, as lane 0's: P[T-1] + (... + (P[0] +
 * x))), the sum left at level T (T = 5: in x, the tree's sum). Each case its own code, every index a constant: the
 * sums land in P's registers, no copies between them. */
template <int T, int O>
__device__ __forceinline__ void merge(float (&x)[O], float (&P)[5][O]) {
#pragma unroll
    for (int o = 0; o < O; o++) {
        float v = x[o];
#pragma unroll
        for (int k = 0; k < T; k++) v = __fadd_rn(P[k][o], v);
        if constexpr (T < 5) P[T][o] = v;
        else x[o] = v;
    }
}

/* Lane rev5(i)'s fold done (in x): onto the binary counter P. Its levels below the lowest clear bit of i hold left
 * subtrees waiting for x (i's trailing ones), merged in; the sum waits at that level. At i = 31 x ends as the
 * tree's sum. */
template <int O>
__device__ __forceinline__ void push(int i, float (&x)[O], float (&P)[5][O]) {
    switch (__ffs(~i) - 1) { /* i's trailing ones (uniform) */
    case 0: merge<0>(x, P); break;
    case 1: merge<1>(x, P); break;
    case 2: merge<2>(x, P); break;
    case 3: merge<3>(x, P); break;
    case 4: merge<4>(x, P); break;
    default: merge<5>(x, P); break;
    }
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

/* y tile [token tile blockIdx.x, row tile blockIdx.y] of the call (grouped: of the expert expert_tile finds): the
 * file comment */
template <int K, bool Q4, int WM, int WN, int MT, int NT, int KC, int ST>
__global__ void __launch_bounds__(32 * WM * WN, 1) fm_mm_imma(const __grid_constant__ imma_args a) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    using C = imma_cfg<K, Q4, WM, WN, MT, NT, KC, ST>;
    const int r0 = blockIdx.y * C::BM;
    int t0 = blockIdx.x * C::BN;
    im_mat m[C::M];
    int n = a.T, xr = 0, yr = 0; /* the tokens; the rows of x (IM_MM, IM_DOWN) and y the first one takes */
    const int32_t *tok = nullptr;
    if constexpr (K == IM_MM) {
        m[0] = {a.w, a.scales, a.biases};
    } else {
        const int2 et = a.map ? fmc_ld(a.map + blockIdx.x) : expert_tile<C::BN>(a);
        if (et.x < 0) return; /* the whole block: a tile map's bound past its last tile */
        const fmc_expert &e = a.ex[et.x];
        n = e.n, t0 = et.y * C::BN;
        if constexpr (K == IM_GU) {
            m[0] = {(const char *)e.gate.data, e.gate.scales, e.gate.biases};
            m[C::M - 1] = {(const char *)e.up.data, e.up.scales, e.up.biases};
            tok = e.tok, yr = e.row0 - a.hlo;
        } else {
            m[0] = {(const char *)e.down.data, e.down.scales, e.down.biases};
            xr = e.row0 - a.hlo, yr = e.row0;
        }
    }
    __shared__ uint4 smem[ST * C::STAGE / 16];
    char *const sm = (char *)smem;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const int wr = warp % WM * 16 * C::MTM, wt = warp / WM * 8 * NT; /* the warp's first row and token in the tile */
    const int nc = a.nc;
    float acc[C::O], P[5][C::O];
#pragma unroll
    for (int o = 0; o < C::O; o++) {
        acc[o] = 0.0f;
#pragma unroll
        for (int k = 0; k < 5; k++) P[k][o] = 0.0f;
    }
    auto make_loader = [&]() {
        if constexpr (K == IM_GU) return loader<C, KC>(a, m, r0, xrow_list{tok, t0, n - 1});
        else return loader<C, KC>(a, m, r0, xrow_seq{xr, t0, n - 1});
    };
    loader<C, KC> ld = make_loader();
    int lc = 0; /* the next chunk to load */
    const int stages = (nc + KC - 1) / KC;
#pragma unroll
    for (int s = 0; s < ST - 1; s++) {
        stage_list<KC> l;
        next_stage(lc, l, nc, a.mg);
        if (s < stages) ld.issue(sm + s * C::STAGE, l);
        cp_commit();
        if (s < stages) ld.template store<Q4>(sm + s * C::STAGE, l, a.sbf16);
    }
    for (int j = 0; j < stages; j++) {
        cp_wait<ST - 2>(); /* stage j landed (this thread's copies), */
        __syncthreads();   /* everyone's, its W and SB stored; and stage j - 1's buffer is free */
        const int jn = j + ST - 1;
        char *const nb = sm + jn % ST * C::STAGE;
        stage_list<KC> l;
        next_stage(lc, l, nc, a.mg);
        if (jn < stages) ld.issue(nb, l);
        cp_commit();
        const char *const b = sm + j % ST * C::STAGE;
#pragma unroll
        for (int kc = 0; kc < KC; kc++) {
            const int c = ((const int *)(b + C::C_OFF))[kc];
            if (c < 0) break; /* the last stage's end (uniform) */
            chunk_mma<C, Q4, MT, NT>(b, kc, wr, wt, acc);
            if (c + 32 >= nc) { /* lane c mod 32's last chunk: onto the counter, then the idle lanes after it */
                for (int i = rev5(c & 31);;) {
                    push(i, acc, P);
                    if (i == 31) break;
#pragma unroll
                    for (int o = 0; o < C::O; o++) acc[o] = 0.0f;
                    if (rev5(++i) < nc) break;
                }
            }
        }
        if (jn < stages) ld.template store<Q4>(nb, l, a.sbf16);
    }
#pragma unroll
    for (int mt = 0; mt < C::MTM; mt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r = r0 + wr + 16 * mt + g + 8 * (e >> 1), t = t0 + wt + 8 * nt + 2 * q + (e & 1);
                if (r >= a.rows || t >= n) continue;
                float *y = a.y + (size_t)(yr + t) * a.rows + r;
                const float v = acc[4 * (NT * mt + nt) + e];
                if constexpr (K == IM_GU) *y = fmc_silu_mul(v, acc[4 * (NT * (mt + C::MTM) + nt) + e]);
                else *y = v;
            }
}

/* the kernel over the call's T tokens, or (ex_host: the call's experts) the experts of at least a.big tokens, or
 * (a.map) the tile map's a.T tiles */
template <int K, bool Q4, int WM, int WN, int MT, int NT, int KC, int ST>
bool launch_imma(cudaStream_t s, const imma_args &a, const fmc_expert *ex_host) {
    using C = imma_cfg<K, Q4, WM, WN, MT, NT, KC, ST>;
    long long bx = 0; /* token tiles */
    if (K == IM_MM) bx = (a.T + C::BN - 1) / C::BN;
    else if (a.map) bx = a.T;
    else
        for (int e = 0; e < a.n_ex; e++)
            if (ex_host[e].n >= a.big) bx += (ex_host[e].n + C::BN - 1) / C::BN;
    const long long by = (a.rows + C::BM - 1) / C::BM;
    if (by > 65535 || bx > 0x7FFFFFFF) return false;
    if (bx) fmc_launch(fm_mm_imma<K, Q4, WM, WN, MT, NT, KC, ST>, dim3((unsigned)bx, (unsigned)by), C::NTHR, 0, s, a);
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
    a.gs = w->group_size, a.ng = w->cols / w->group_size, a.nc = w->cols / V, a.T = T, a.sbf16 = w->scale_bf16;
    const unsigned long long cpg = (unsigned long long)(w->group_size / V); /* chunks a group */
    a.mg = ((1ull << 32) + cpg - 1) / cpg;
    return a;
}

/* The kernel shapes. Matmuls: blocks of 8 warps (one an SM: 255 registers a thread), each 32 rows × 16 tokens:
 * 64 × 64 from 48 tokens on, else 128 × 32 (less padding). Grouped calls: blocks of 4 warps (two an SM) over 16
 * tokens of an expert, gate·up 64 rows of each (a warp 16 of each), down 128. q4 in 3 stages where its rows take
 * the room of 4. */
template <bool Q4> using mm_wide = imma_cfg<IM_MM, Q4, 2, 4, 2, 2, 2, 4>;
template <bool Q4> using mm_narrow = imma_cfg<IM_MM, Q4, 4, 2, 2, 2, 2, Q4 ? 3 : 4>;
template <bool Q4> using ex_gu = imma_cfg<IM_GU, Q4, 4, 1, 2, 2, 2, Q4 ? 3 : 4>;
template <bool Q4> using ex_down = imma_cfg<IM_DOWN, Q4, 4, 1, 2, 2, 2, Q4 ? 3 : 4>;
/* Grouped calls in tiles of 8 tokens (128 registers: four blocks an SM), for experts of a few tokens (a short
 * prompt's), whose 16-token tiles are mostly padding: FLASHMOE_CUDA_IMMA_NARROW=1 always, auto where the experts
 * of at least min_t tokens pad to 1.5 times the tokens in 16-token tiles that they do in 8-token ones; 0 or unset
 * never (the default until auto is measured: bench/RESULTS.md, session 20). Read at each call. */
template <bool Q4> using ex_gu_narrow = imma_cfg<IM_GU, Q4, 4, 1, 2, 1, 2, Q4 ? 3 : 4>;
template <bool Q4> using ex_down_narrow = imma_cfg<IM_DOWN, Q4, 4, 1, 2, 1, 2, Q4 ? 3 : 4>;
static_assert(ex_gu_narrow<true>::BM == ex_gu<true>::BM && ex_down_narrow<true>::BM == ex_down<true>::BM,
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

template <class C>
bool launch_cfg(cudaStream_t s, const imma_args &a, const fmc_expert *ex_host) {
    return launch_imma<C::K, C::Q4, C::WM, C::WN, C::MT, C::NT, C::KC, C::ST>(s, a, ex_host);
}

/* a grouped call's kernel (gu: gate·up, else down) for w's dtype, in 8-token tiles or 16 */
bool launch_grouped(cudaStream_t s, const imma_args &a, const fmc_expert *ex_host, int gu, bool q4, bool narrow) {
    if (narrow) {
        if (gu) return q4 ? launch_cfg<ex_gu_narrow<true>>(s, a, ex_host) : launch_cfg<ex_gu_narrow<false>>(s, a, ex_host);
        return q4 ? launch_cfg<ex_down_narrow<true>>(s, a, ex_host) : launch_cfg<ex_down_narrow<false>>(s, a, ex_host);
    }
    if (gu) return q4 ? launch_cfg<ex_gu<true>>(s, a, ex_host) : launch_cfg<ex_gu<false>>(s, a, ex_host);
    return q4 ? launch_cfg<ex_down<true>>(s, a, ex_host) : launch_cfg<ex_down<false>>(s, a, ex_host);
}

template <class C>
long long blocks_of(long long token_tiles, int rows) { return token_tiles * ((rows + C::BM - 1) / C::BM); }

} // namespace

extern "C" int fmc_mm_imma(cudaStream_t s, const fm_mat *w, const int8_t *xq, const float *xd, const float *xs,
                           float *y, int T) {
    const int mode = imma_mode();
    if (T < FMC_IMMA_MIN_T || mode == IMMA_OFF || ((uintptr_t)w->data & 15) || !imma_takes(w)) return 0;
    const bool wide = T >= 48, q4 = w->dtype == FM_Q4;
    const int BN = wide ? mm_wide<true>::BN : mm_narrow<true>::BN;
    const long long blocks = wide ? blocks_of<mm_wide<true>>((T + BN - 1) / BN, w->rows)
                                  : blocks_of<mm_narrow<true>>((T + BN - 1) / BN, w->rows);
    if (!fills(mode, blocks, 1)) return 0;
    const imma_args a = args_of(w, xq, xd, xs, y, T);
    if (wide) return q4 ? launch_cfg<mm_wide<true>>(s, a, nullptr) : launch_cfg<mm_wide<false>>(s, a, nullptr);
    return q4 ? launch_cfg<mm_narrow<true>>(s, a, nullptr) : launch_cfg<mm_narrow<false>>(s, a, nullptr);
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
    return tiles && fills(mode, blocks, narrow ? 4 : 2) ? min_t : 0;
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
