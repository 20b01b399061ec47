// qmv_q8.metal — y[T, rows] = x[T, cols] · Wᵀ for a q8 affine W on fp32 activations (cpu.h's fm_cpu_matmul
// without int8_act): fm_qmv_q8, the decode matvec (one token per threadgroup), and fm_qmm_q8, the prefill
// matmul (FM_MM_TOKENS tokens per threadgroup). The same as qmv_q4.metal (which says how, why both are
// batch invariant, and what MLX's qmm_t does differently) but for the layout (fm_metal_args.h): one byte per
// element; a 16-bit scale and bias per group_size elements, fp16 or (scale_bf16) bfloat16.
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

// a stored scale or bias: fp16, or bfloat16 (the top 16 bits of a float32, exact in fp32)
static inline float fm_scale_value(ushort bits, uint bf16) {
    return bf16 ? as_type<float>(uint(bits) << 16) : float(as_type<half>(bits));
}

// the 4 values at columns 4i .. 4i+3 of a lane's 16 (16 bytes, 4 per component of w) as floats
static inline float4 fm_q8_values(uint4 w, int i) {
    const uint b = w[i];
    return float4(float(b & 255), float((b >> 8) & 255), float((b >> 16) & 255), float(b >> 24));
}

// Tokens [tile·NT, tile·NT + NT) ∩ [0, T) against this simdgroup's rows.
template <int NT>
static inline void fm_qmv_q8_tile(device const uchar *wq, device const ushort *scales, device const ushort *biases,
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
        uint4 w[R];
        float4 s, b;
        for (int r = 0; r < R; r++) {
            const uint row = min(row0 + r, a.rows - 1); // past the end: a repeated row, never written
            w[r] = *(device const uint4 *)(wq + (ulong)row * a.cols + k);
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
                    const float4 qv = fm_q8_values(w[r], i);
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

kernel void fm_qmv_q8(device const uchar *wq [[buffer(0)]],
                      device const ushort *scales [[buffer(1)]],
                      device const ushort *biases [[buffer(2)]],
                      device const float *x [[buffer(3)]],
                      device float *y [[buffer(4)]],
                      constant fm_matmul_args &a [[buffer(5)]],
                      uint2 tg [[threadgroup_position_in_grid]],
                      uint sg [[simdgroup_index_in_threadgroup]],
                      uint lane [[thread_index_in_simdgroup]]) {
    fm_qmv_q8_tile<1>(wq, scales, biases, x, y, a, tg, sg, lane);
}

kernel void fm_qmm_q8(device const uchar *wq [[buffer(0)]],
                      device const ushort *scales [[buffer(1)]],
                      device const ushort *biases [[buffer(2)]],
                      device const float *x [[buffer(3)]],
                      device float *y [[buffer(4)]],
                      constant fm_matmul_args &a [[buffer(5)]],
                      uint2 tg [[threadgroup_position_in_grid]],
                      uint sg [[simdgroup_index_in_threadgroup]],
                      uint lane [[thread_index_in_simdgroup]]) {
    fm_qmv_q8_tile<FM_MM_TOKENS>(wq, scales, biases, x, y, a, tg, sg, lane);
}
