// sigmoid_mul.metal — out[n] = x·sigmoid(gate) (cpu.h's fm_cpu_sigmoid_mul; the gated attention's output
// gate), one thread per element. exp's argument clamped as in silu_mul.metal.
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

kernel void fm_sigmoid_mul(device float *out [[buffer(0)]],
                           device const float *gate [[buffer(1)]],
                           device const float *x [[buffer(2)]],
                           constant fm_eltwise_args &a [[buffer(3)]],
                           uint i [[thread_position_in_grid]]) {
    if (i >= a.n) return;
    out[i] = x[i] * (1.0f / (1.0f + exp(clamp(-gate[i], -87.0f, 88.0f))));
}
