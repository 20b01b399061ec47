// qmv_i8.metal — y[T, rows] = x[T, cols] · Wᵀ for a q4 or q8 affine W on int8 activations (cpu.h's
// fm_cpu_matmul with int8_act): x comes quantized by quantize_x.metal as xq [T, cols] (int8) with xd, xqs
// [T, groups], and each output is, as the CPU computes it,
//     y = Σ_g xd_g·(scale_g·Σ q·xq + bias_g·xqs_g)
// with Σ q·xq an integer dot product over the whole group. fm_qmv_q4_i8 / fm_qmv_q8_i8: the decode matvec
// (one token per threadgroup); fm_qmm_q4_i8 / fm_qmm_q8_i8: the prefill matmul (FM_MM_TOKENS tokens per
// threadgroup). group_size 32, 64, 128 or 256 (a power of two: a group is a whole block of lanes).
//
// The structure of qmv_q4.metal (which says why both kernels are batch invariant and what MLX's qmm_t does
// differently): FM_QMV_SIMDGROUPS simdgroups of FM_QMV_ROWS_PER_SIMD rows (an int4 / float4) per
// threadgroup; a lane takes FM_QMV_I8_VALUES_PER_LANE consecutive columns per step (the simdgroup 1024), so
// a group spans L = group_size / 32 lanes: their integer partial dots are summed exactly across the L lanes
// (simd_shuffle_xor, every lane of the simdgroup taking part at every step), then the group's first lane
// adds the group's term; simd_sum reduces the lanes at the end. The prefill kernel keeps a step's weights
// of its rows in registers for the tile's tokens; each token's arithmetic is the matvec's.
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

// a stored scale or bias: fp16, or bfloat16 (the top 16 bits of a float32, exact in fp32)
static inline float fm_scale_value(ushort bits, uint bf16) {
    return bf16 ? as_type<float>(uint(bits) << 16) : float(as_type<half>(bits));
}

// Σ q·xq over 4 columns: q as ints, xq the 4 int8 of a word
static inline int fm_dot4(int4 q, uint xw) {
    const char4 c = as_type<char4>(xw);
    const int4 p = q * int4(int(c.x), int(c.y), int(c.z), int(c.w));
    return p.x + p.y + p.z + p.w;
}

// A lane's 32 weights of a row (q4: 16 bytes in w[0]; q8: 32 bytes in w[0], w[1]) against its 32 xq (x0, x1)
static inline int fm_dot32(const thread uint4 *w, uint4 x0, uint4 x1, int bits) {
    int d = 0;
    if (bits == 4) { // word m: elements 8m .. 8m+7, element 2i in the low nibble of byte i
        for (int m = 0; m < 4; m++) {
            const uint b = w[0][m];
            const int4 lo = int4(int(b & 15u), int((b >> 4) & 15u), int((b >> 8) & 15u), int((b >> 12) & 15u));
            const int4 hi = int4(int((b >> 16) & 15u), int((b >> 20) & 15u), int((b >> 24) & 15u), int(b >> 28));
            d += fm_dot4(lo, m < 2 ? x0[2 * m] : x1[2 * m - 4]) + fm_dot4(hi, m < 2 ? x0[2 * m + 1] : x1[2 * m - 3]);
        }
    } else {
        for (int m = 0; m < 8; m++) {
            const uchar4 q = as_type<uchar4>(w[m / 4][m % 4]);
            d += fm_dot4(int4(int(q.x), int(q.y), int(q.z), int(q.w)), m < 4 ? x0[m] : x1[m - 4]);
        }
    }
    return d;
}

