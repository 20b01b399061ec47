// kv_write.metal — rows [pos0, pos0 + T) of a KV cache [ctx, row] ← src [T, row], the other rows kept
// (backend_cpu.c's cpu_kv_write): a copy, one thread per element of src.
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

kernel void fm_kv_write(device float *cache [[buffer(0)]],
                        device const float *src [[buffer(1)]],
                        constant fm_kv_write_args &a [[buffer(2)]],
                        uint i [[thread_position_in_grid]]) {
    if (i >= a.n) return;
    cache[(ulong)a.pos0 * a.row + i] = src[i]; // the cache can pass 2^32 elements: the offset in 64 bits
}
