// moe_combine.metal — out[t] += Σ_j w[t, j]·ye[row[t, j]], j in order (backend_cpu.c's cpu_moe_combine: a
// fixed order whatever order the experts ran in), one thread per element of out; row and w [T, k] (the
// host's, copied to the GPU), ye [·, h] the experts' output rows.
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

kernel void fm_moe_combine(device float *out [[buffer(0)]],
                           device const float *ye [[buffer(1)]],
                           device const int *row [[buffer(2)]],
                           device const float *w [[buffer(3)]],
                           constant fm_moe_combine_args &a [[buffer(4)]],
                           uint i [[thread_position_in_grid]]) {
    if (i >= a.n) return;
    const uint t = i / a.h, c = i - t * a.h;
    float o = out[i];
    for (uint j = 0; j < a.k; j++) {
        const uint tj = t * a.k + j;
        o += w[tj] * ye[(ulong)row[tj] * a.h + c];
    }
    out[i] = o;
}
