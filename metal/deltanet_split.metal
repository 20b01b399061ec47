// deltanet_split.metal — DeltaNet's conv output [T, 2·kd + vd] split into q, k [T, kd] and v [T, vd]
// (backend_cpu.c's cpu_deltanet_split): copies, one thread per element of conv.
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

kernel void fm_deltanet_split(device float *q [[buffer(0)]],
                              device float *k [[buffer(1)]],
                              device float *v [[buffer(2)]],
                              device const float *conv [[buffer(3)]],
                              constant fm_deltanet_split_args &a [[buffer(4)]],
                              uint i [[thread_position_in_grid]]) {
    if (i >= a.n) return;
    const uint row = 2 * a.kd + a.vd;
    const uint t = i / row, c = i - t * row;
    if (c < a.kd)
        q[t * a.kd + c] = conv[i];
    else if (c < 2 * a.kd)
        k[t * a.kd + (c - a.kd)] = conv[i];
    else
        v[t * a.vd + (c - 2 * a.kd)] = conv[i];
}
