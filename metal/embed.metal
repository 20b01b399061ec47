// embed.metal — out[t] = row ids[t] of W, dequantized (backend_cpu.c's cpu_embed: cpu.h's fm_cpu_get_row per
// token), one thread per output element, a token per grid row. A variant per weight dtype, so that each
// binds only the buffers it reads: f32 (a copy), bf16 (the top 16 bits of a float32: exact), q8 and q4
// (w = scale·q + bias per group_size elements, scales and biases fp16 or, scale_bf16, bfloat16; q4: byte j
// of a row holds elements 2j (low nibble) and 2j+1).
// Bit for bit the CPU's: scale·q is exact in fp32 (an 11-bit (fp16) or 8-bit (bf16) significand times
// q < 256), so the one rounding is that of + bias, with or without fast math's contraction into an fma.
// The ids are the host's, copied into a device buffer. An id outside [0, rows) writes NaN rather than read
// outside W (the CPU reads there): the host is to reject it first.
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

// a stored scale or bias: fp16, or bfloat16 (the top 16 bits of a float32, exact in fp32)
static inline float fm_scale_value(ushort bits, uint bf16) {
    return bf16 ? as_type<float>(uint(bits) << 16) : float(as_type<half>(bits));
}

// the row of token t, or -1 where its id is out of range
static inline long fm_embed_row(device const int *ids, constant fm_embed_args &a, uint t) {
    const int id = ids[t];
    return id >= 0 && uint(id) < a.rows ? long(id) : -1;
}

// a quiet NaN, stored as its bits: fast math may assume a float value is never NaN
static inline void fm_store_nan(device float *p) { *(device uint *)p = 0x7fc00000u; }

kernel void fm_embed_f32(device float *out [[buffer(0)]],
                         device const int *ids [[buffer(1)]],
                         constant fm_embed_args &a [[buffer(2)]],
                         device const float *w [[buffer(3)]],
                         uint2 gid [[thread_position_in_grid]]) {
    const uint i = gid.x, t = gid.y;
    if (i >= a.cols) return; // the grid is rounded up to whole threadgroups
    const long r = fm_embed_row(ids, a, t);
    if (r < 0) { fm_store_nan(out + (ulong)t * a.cols + i); return; }
    out[(ulong)t * a.cols + i] = w[(ulong)r * a.cols + i];
}

kernel void fm_embed_bf16(device float *out [[buffer(0)]],
                          device const int *ids [[buffer(1)]],
                          constant fm_embed_args &a [[buffer(2)]],
                          device const ushort *w [[buffer(3)]],
                          uint2 gid [[thread_position_in_grid]]) {
    const uint i = gid.x, t = gid.y;
    if (i >= a.cols) return;
    const long r = fm_embed_row(ids, a, t);
    if (r < 0) { fm_store_nan(out + (ulong)t * a.cols + i); return; }
    out[(ulong)t * a.cols + i] = as_type<float>(uint(w[(ulong)r * a.cols + i]) << 16);
}

// q8 and q4: the level of element i of row r, then scale·q + bias of its group
kernel void fm_embed_q8(device float *out [[buffer(0)]],
                        device const int *ids [[buffer(1)]],
                        constant fm_embed_args &a [[buffer(2)]],
                        device const uchar *wq [[buffer(3)]],
                        device const ushort *scales [[buffer(4)]],
                        device const ushort *biases [[buffer(5)]],
                        uint2 gid [[thread_position_in_grid]]) {
    const uint i = gid.x, t = gid.y;
    if (i >= a.cols) return;
    const long r = fm_embed_row(ids, a, t);
    if (r < 0) { fm_store_nan(out + (ulong)t * a.cols + i); return; }
    const ulong sb = (ulong)r * (a.cols / a.group_size) + i / a.group_size;
    const float q = float(wq[(ulong)r * a.cols + i]);
    const float s = fm_scale_value(scales[sb], a.scale_bf16), b = fm_scale_value(biases[sb], a.scale_bf16);
    out[(ulong)t * a.cols + i] = s * q + b;
}

kernel void fm_embed_q4(device float *out [[buffer(0)]],
                        device const int *ids [[buffer(1)]],
                        constant fm_embed_args &a [[buffer(2)]],
                        device const uchar *wq [[buffer(3)]],
                        device const ushort *scales [[buffer(4)]],
                        device const ushort *biases [[buffer(5)]],
                        uint2 gid [[thread_position_in_grid]]) {
    const uint i = gid.x, t = gid.y;
    if (i >= a.cols) return;
    const long r = fm_embed_row(ids, a, t);
    if (r < 0) { fm_store_nan(out + (ulong)t * a.cols + i); return; }
    const ulong sb = (ulong)r * (a.cols / a.group_size) + i / a.group_size;
    const uchar byte = wq[(ulong)r * (a.cols / 2) + i / 2];
    const float q = float((byte >> ((i & 1) * 4)) & 15);
    const float s = fm_scale_value(scales[sb], a.scale_bf16), b = fm_scale_value(biases[sb], a.scale_bf16);
    out[(ulong)t * a.cols + i] = s * q + b;
}
