// BROKEN on purpose (tests/test_metal_emu.py): mv_dense.metal whose multi-token kernels sum a lane's columns
// in the reverse order, so a token's bits depend on T; the batch invariance check must catch it.
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

static inline float fm_dense_value(device const float *w, ulong i) { return w[i]; }
static inline float fm_dense_value(device const ushort *w, ulong i) { return as_type<float>(uint(w[i]) << 16); }

// Tokens [tile·NT, tile·NT + NT) ∩ [0, T) against this simdgroup's rows; W of element type E.
template <int NT, typename E>
static inline void fm_mv_tile(device const E *w, device const float *x, device float *y, constant fm_matmul_args &a,
                              uint2 tg, uint sg, uint lane) {
    constexpr int V = FM_MV_VALUES_PER_LANE, R = FM_QMV_ROWS_PER_SIMD;
    const uint row0 = (tg.x * FM_QMV_SIMDGROUPS + sg) * R;
    if (row0 >= a.rows) return; // a whole simdgroup past the last row: it takes part in no reduction
    const uint t0 = tg.y * NT, nt = min(uint(NT), a.T - t0);

    float4 acc[NT]; // the R rows of each token
    for (int j = 0; j < NT; j++) acc[j] = float4(0.0f);
    for (uint k = lane * V; k < a.cols; k += V * FM_METAL_SIMD) {
        float4 wv[V]; // column k + i of the R rows; 0 past the end of the row
        for (int i = 0; i < V; i++)
            for (int r = 0; r < R; r++) {
                const uint row = min(row0 + r, a.rows - 1); // past the end: a repeated row, never written
                wv[i][r] = k + i < a.cols ? fm_dense_value(w, (ulong)row * a.cols + k + i) : 0.0f;
            }
        for (int j = 0; j < NT; j++) {
            if (uint(j) >= nt) break;
            device const float *xt = x + (ulong)(t0 + j) * a.cols;
            float4 dot = float4(0.0f);
            if (NT == 1)
                for (int i = 0; i < V; i++) dot += wv[i] * (k + i < a.cols ? xt[k + i] : 0.0f);
            else // BROKEN: the multi-token kernel sums the lane's columns in the other order
                for (int i = V - 1; i >= 0; i--) dot += wv[i] * (k + i < a.cols ? xt[k + i] : 0.0f);
            acc[j] += dot;
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

kernel void fm_mv_f32(device const float *w [[buffer(0)]],
                      device const float *x [[buffer(1)]],
                      device float *y [[buffer(2)]],
                      constant fm_matmul_args &a [[buffer(3)]],
                      uint2 tg [[threadgroup_position_in_grid]],
                      uint sg [[simdgroup_index_in_threadgroup]],
                      uint lane [[thread_index_in_simdgroup]]) {
    fm_mv_tile<1>(w, x, y, a, tg, sg, lane);
}

kernel void fm_mm_f32(device const float *w [[buffer(0)]],
                      device const float *x [[buffer(1)]],
                      device float *y [[buffer(2)]],
                      constant fm_matmul_args &a [[buffer(3)]],
                      uint2 tg [[threadgroup_position_in_grid]],
                      uint sg [[simdgroup_index_in_threadgroup]],
                      uint lane [[thread_index_in_simdgroup]]) {
    fm_mv_tile<FM_MM_TOKENS>(w, x, y, a, tg, sg, lane);
}

kernel void fm_mv_bf16(device const ushort *w [[buffer(0)]],
                       device const float *x [[buffer(1)]],
                       device float *y [[buffer(2)]],
                       constant fm_matmul_args &a [[buffer(3)]],
                       uint2 tg [[threadgroup_position_in_grid]],
                       uint sg [[simdgroup_index_in_threadgroup]],
                       uint lane [[thread_index_in_simdgroup]]) {
    fm_mv_tile<1>(w, x, y, a, tg, sg, lane);
}

kernel void fm_mm_bf16(device const ushort *w [[buffer(0)]],
                       device const float *x [[buffer(1)]],
                       device float *y [[buffer(2)]],
                       constant fm_matmul_args &a [[buffer(3)]],
                       uint2 tg [[threadgroup_position_in_grid]],
                       uint sg [[simdgroup_index_in_threadgroup]],
                       uint lane [[thread_index_in_simdgroup]]) {
    fm_mv_tile<FM_MM_TOKENS>(w, x, y, a, tg, sg, lane);
}
