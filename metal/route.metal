// route.metal — the MoE router (backend_cpu.c's cpu_route: cpu.h's fm_cpu_topk_softmax per token):
// probabilities softmax(logits[t, 0..E)), the top k in descending order (equal logits: the lower index
// first), their weights, renormalised to sum 1 when norm; idx [T, k] (int32) and weights [T, k] out.
// One simdgroup per token (a threadgroup of one simdgroup); lane l holds logits l, l + 32, ...; any E.
//
// Indices: exactly the CPU's. They are chosen by comparing logits, never probabilities (softmax is
// monotonic), in the CPU's total order: logit descending, NaN after every number, then index ascending.
// Round j takes the best element after round j-1's winner in that order: each lane its own best, then a
// butterfly of simd_shuffle_xor keeps the better of two. Comparisons are exact and a maximum of a total
// order does not depend on the order it is taken in, so every lane, lane order and Apple's shuffle agree.
//
// Weights: the CPU sums exp(l - max) over E in double and divides in double. Metal has no double; here:
// - e_i = precise::exp(l_i - max) in fp32, l_i - max rounded to fp32 as the CPU rounds it: e_i in [0, 1],
//   within a few ulp (precise::, so whatever fast math does to exp), and e = 1 for the winner;
// - the sum in fixed point: each e_i truncated to a multiple of 2^-40 in a 64-bit integer, summed exactly
//   (integer addition, so the same bits in any order: lanes, shuffles, batch), then one rounding to fp32.
//   The truncations cost at most E·2^-40 (5e-10 at E = 512) of a sum >= 1 (the winner's e is 1): the
//   exact sum of the e_i to within one fp32 rounding (no overflow below E = 2^24);
// - w_j = e_j / sum (fp32), then, when norm, w_j / Σ_j w_j with the sum in j order from 0, as the CPU does.
// So a weight is off the exact softmax by a few fp32 roundings, relative, and the weights are <= 1: the
// winner's by the sum's rounding and the division's alone, any other's (<= 1/2) by those and exp's few ulp:
// some 1e-7 (a dozen ulp of 1/2 would still be 7e-7), under test_ops' TOL_PROB (1e-6), and far under it in
// the emulator (IEEE exp: <= 1.1e-7 over tests/test_metal_emu.py's hard router cases); renormalisation adds
// the CPU's own k-term fp32 sum. k <= FM_ROUTE_MAX_K (32): selection j is held by lane j.
//
// Non-finite logits: the CPU's contract (csrc/backend/cuda/route.cu's header says it): NaN ranks after every
// number, so the k choices are distinct indices in [0, E); e = 1 where l is the max (round 0's winner), so
// +inf maxima share the weight and all -inf gives 1/E; a NaN anywhere makes every weight of the token NaN
// (here by a flag reduced over the simdgroup: the fixed point cannot hold a NaN).
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

#define FM_ROUTE_NONE 0xFFFFFFFFu    // no element (a lane with none left)
#define FM_ROUTE_ONE 1099511627776.0f // 2^40: 1 in the fixed point of the sum

// whether (al, ai) comes before (bl, bi) in the CPU's order; NaN after every number; NONE after everything
static inline bool fm_route_before(float al, uint ai, float bl, uint bi) {
    if (ai == FM_ROUTE_NONE) return false;
    if (bi == FM_ROUTE_NONE) return true;
    if (isnan(al) || isnan(bl)) return isnan(bl) && (!isnan(al) || ai < bi);
    return al > bl || (al == bl && ai < bi);
}

static inline float fm_route_e(float l, float mx) { return l == mx ? 1.0f : precise::exp(l - mx); }

kernel void fm_route(device const float *logits [[buffer(0)]],
                     device int *idx [[buffer(1)]],
                     device float *weights [[buffer(2)]],
                     constant fm_route_args &a [[buffer(3)]],
                     uint t [[threadgroup_position_in_grid]],
                     uint lane [[thread_index_in_simdgroup]]) {
    device const float *lt = logits + (ulong)t * a.E;
    // top k: round j picks the best element after (pl, pi), the previous winner
    float pl = 0.0f, my_l = 0.0f;
    uint pi = FM_ROUTE_NONE, my_i = FM_ROUTE_NONE;
    for (uint j = 0; j < a.k; j++) {
        float bl = 0.0f;
        uint bi = FM_ROUTE_NONE;
        for (uint i = lane; i < a.E; i += FM_METAL_SIMD) {
            const float l = lt[i];
            const bool after = pi == FM_ROUTE_NONE || fm_route_before(pl, pi, l, i);
            if (after && fm_route_before(l, i, bl, bi)) bl = l, bi = i;
        }
        for (ushort m = FM_METAL_SIMD / 2; m > 0; m >>= 1) {
            const float ol = simd_shuffle_xor(bl, m);
            const uint oi = simd_shuffle_xor(bi, m);
            if (fm_route_before(ol, oi, bl, bi)) bl = ol, bi = oi;
        }
        if (bi == FM_ROUTE_NONE) break; // k > E: the rest stay NONE (the host rejects k > E)
        if (lane == j) my_l = bl, my_i = bi;
        pl = bl, pi = bi;
    }
    // the max logit is the first winner's; round 0 found one unless E = 0 or k = 0
    const float mx = simd_shuffle(my_l, 0);
    ulong s = 0;
    uint has_nan = 0; // a NaN logit: the sum is NaN
    for (uint i = lane; i < a.E; i += FM_METAL_SIMD) {
        const float l = lt[i];
        if (isnan(l)) has_nan = 1;
        else s += ulong(fm_route_e(l, mx) * FM_ROUTE_ONE);
    }
    for (ushort m = FM_METAL_SIMD / 2; m > 0; m >>= 1) {
        s += as_type<ulong>(simd_shuffle_xor(as_type<uint2>(s), m));
        has_nan |= simd_shuffle_xor(has_nan, m);
    }
    const float sum = has_nan ? NAN : float(s) * (1.0f / FM_ROUTE_ONE); // a power of two: exact
    const float w = my_i != FM_ROUTE_NONE ? fm_route_e(my_l, mx) / sum : 0.0f;
    float wsum = 0.0f;
    for (uint j = 0; j < a.k; j++) wsum += simd_shuffle(w, ushort(j));
    if (lane < a.k) {
        idx[(ulong)t * a.k + lane] = my_i == FM_ROUTE_NONE ? -1 : int(my_i);
        weights[(ulong)t * a.k + lane] = a.norm ? w / wsum : w;
    }
}
