// qmv_q4.metal — y[T, rows] = x[T, cols] · Wᵀ for a q4 affine W, the decode matvec (cpu.h's
// fm_cpu_matmul with fp32 activations). After MLX's qmv_fast: FM_QMV_SIMDGROUPS simdgroups of
// FM_QMV_ROWS_PER_SIMD rows each per threadgroup; a lane takes FM_QMV_VALUES_PER_LANE consecutive
// columns per step (the simdgroup 512), computes scale·Σq·x + bias·Σx per group for each of its rows,
// and simd_sum reduces the lanes. Layout (fm_metal_args.h): byte j of a row holds elements 2j (low
// nibble) and 2j+1; a 16-bit scale and bias per group_size elements, fp16 or (scale_bf16) bfloat16.
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

// a stored scale or bias: fp16, or bfloat16 (the top 16 bits of a float32, exact in fp32)
static inline float fm_scale_value(ushort bits, uint bf16) {
    return bf16 ? as_type<float>(uint(bits) << 16) : float(as_type<half>(bits));
}

kernel void fm_qmv_q4(device const uchar *wq [[buffer(0)]],
                      device const ushort *scales [[buffer(1)]],
                      device const ushort *biases [[buffer(2)]],
                      device const float *x [[buffer(3)]],
                      device float *y [[buffer(4)]],
                      constant fm_qmv_args &a [[buffer(5)]],
                      uint2 tg [[threadgroup_position_in_grid]],
                      uint sg [[simdgroup_index_in_threadgroup]],
                      uint lane [[thread_index_in_simdgroup]]) {
    constexpr int V = FM_QMV_VALUES_PER_LANE;
    const uint row0 = (tg.x * FM_QMV_SIMDGROUPS + sg) * FM_QMV_ROWS_PER_SIMD;
    if (row0 >= a.rows) return; // a whole simdgroup past the last row: it takes part in no reduction
    const uint t = tg.y, groups = a.cols / a.group_size;
    device const float *xt = x + (ulong)t * a.cols;

    float acc[FM_QMV_ROWS_PER_SIMD] = {0.0f};
    for (uint k = lane * V; k < a.cols; k += V * FM_METAL_SIMD) {
        float4 xv[V / 4];
        float xsum = 0.0f;
        for (int i = 0; i < V / 4; i++) {
            xv[i] = *(device const float4 *)(xt + k + 4 * i);
            xsum += xv[i].x + xv[i].y + xv[i].z + xv[i].w;
        }
        const uint g = k / a.group_size; // V divides group_size: the V values share one group
        for (int r = 0; r < FM_QMV_ROWS_PER_SIMD; r++) {
            const uint row = min(row0 + r, a.rows - 1); // past the end: a repeated row, never written
            device const uchar *q = wq + (ulong)row * (a.cols / 2) + k / 2;
            float dot = 0.0f;
            for (int i = 0; i < V / 4; i++) {
                const uchar b0 = q[2 * i], b1 = q[2 * i + 1];
                const float4 qv = float4(float(b0 & 15), float(b0 >> 4), float(b1 & 15), float(b1 >> 4));
                dot += qv.x * xv[i].x + qv.y * xv[i].y + qv.z * xv[i].z + qv.w * xv[i].w;
            }
            const ulong sb = (ulong)row * groups + g;
            acc[r] += fm_scale_value(scales[sb], a.scale_bf16) * dot + fm_scale_value(biases[sb], a.scale_bf16) * xsum;
        }
    }
    for (int r = 0; r < FM_QMV_ROWS_PER_SIMD; r++) {
        const float s = simd_sum(acc[r]);
        if (lane == 0 && row0 + r < a.rows) y[(ulong)t * a.rows + row0 + r] = s;
    }
}