// Tokens [tile·NT, tile·NT + NT) ∩ [0, T) against this simdgroup's rows; W of BITS bits.
template <int BITS, int NT>
static inline void fm_qmv_i8_tile(device const uchar *wq, device const ushort *scales, device const ushort *biases,
                                  device const char *xq, device const float *xd, device const float *xqs,
                                  device float *y, constant fm_matmul_args &a, uint2 tg, uint sg, uint lane) {
    constexpr int V = FM_QMV_I8_VALUES_PER_LANE, R = FM_QMV_ROWS_PER_SIMD, WORDS = BITS / 4; // uint4 per row
    const uint row0 = (tg.x * FM_QMV_SIMDGROUPS + sg) * R;
    if (row0 >= a.rows) return; // a whole simdgroup past the last row: it takes part in no reduction
    const uint t0 = tg.y * NT, nt = min(uint(NT), a.T - t0), groups = a.cols / a.group_size;
    const uint L = a.group_size / V; // lanes per group: 1, 2, 4 or 8

    float4 acc[NT]; // the R rows of each token
    for (int j = 0; j < NT; j++) acc[j] = float4(0.0f);
    for (uint k0 = 0; k0 < a.cols; k0 += V * FM_METAL_SIMD) { // every lane takes every step (the shuffles)
        const uint k = k0 + lane * V, g = k / a.group_size;
        const bool on = k < a.cols; // a lane past the end adds 0 to its group's sums (its group is all past)
        uint4 w[R][WORDS];
        float4 s = float4(0.0f), b = float4(0.0f);
        for (int r = 0; r < R; r++) {
            const uint row = min(row0 + r, a.rows - 1); // past the end: a repeated row, never written
            device const uint4 *wr = (device const uint4 *)(wq + (ulong)row * (a.cols * BITS / 8) + k * BITS / 8);
            for (int i = 0; i < WORDS; i++) w[r][i] = on ? wr[i] : uint4(0u);
            if (on) {
                const ulong sb = (ulong)row * groups + g;
                s[r] = fm_scale_value(scales[sb], a.scale_bf16);
                b[r] = fm_scale_value(biases[sb], a.scale_bf16);
            }
        }
        for (int j = 0; j < NT; j++) {
            if (uint(j) >= nt) break;
            int4 dot = int4(0);
            if (on) {
                device const uint4 *xp = (device const uint4 *)(xq + (ulong)(t0 + j) * a.cols + k);
                const uint4 x0 = xp[0], x1 = xp[1];
                for (int r = 0; r < R; r++) dot[r] = fm_dot32(w[r], x0, x1, BITS);
            }
            for (uint m = 1; m < L; m <<= 1) dot += simd_shuffle_xor(dot, ushort(m)); // exact: integers
            if (on && lane % L == 0) {
                const ulong gi = (ulong)(t0 + j) * groups + g;
                acc[j] += xd[gi] * (s * float4(dot) + b * xqs[gi]);
            }
        }
    }
    for (int j = 0; j < NT; j++) {
        if (uint(j) >= nt) break;
        const float4 sum = simd_sum(acc[j]);
        if (lane == 0)
            for (int r = 0; r < R; r++)
                if (row0 + r < a.rows) y[(ulong)(t0 + j) * a.rows + row0 + r] = sum[r];
    }
}

kernel void fm_qmv_q4_i8(device const uchar *wq [[buffer(0)]],
                         device const ushort *scales [[buffer(1)]],
                         device const ushort *biases [[buffer(2)]],
                         device const char *xq [[buffer(3)]],
                         device const float *xd [[buffer(4)]],
                         device const float *xqs [[buffer(5)]],
                         device float *y [[buffer(6)]],
                         constant fm_matmul_args &a [[buffer(7)]],
                         uint2 tg [[threadgroup_position_in_grid]],
                         uint sg [[simdgroup_index_in_threadgroup]],
                         uint lane [[thread_index_in_simdgroup]]) {
    fm_qmv_i8_tile<4, 1>(wq, scales, biases, xq, xd, xqs, y, a, tg, sg, lane);
}

kernel void fm_qmm_q4_i8(device const uchar *wq [[buffer(0)]],
                         device const ushort *scales [[buffer(1)]],
                         device const ushort *biases [[buffer(2)]],
                         device const char *xq [[buffer(3)]],
                         device const float *xd [[buffer(4)]],
                         device const float *xqs [[buffer(5)]],
                         device float *y [[buffer(6)]],
                         constant fm_matmul_args &a [[buffer(7)]],
                         uint2 tg [[threadgroup_position_in_grid]],
                         uint sg [[simdgroup_index_in_threadgroup]],
                         uint lane [[thread_index_in_simdgroup]]) {
    fm_qmv_i8_tile<4, FM_MM_TOKENS>(wq, scales, biases, xq, xd, xqs, y, a, tg, sg, lane);
}

kernel void fm_qmv_q8_i8(device const uchar *wq [[buffer(0)]],
                         device const ushort *scales [[buffer(1)]],
                         device const ushort *biases [[buffer(2)]],
                         device const char *xq [[buffer(3)]],
                         device const float *xd [[buffer(4)]],
                         device const float *xqs [[buffer(5)]],
                         device float *y [[buffer(6)]],
                         constant fm_matmul_args &a [[buffer(7)]],
                         uint2 tg [[threadgroup_position_in_grid]],
                         uint sg [[simdgroup_index_in_threadgroup]],
                         uint lane [[thread_index_in_simdgroup]]) {
    fm_qmv_i8_tile<8, 1>(wq, scales, biases, xq, xd, xqs, y, a, tg, sg, lane);
}

kernel void fm_qmm_q8_i8(device const uchar *wq [[buffer(0)]],
                         device const ushort *scales [[buffer(1)]],
                         device const ushort *biases [[buffer(2)]],
                         device const char *xq [[buffer(3)]],
                         device const float *xd [[buffer(4)]],
                         device const float *xqs [[buffer(5)]],
                         device float *y [[buffer(6)]],
                         constant fm_matmul_args &a [[buffer(7)]],
                         uint2 tg [[threadgroup_position_in_grid]],
                         uint sg [[simdgroup_index_in_threadgroup]],
                         uint lane [[thread_index_in_simdgroup]]) {
    fm_qmv_i8_tile<8, FM_MM_TOKENS>(wq, scales, biases, xq, xd, xqs, y, a, tg, sg, lane);
}
