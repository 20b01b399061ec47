// Broken on purpose (test_metal_emu.py): a threadgroup pointer handed to a helper that takes a device
// pointer. Valid C++ once the address spaces are gone; the address-space pass must reject it.
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

static float first(device const float *p) { return p[0]; }

kernel void fm_add(device float *x [[buffer(0)]],
                   device const float *y [[buffer(1)]],
                   constant fm_add_args &a [[buffer(2)]],
                   threadgroup float *scratch [[threadgroup(0)]],
                   uint i [[thread_position_in_grid]]) {
    if (i >= a.n) return;
    x[i] += y[i] + first(scratch);
}
