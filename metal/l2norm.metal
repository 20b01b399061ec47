// l2norm.metal — x[rows, n] *= scale / sqrt(Σx² + eps) per row, in place (cpu.h's fm_cpu_l2norm; the
// DeltaNet's q and k per head). As rmsnorm.metal: one threadgroup per row, simd_sum per simdgroup, the
// partial sums meeting in threadgroup memory sized by the host (fm_metal_grid.h). The sum is in fp32 here
// (the CPU's in double). Each lane rewrites only the elements it read.
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

kernel void fm_l2norm(device float *x [[buffer(0)]],
                      constant fm_l2norm_args &a [[buffer(1)]],
                      threadgroup float *partial [[threadgroup(0)]],
                      uint row [[threadgroup_position_in_grid]],
                      uint tid [[thread_index_in_threadgroup]],
                      uint threads [[threads_per_threadgroup]],
                      uint sg [[simdgroup_index_in_threadgroup]],
                      uint lane [[thread_index_in_simdgroup]]) {
    device float *xr = x + (ulong)row * a.n;
    float ss = 0.0f;
    for (uint i = tid; i < a.n; i += threads) ss += xr[i] * xr[i];
    ss = simd_sum(ss);
    if (lane == 0) partial[sg] = ss;
    threadgroup_barrier(mem_flags::mem_threadgroup); // every simdgroup's partial is written
    if (sg == 0) {
        float v = lane < threads / FM_METAL_SIMD ? partial[lane] : 0.0f;
        v = simd_sum(v);
        if (lane == 0) partial[0] = v;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup); // the total is written
    const float inv = a.scale / sqrt(partial[0] + a.eps);
    for (uint i = tid; i < a.n; i += threads) xr[i] *= inv;
}
