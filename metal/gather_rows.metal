// gather_rows.metal — out[i, :] = x[idx[i], :] for i < n, rows of cols floats: the routed experts' tokens
// gathered from the layer's normed input (backend.h's experts; idx is the host's token list, copied to the
// GPU). One thread per float, a row per grid row.
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

kernel void fm_gather_rows(device float *out [[buffer(0)]],
                           device const float *x [[buffer(1)]],
                           device const int *idx [[buffer(2)]],
                           constant fm_gather_args &a [[buffer(3)]],
                           uint2 pos [[thread_position_in_grid]]) {
    if (pos.x >= a.cols || pos.y >= a.n) return; // the grid is rounded up to whole threadgroups
    out[(ulong)pos.y * a.cols + pos.x] = x[(ulong)idx[pos.y] * a.cols + pos.x];
}
