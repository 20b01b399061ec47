// attention.metal — causal attention of T queries over the KV cache (cpu.h's fm_cpu_attention): for query
// t (position pos0 + t) and head h, out = Σ_j softmax_j(scale · q·k_j) v_j over cache positions
// j <= pos0 + t of KV head h / (nh / nkv). As the CPU: fp32 scores (the dot, then × scale), the softmax
// online with the running max subtracted, exp clamped as fm_exp (0 below -87), one division at the end.
//
// A query's keys are taken in chunks of FM_ATTN_CHUNK positions counted from 0. A chunk is reduced by one
// threadgroup of FM_ATTN_SIMDGROUPS simdgroups (fm_attn_chunk): simdgroup s takes keys s,
// s + FM_ATTN_SIMDGROUPS, ... with its own online softmax (lanes split the head dims: lane l holds dims
// l, l + 32, ...; simd_sum makes a score); the simdgroups' partials (max, sum, values) meet in threadgroup
// memory and are merged in simdgroup order. The chunks' partials are then merged in chunk order
// (fm_attn_merge). Two ways to run that, with the same bits:
//   fm_attention        one threadgroup per (head, token) walks the chunks and merges as it goes;
//   fm_attention_split  one threadgroup per (head, chunk, token) writes its chunk's partial to a buffer,
//   + fm_attention_merge  and one threadgroup per (head, token) merges them: flash-decoding, for a few
//                       queries over a long context (fm_metal_grid.h's fm_metal_attention_split decides).
// Either way a query's reduction order is fixed by its position alone, never by T or pos0: the same bits
// for a token decoded alone or inside a prefill (batch invariance). Both ways run the same inline
// functions, and the merges are written with explicit fma, leaving the compiler no contraction to choose
// differently in the two (that Apple's fast-math compiler keeps them equal is not checked here: the
// emulator compiles them as IEEE C++).
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

// exp(x) for x <= 0 as the CPU's fm_exp: 0 below -87
static inline float fm_attn_exp(float x) { return x < -87.0f ? 0.0f : exp(x); }

// "no max yet": the CPU's -inf, but finite, as fast math assumes no infinities; minus any real score
// it stays finite (|score| < 1e31) and below -87, so it weighs 0 as exp(-inf) would
#define FM_ATTN_NO_MAX (-3.40282347e38f)

// One chunk [c0, c1) (c0 < c1) of query row qr's keys: its partial, the max M and sum L in every thread,
// the value sum of output dim tid in O (0 where tid >= hd). Ends at a barrier: part is free again.
static inline void fm_attn_chunk(device const float *qr, device const float *kb, device const float *vb,
                                 ulong stride, uint hd, float scale, uint c0, uint c1,
                                 threadgroup float *part, uint tid, uint sg, uint lane,
                                 thread float &M, thread float &L, thread float &O) {
    constexpr uint SG = FM_ATTN_SIMDGROUPS, D = FM_ATTN_MAX_HD / FM_METAL_SIMD;
    float qv[D], o[D];
    for (uint i = 0; i < D; i++) {
        const uint d = lane + FM_METAL_SIMD * i;
        qv[i] = d < hd ? qr[d] : 0.0f;
        o[i] = 0.0f;
    }
    float m = FM_ATTN_NO_MAX, l = 0.0f;
    for (uint j = c0 + sg; j < c1; j += SG) { // the same trip count for every lane of the simdgroup
        device const float *kr = kb + j * stride, *vr = vb + j * stride;
        float s = 0.0f;
        for (uint i = 0; i < D; i++) {
            const uint d = lane + FM_METAL_SIMD * i;
            if (d < hd) s += qv[i] * kr[d];
        }
        s = simd_sum(s) * scale;
        if (s > m) { // rescale what was summed under the old max
            const float c = fm_attn_exp(m - s);
            l *= c;
            for (uint i = 0; i < D; i++) o[i] *= c;
            m = s;
        }
        const float p = fm_attn_exp(s - m);
        l += p;
        for (uint i = 0; i < D; i++) {
            const uint d = lane + FM_METAL_SIMD * i;
            if (d < hd) o[i] += p * vr[d];
        }
    }
    // a simdgroup's partial: max pm[s], sum pl[s], values po[s·hd + d]
    threadgroup float *pm = part, *pl = part + SG, *po = part + 2 * SG;
    if (lane == 0) {
        pm[sg] = m;
        pl[sg] = l;
    }
    for (uint i = 0; i < D; i++) {
        const uint d = lane + FM_METAL_SIMD * i;
        if (d < hd) po[sg * hd + d] = o[i];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup); // every simdgroup's partial is written
    // merged in simdgroup order: simdgroup 0 always has key c0, so M is a score; one without keys has max
    // FM_ATTN_NO_MAX and weighs 0
    M = pm[0];
    for (uint s = 1; s < SG; s++) M = max(M, pm[s]);
    L = 0.0f;
    O = 0.0f;
    for (uint s = 0; s < SG; s++) {
        const float e = fm_attn_exp(pm[s] - M);
        L = fma(pl[s], e, L);
        if (tid < hd) O = fma(po[s * hd + tid], e, O);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup); // read before anyone writes part again
}

