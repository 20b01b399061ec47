// add.metal — the residual add: x[n] += y[n], one thread per element.
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

kernel void fm_add(device float *x [[buffer(0)]],
                   device const float *y [[buffer(1)]],
                   constant fm_add_args &a [[buffer(2)]],
                   uint i [[thread_position_in_grid]]) {
    if (i >= a.n) return; // the grid is rounded up to whole threadgroups
    x[i] += y[i];
}
