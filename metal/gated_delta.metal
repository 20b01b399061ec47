// gated_delta.metal — the gated delta rule of Gated DeltaNet, recurrent form (cpu.h's fm_cpu_gated_delta):
// per value head h (key head h / (Hv / Hk)) and token t, with the state S [dk, dv],
//     S *= exp(g);  u = beta · (v − Sᵀk);  S += k ⊗ u;  out = Sᵀq
// in that order, as the CPU computes it (exp(g) as 0 below -87, as fm_exp).
//
// Every column j of S evolves on its own (u_j and out_j need only column j), so a simdgroup owns
// FM_GDN_COLS columns as a float4 per state row and keeps them in registers through all T tokens: lane l
// holds rows l, l + 32, ... (dk <= FM_GDN_MAX_DK), and the sums over dk (Sᵀk, Sᵀq) are a simd_sum of the
// lanes' float4 partials. No threadgroup memory, no barrier. One token after another: a token's bits
// depend only on the state it starts from, so any split of the tokens into calls gives the same bits.
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

kernel void fm_gated_delta(device float *out [[buffer(0)]],
                           device float *S [[buffer(1)]],
                           device const float *q [[buffer(2)]],
                           device const float *k [[buffer(3)]],
                           device const float *v [[buffer(4)]],
                           device const float *g [[buffer(5)]],
                           device const float *beta [[buffer(6)]],
                           constant fm_gated_delta_args &a [[buffer(7)]],
                           uint2 tg [[threadgroup_position_in_grid]],
                           uint sg [[simdgroup_index_in_threadgroup]],
                           uint lane [[thread_index_in_simdgroup]]) {
    constexpr uint R = FM_GDN_MAX_DK / FM_METAL_SIMD, C = FM_GDN_COLS;
    const uint h = tg.y, kh = h / (a.Hv / a.Hk), dk = a.dk, dv = a.dv;
    const uint j0 = (tg.x * FM_GDN_SIMDGROUPS + sg) * C;
    if (j0 >= dv) return; // a whole simdgroup past the last column (no barrier in this kernel)
    const uint nc = min(C, dv - j0); // columns of this simdgroup that exist
    device float *Sh = S + (ulong)h * dk * dv + j0;

    float4 s[R];
    for (uint r = 0; r < R; r++) {
        const uint i = lane + FM_METAL_SIMD * r;
        s[r] = float4(0.0f);
        if (i < dk)
            for (uint c = 0; c < nc; c++) s[r][c] = Sh[(ulong)i * dv + c];
    }
    for (uint t = 0; t < a.T; t++) {
        device const float *kt = k + ((ulong)t * a.Hk + kh) * dk, *qt = q + ((ulong)t * a.Hk + kh) * dk;
        device const float *vt = v + ((ulong)t * a.Hv + h) * dv + j0;
        const float gt = g[(ulong)t * a.Hv + h], b = beta[(ulong)t * a.Hv + h];
        const float decay = gt < -87.0f ? 0.0f : exp(gt);
        float kr[R], qr[R];
        // S *= exp(g); Sᵀk
        float4 acc = float4(0.0f);
        for (uint r = 0; r < R; r++) {
            const uint i = lane + FM_METAL_SIMD * r;
            kr[r] = i < dk ? kt[i] : 0.0f;
            qr[r] = i < dk ? qt[i] : 0.0f;
            s[r] *= decay;
            acc += s[r] * kr[r];
        }
        acc = simd_sum(acc);
        float4 vv = float4(0.0f);
        for (uint c = 0; c < nc; c++) vv[c] = vt[c];
        const float4 u = (vv - acc) * b;
        // S += k ⊗ u; out = Sᵀq
        float4 o = float4(0.0f);
        for (uint r = 0; r < R; r++) {
            s[r] += kr[r] * u;
            o += s[r] * qr[r];
        }
        o = simd_sum(o);
        if (lane < nc) out[((ulong)t * a.Hv + h) * dv + j0 + lane] = o[lane];
    }
    for (uint r = 0; r < R; r++) {
        const uint i = lane + FM_METAL_SIMD * r;
        if (i < dk)
            for (uint c = 0; c < nc; c++) Sh[(ulong)i * dv + c] = s[r][c];
    }
}