// A chunk's partial (M, L, O) merged into the running (RM, RL, RO), in chunk order; before the first
// chunk RM = FM_ATTN_NO_MAX, RL = RO = 0, which weigh 0.
static inline void fm_attn_merge(thread float &RM, thread float &RL, thread float &RO, float M, float L, float O) {
    const float M2 = max(RM, M), er = fm_attn_exp(RM - M2), ec = fm_attn_exp(M - M2);
    RL = fma(RL, er, L * ec);
    RO = fma(RO, er, O * ec);
    RM = M2;
}

kernel void fm_attention(device float *out [[buffer(0)]],
                         device const float *q [[buffer(1)]],
                         device const float *k_cache [[buffer(2)]],
                         device const float *v_cache [[buffer(3)]],
                         constant fm_attention_args &a [[buffer(4)]],
                         threadgroup float *part [[threadgroup(0)]],
                         uint2 tg [[threadgroup_position_in_grid]],
                         uint tid [[thread_index_in_threadgroup]],
                         uint sg [[simdgroup_index_in_threadgroup]],
                         uint lane [[thread_index_in_simdgroup]]) {
    const uint h = tg.x, t = tg.y, hd = a.hd, kvh = h / (a.nh / a.nkv);
    const uint n = uint(a.pos0) + t + 1; // keys of this query: positions [0, n)
    const ulong stride = (ulong)a.nkv * hd; // from one position's row of a KV head to the next
    device const float *qr = q + ((ulong)t * a.nh + h) * hd;
    float RM = FM_ATTN_NO_MAX, RL = 0.0f, RO = 0.0f; // the running result; output dim tid
    for (uint c0 = 0; c0 < n; c0 += FM_ATTN_CHUNK) {
        float M, L, O;
        fm_attn_chunk(qr, k_cache + (ulong)kvh * hd, v_cache + (ulong)kvh * hd, stride, hd, a.scale, c0,
                      min(c0 + (uint)FM_ATTN_CHUNK, n), part, tid, sg, lane, M, L, O);
        fm_attn_merge(RM, RL, RO, M, L, O);
    }
    if (tid < hd) out[((ulong)t * a.nh + h) * hd + tid] = RO / RL;
}

// Flash-decoding, pass 1: chunk tg.y of query tg.z's keys; its partial to partial[t, h, chunk] as
// (M, L, O[hd]) (fm_metal_attention_partial_floats). Chunks past the query's keys do nothing.
kernel void fm_attention_split(device float *partial [[buffer(0)]],
                               device const float *q [[buffer(1)]],
                               device const float *k_cache [[buffer(2)]],
                               device const float *v_cache [[buffer(3)]],
                               constant fm_attention_args &a [[buffer(4)]],
                               threadgroup float *part [[threadgroup(0)]],
                               uint3 tg [[threadgroup_position_in_grid]],
                               uint tid [[thread_index_in_threadgroup]],
                               uint sg [[simdgroup_index_in_threadgroup]],
                               uint lane [[thread_index_in_simdgroup]]) {
    const uint h = tg.x, c = tg.y, t = tg.z, hd = a.hd, kvh = h / (a.nh / a.nkv);
    const uint n = uint(a.pos0) + t + 1, c0 = c * FM_ATTN_CHUNK;
    if (c0 >= n) return; // the whole threadgroup: this query has fewer chunks
    float M, L, O;
    fm_attn_chunk(q + ((ulong)t * a.nh + h) * hd, k_cache + (ulong)kvh * hd, v_cache + (ulong)kvh * hd,
                  (ulong)a.nkv * hd, hd, a.scale, c0, min(c0 + (uint)FM_ATTN_CHUNK, n), part, tid, sg, lane, M, L, O);
    device float *p = partial + (((ulong)t * a.nh + h) * a.chunks + c) * (2 + hd);
    if (tid == 0) {
        p[0] = M;
        p[1] = L;
    }
    if (tid < hd) p[2 + tid] = O;
}

// Flash-decoding, pass 2: query tg.y, head tg.x: its chunks' partials merged in chunk order, as
// fm_attention merges them.
kernel void fm_attention_merge(device float *out [[buffer(0)]],
                               device const float *partial [[buffer(1)]],
                               constant fm_attention_args &a [[buffer(2)]],
                               uint2 tg [[threadgroup_position_in_grid]],
                               uint tid [[thread_index_in_threadgroup]]) {
    const uint h = tg.x, t = tg.y, hd = a.hd, n = uint(a.pos0) + t + 1;
    device const float *p = partial + ((ulong)t * a.nh + h) * a.chunks * (2 + hd);
    float RM = FM_ATTN_NO_MAX, RL = 0.0f, RO = 0.0f;
    for (uint c0 = 0; c0 < n; c0 += FM_ATTN_CHUNK, p += 2 + hd)
        fm_attn_merge(RM, RL, RO, p[0], p[1], tid < hd ? p[2 + tid] : 0.0f);
    if (tid < hd) out[((ulong)t * a.nh + h) * hd + tid] = RO / RL;
}
