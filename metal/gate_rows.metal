// gate_rows.metal — out[t, :] *= sigmoid(g[t]) (backend_cpu.c's cpu_gate_rows: the shared expert's gate),
// one thread per element. sigmoid as fm_sigmoid: 1 / (1 + exp(-g)), exp's argument clamped to [-87, 88]
// as fm_exp clamps it (silu_mul.metal says why).
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

kernel void fm_gate_rows(device float *out [[buffer(0)]],
                         device const float *g [[buffer(1)]],
                         constant fm_gate_rows_args &a [[buffer(2)]],
                         uint i [[thread_position_in_grid]]) {
    if (i >= a.total) return;
    const float s = 1.0f / (1.0f + exp(clamp(-g[i / a.n], -87.0f, 88.0f)));
    out[i] *= s;
}
