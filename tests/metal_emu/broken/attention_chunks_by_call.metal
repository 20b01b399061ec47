// Broken on purpose, kept as a test of the batch-invariance test (tests/test_metal_emu.py): metal/attention.metal's
// one-pass kernel with its chunks sized by the call (half of the call's longest context) instead of fixed
// FM_ATTN_CHUNK positions, so a query's reduction order depends on T and pos0: still close to the
// reference, but a token's bits alone differ from its bits inside a bigger call.
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
    const uint chunk = (uint(a.pos0) + a.T + 1) / 2; // THE BUG: the call's keys halved, not fixed chunks
    for (uint c0 = 0; c0 < n; c0 += chunk) {
        float M, L, O;
        fm_attn_chunk(qr, k_cache + (ulong)kvh * hd, v_cache + (ulong)kvh * hd, stride, hd, a.scale, c0,
                      min(c0 + chunk, n), part, tid, sg, lane, M, L, O);
        fm_attn_merge(RM, RL, RO, M, L, O);
    }
    if (tid < hd) out[((ulong)t * a.nh + h) * hd + tid] = RO / RL;
}

