// Broken on purpose, kept as a test of the emulator (tests/test_metal_emu.py): metal/add.metal without its bounds
// check: the lanes of the last threadgroup past n read and write out of bounds.
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

kernel void fm_add(device float *x [[buffer(0)]],
                   device const float *y [[buffer(1)]],
                   constant fm_add_args &a [[buffer(2)]],
                   uint i [[thread_position_in_grid]]) {
    x[i] += y[i];
}
