// qmv_q4.metal — y[T, rows] = x[T, cols] · Wᵀ for a q4 affine W on fp32 activations (cpu.h's fm_cpu_matmul
// without int8_act): fm_qmv_q4, the decode matvec (one token per threadgroup), and fm_qmm_q4, the prefill
// matmul (FM_MM_TOKENS tokens per threadgroup). Layout (fm_metal_args.h): byte j of a row holds elements 2j
// (low nibble) and 2j+1; a 16-bit scale and bias per group_size elements, fp16 or (scale_bf16) bfloat16.
//
// After MLX's qmv_fast: FM_QMV_SIMDGROUPS simdgroups of FM_QMV_ROWS_PER_SIMD rows each per threadgroup; a
// lane takes FM_QMV_VALUES_PER_LANE consecutive columns per step (the simdgroup 512), computes
// scale·Σq·x + bias·Σx per group for each of its rows, and simd_sum reduces the lanes (the 4 rows as one
// float4).
//
// Batch invariance (backend.h): both kernels are fm_qmv_q4_tile, for 1 or FM_MM_TOKENS tokens. The prefill
// one loads a step's weights (8 bytes per row, and the rows' scales and biases) once and keeps them in
// registers for the tile's tokens, but each token goes through exactly the arithmetic of the matvec: the
// same lane partition, the same order of its partial sums, one simd_sum at the end. A token's outputs are
// bitwise the same whatever T and wherever it sits in the call (tests/test_metal_emu.py's invariance test).
// What the emulator cannot show: Apple's compiler (fast math) compiles the two instantiations separately and
// could contract (FMA) or reassociate the same expression differently in each; to be checked on a Mac.
//
// What MLX's qmm_t does differently, and why not yet: it tiles the output (e.g. 32 tokens × 32 rows per
// threadgroup), stages dequantized weight tiles and x tiles in threadgroup memory and multiplies them with
// simdgroup_matrix 8×8 MMA (simdgroup_multiply_accumulate), the K sum running over tiles of 32-64 columns.
// That reuses each weight across 32+ tokens and uses the matrix units: far more FLOP/s for a long prompt.
// But its reduction order is the MMA's and the tile's, not the matvec's, so a token's bits would depend on
// whether it ran in decode or in a prompt (and the MMA's internal order is not specified, nor emulated
// here). Batch invariance needs decode to use the same order, i.e. a matvec built from the same MMA tiles
// (a token padded to 8), which costs decode ~8x the ALU work; to weigh on a Mac, not here.
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

// a stored scale or bias: fp16, or bfloat16 (the top 16 bits of a float32, exact in fp32)
static inline float fm_scale_value(ushort bits, uint bf16) {
    return bf16 ? as_type<float>(uint(bits) << 16) : float(as_type<half>(bits));
}

// the 4 values at columns 4i .. 4i+3 of a lane's 16 (8 bytes: w.x bytes 0-3, w.y bytes 4-7) as floats
static inline float4 fm_q4_values(uint2 w, int i) {
    const uint b = (i < 2 ? w.x : w.y) >> (16 * (i & 1));
    return float4(float(b & 15), float((b >> 4) & 15), float((b >> 8) & 15), float((b >> 12) & 15));
}

// Tokens [tile·NT, tile·NT + NT) ∩ [0, T) against this simdgroup's rows.
template <int NT>
static inline void fm_qmv_q4_tile(device const uchar *wq, device const ushort *scales, device const ushort *biases,
                                  device const float *x, device float *y, constant fm_matmul_args &a, uint2 tg,
                                  uint sg, uint lane) {
    constexpr int V = FM_QMV_VALUES_PER_LANE, R = FM_QMV_ROWS_PER_SIMD;
    const uint row0 = (tg.x * FM_QMV_SIMDGROUPS + sg) * R;
    if (row0 >= a.rows) return; // a whole simdgroup past the last row: it takes part in no reduction
    const uint t0 = tg.y * NT, nt = min(uint(NT), a.T - t0), groups = a.cols / a.group_size;

    float4 acc[NT]; // the R rows of each token
    for (int j = 0; j < NT; j++) acc[j] = float4(0.0f);
    for (uint k = lane * V; k < a.cols; k += V * FM_METAL_SIMD) {
        const uint g = k / a.group_size; // V divides group_size: the V values share one group
        uint2 w[R];
        float4 s, b;
        for (int r = 0; r < R; r++) {
            const uint row = min(row0 + r, a.rows - 1); // past the end: a repeated row, never written
            w[r] = *(device const uint2 *)(wq + (ulong)row * (a.cols / 2) + k / 2);
            const ulong sb = (ulong)row * groups + g;
            s[r] = fm_scale_value(scales[sb], a.scale_bf16);
            b[r] = fm_scale_value(biases[sb], a.scale_bf16);
        }
        for (int j = 0; j < NT; j++) {
            if (uint(j) >= nt) break;
            device const float *xt = x + (ulong)(t0 + j) * a.cols + k;
            float4 xv[V / 4];
            float xsum = 0.0f;
            for (int i = 0; i < V / 4; i++) {
                xv[i] = *(device const float4 *)(xt + 4 * i);
                xsum += xv[i].x + xv[i].y + xv[i].z + xv[i].w;
            }
            float4 dot = float4(0.0f);
            for (int r = 0; r < R; r++)
                for (int i = 0; i < V / 4; i++) {
                    const float4 qv = fm_q4_values(w[r], i);
                    dot[r] += qv.x * xv[i].x + qv.y * xv[i].y + qv.z * xv[i].z + qv.w * xv[i].w;
                }
            acc[j] += s * dot + b * xsum;
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

kernel void fm_qmv_q4(device const uchar *wq [[buffer(0)]],
                      device const ushort *scales [[buffer(1)]],
                      device const ushort *biases [[buffer(2)]],
                      device const float *x [[buffer(3)]],
                      device float *y [[buffer(4)]],
                      constant fm_matmul_args &a [[buffer(5)]],
                      uint2 tg [[threadgroup_position_in_grid]],
                      uint sg [[simdgroup_index_in_threadgroup]],
                      uint lane [[thread_index_in_simdgroup]]) {
    fm_qmv_q4_tile<1>(wq, scales, biases, x, y, a, tg, sg, lane);
}

kernel void fm_qmm_q4(device const uchar *wq [[buffer(0)]],
                      device const ushort *scales [[buffer(1)]],
                      device const ushort *biases [[buffer(2)]],
                      device const float *x [[buffer(3)]],
                      device float *y [[buffer(4)]],
                      constant fm_matmul_args &a [[buffer(5)]],
                      uint2 tg [[threadgroup_position_in_grid]],
                      uint sg [[simdgroup_index_in_threadgroup]],
                      uint lane [[thread_index_in_simdgroup]]) {
    fm_qmv_q4_tile<FM_MM_TOKENS>(wq, scales, biases, x, y, a, tg, sg, lane);
}
