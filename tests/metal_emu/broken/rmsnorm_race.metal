// Broken on purpose, kept as a test of the emulator (tests/test_metal_emu.py): metal/rmsnorm.metal with the
// partial sums added into one threadgroup float by each simdgroup's lane 0, unordered: a race (on a GPU a
// lost update; here a sum whose order follows the lanes' order).
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
    if (tid == 0) partial[0] = 0.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (lane == 0) partial[0] += ss; // the race
    threadgroup_barrier(mem_flags::mem_threadgroup); // the total is written
    const float inv = rsqrt(partial[0] / (float)a.n + a.eps);
    for (uint i = tid; i < a.n; i += threads)
        outr[i] = xr[i] * inv * (a.zero_centered ? 1.0f + w[i] : w[i]);
}
