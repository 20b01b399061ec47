// Broken on purpose, kept as a test of the emulator (tests/test_metal_emu.py): metal/rmsnorm.metal with the lanes past the
// row's end returning once their partial sum is in, before the barriers every lane must reach (a divergent
// barrier).
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

kernel void fm_rmsnorm(device float *out [[buffer(0)]],
                       device const float *x [[buffer(1)]],
                       device const float *w [[buffer(2)]],
                       constant fm_rmsnorm_args &a [[buffer(3)]],
                       threadgroup float *partial [[threadgroup(0)]],
                       uint row [[threadgroup_position_in_grid]],
                       uint tid [[thread_index_in_threadgroup]],
                       uint threads [[threads_per_threadgroup]],
                       uint sg [[simdgroup_index_in_threadgroup]],
                       uint lane [[thread_index_in_simdgroup]]) {
    device const float *xr = x + (ulong)row * a.n;
    device float *outr = out + (ulong)row * a.n;
    float ss = 0.0f;
    for (uint i = tid; i < a.n; i += threads) ss += xr[i] * xr[i];
    ss = simd_sum(ss);
    if (lane == 0) partial[sg] = ss;
    if (tid >= a.n) return; // nothing left to write: but every lane must reach the barriers
    threadgroup_barrier(mem_flags::mem_threadgroup); // every simdgroup's partial is written
    if (sg == 0) {
        float v = lane < threads / FM_METAL_SIMD ? partial[lane] : 0.0f;
        v = simd_sum(v);
        if (lane == 0) partial[0] = v;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup); // the total is written
    const float inv = rsqrt(partial[0] / (float)a.n + a.eps);
    for (uint i = tid; i < a.n; i += threads)
        outr[i] = xr[i] * inv * (a.zero_centered ? 1.0f + w[i] : w[i]);
}
