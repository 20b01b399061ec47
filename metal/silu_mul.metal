// silu_mul.metal — out[n] = silu(gate)·up (cpu.h's fm_cpu_silu_mul), one thread per element. exp's
// argument is clamped to [-87, 88] as the CPU's fm_exp clamps it: the ends saturate and never pass
// through inf, which fast math does not promise to honour.
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

kernel void fm_silu_mul(device float *out [[buffer(0)]],
                        device const float *gate [[buffer(1)]],
                        device const float *up [[buffer(2)]],
                        constant fm_eltwise_args &a [[buffer(3)]],
                        uint i [[thread_position_in_grid]]) {
    if (i >= a.n) return; // the grid is rounded up to whole threadgroups
    const float g = gate[i];
    out[i] = g / (1.0f + exp(clamp(-g, -87.0f, 88.0f))) * up[i];
}
