// Broken on purpose (tests/test_metal_emu.py): valid Metal, but a kernel-scope threadgroup array would be
// private to each lane in the emulator; the launcher generator and the address-space pass refuse it.
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

kernel void fm_add(device float *x [[buffer(0)]],
                   device const float *y [[buffer(1)]],
                   constant fm_add_args &a [[buffer(2)]],
                   uint i [[thread_position_in_grid]],
                   uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float staged[FM_ADD_THREADS];
    staged[tid] = i < a.n ? y[i] : 0.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (i < a.n) x[i] += staged[tid];
}
