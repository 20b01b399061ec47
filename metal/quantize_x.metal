// quantize_x.metal — the int8 activations of csrc/backend/cpu/cpu.h, for the q4/q8 kernels on int8
// activations (qmv_i8.metal): per group g of group_size values of a token's x,
//     m = max|x_g|, xq = rint(x · (127 / m)), xd_g = m / 127, xqs_g = Σ xq   (all 0 when m = 0),
// in fp32 exactly as the CPU rounds (ops.c's quantize_x, the AVX2 quantizer and tests/test_ops.py's
// quantize_x_ref agree): the max is exact in any order, 127 / m and m / 127 are correctly rounded divisions
// (precise::divide: Metal's fast math would otherwise take an approximate reciprocal and flip roundings),
// x · inv one correctly rounded product, rint rounds half to even as rintf does, and Σ xq is an integer sum.
// One thread per group (group_size a multiple of 32 up to 256), FM_QX_THREADS groups per threadgroup, a
// token per grid row: a small kernel next to the matmul it feeds, whose order is then simply the CPU's.
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

kernel void fm_quantize_x(device const float *x [[buffer(0)]],
                          device char *xq [[buffer(1)]],
                          device float *xd [[buffer(2)]],
                          device float *xqs [[buffer(3)]],
                          constant fm_quantize_x_args &a [[buffer(4)]],
                          uint2 pos [[thread_position_in_grid]]) {
    const uint groups = a.cols / a.group_size, g = pos.x, t = pos.y;
    if (g >= groups) return; // the grid is rounded up to whole threadgroups
    device const float *xg = x + (ulong)t * a.cols + (ulong)g * a.group_size;
    device char *qg = xq + (ulong)t * a.cols + (ulong)g * a.group_size;
    float m = 0.0f;
    for (uint i = 0; i < a.group_size; i++) m = max(m, fabs(xg[i]));
    const float inv = m > 0.0f ? precise::divide(127.0f, m) : 0.0f;
    int sum = 0;
    for (uint i = 0; i < a.group_size; i++) {
        const int v = int(rint(xg[i] * inv)); // |v| <= 127: |x·inv| <= 127 up to one rounding
        qg[i] = char(v);
        sum += v;
    }
    xd[(ulong)t * groups + g] = precise::divide(m, 127.0f);
    xqs[(ulong)t * groups + g] = float(sum);
}
