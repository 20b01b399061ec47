// split_q_gate.metal — the gated query projection q2 [T, nh, 2·hd] (per head: query | gate) split into q and
// gate [T, nh, hd] (backend_cpu.c's cpu_split_q_gate): copies, one thread per element of q (and of gate).
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

kernel void fm_split_q_gate(device float *q [[buffer(0)]],
                            device float *gate [[buffer(1)]],
                            device const float *q2 [[buffer(2)]],
                            constant fm_split_q_gate_args &a [[buffer(3)]],
                            uint i [[thread_position_in_grid]]) {
    if (i >= a.n) return; // the grid is rounded up to whole threadgroups
    const uint th = i / a.hd, d = i - th * a.hd; // (token, head), dimension
    device const float *src = q2 + (ulong)th * 2 * a.hd;
    q[i] = src[d];
    gate[i] = src[a.hd + d];
}
