// rope.metal — NeoX rotate-half RoPE on dims [0, rot_dim) of each head of x[T, heads, head_dim], in place,
// position pos0 + t (cpu.h's fm_cpu_rope). One thread per rotated pair (i, i + rot_dim/2) of one head of
// one token. inv_freq = 1 / theta^(2i / rot_dim) in fp32 as the CPU (and HF) compute it; the angle is an
// fp32 product here (the CPU's is in double), its error ~ angle · 2^-24, and cos / sin are precise::.
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

kernel void fm_rope(device float *x [[buffer(0)]],
                    constant fm_rope_args &a [[buffer(1)]],
                    uint3 gid [[thread_position_in_grid]]) {
    const uint hr = a.rot_dim / 2, i = gid.x, h = gid.y, t = gid.z;
    if (i >= hr) return; // the grid is rounded up to whole threadgroups
    const float inv_freq = 1.0f / precise::pow(a.theta, float(2 * i) / float(a.rot_dim));
    const float ang = float(a.pos0 + int(t)) * inv_freq;
    const float c = precise::cos(ang), s = precise::sin(ang);
    device float *xh = x + ((ulong)t * a.heads + h) * a.head_dim;
    const float x1 = xh[i], x2 = xh[i + hr];
    xh[i] = x1 * c - x2 * s;
    xh[i + hr] = x2 * c + x1 * s;
}
