/*
 * gated_delta.cu — the gated delta rule of Gated DeltaNet, recurrent form (cpu.h's fm_cpu_gated_delta): per
 * value head h (key head h / (Hv / Hk)) and token t, with the state S [dk, dv],
 *     S *= exp(g);  u = beta · (v − Sᵀk);  S += k ⊗ u;  out = Sᵀq
 * in that order, as the CPU computes it (expf(g), as its recurrent step).
 *
 * Every column j of S evolves on its own (u_j and out_j need only column j), so the state stays in registers
 * through all T tokens of the call, one kernel launch: a column belongs to a group of P adjacent lanes, lane
 * s of the group holding rows [16s, 16s + 16) (P the least power of two with 16·P >= dk), so a warp holds
 * 32 / P columns and a block of GD_WARPS warps 4·32 / P; grid (column blocks, Hv). A sum over dk (Sᵀk, Sᵀq)
 * is each lane's 16 rows in row order, then a butterfly over the group (the same bits in each of its lanes).
 * The next token's k, q, v, g, beta are loaded while a token is computed. No shared memory, no barrier.
 *
 * The reduction order depends on dk alone and a token's step only on the state it starts from and its own
 * inputs, so any split of a sequence into calls gives the same bits (batch invariance).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

extern "C" {
#include "../../core/util.h" /* fm_fail, with C linkage: util.h has no extern "C" of its own */
}
#include "cuda_kernels.h"

namespace {

constexpr int RT = 16;       /* state rows per lane */
constexpr int GD_WARPS = 4;  /* warps per block */
constexpr int MAX_DK = 32 * RT;

/* rows [r0, r0 + RT) of a key-head vector p (0 at dk and past). V4: float4 loads (p 16-byte aligned,
 * dk % 4 == 0); else one float at a time: the same values either way. */
template <bool V4>
__device__ __forceinline__ void load_rows(const float *__restrict__ p, int r0, int dk, float (&x)[RT]) {
#pragma unroll
    for (int i = 0; i < RT; i += 4) {
        const int r = r0 + i;
        if (V4) {
            const float4 v = r < dk ? *reinterpret_cast<const float4 *>(p + r) : make_float4(0.f, 0.f, 0.f, 0.f);
            x[i] = v.x, x[i + 1] = v.y, x[i + 2] = v.z, x[i + 3] = v.w;
        } else {
#pragma unroll
            for (int e = 0; e < 4; e++) x[i + e] = r + e < dk ? p[r + e] : 0.0f;
        }
    }
}

/* the sum of x over the P lanes of this lane's group (P a power of two <= 32), the same bits in each */
__device__ __forceinline__ float group_sum(float x, int P) {
    for (int m = 1; m < P; m <<= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
    return x;
}

/* Value head blockIdx.y, columns of column block blockIdx.x, through tokens [0, T). lp = log2 P. */
template <bool V4>
__global__ void __launch_bounds__(GD_WARPS * 32)
    gd_recurrent(float *__restrict__ out, float *__restrict__ S, const float *__restrict__ q,
                 const float *__restrict__ k, const float *__restrict__ v, const float *__restrict__ g,
                 const float *__restrict__ beta, int T, int Hk, int Hv, int dk, int dv, int lp) {
    const int P = 1 << lp, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int jw = (blockIdx.x * GD_WARPS + warp) * (32 >> lp); /* the warp's first column */
    if (jw >= dv) return; /* the whole warp: no column left (no barrier in this kernel) */
    const int h = blockIdx.y, kh = h / (Hv / Hk);
    const int j = jw + (lane >> lp), r0 = (lane & (P - 1)) * RT; /* this lane: column j, rows [r0, r0 + RT) */
    const bool col = j < dv; /* a group past dv computes zeros (its lanes still take part in the shuffles) */
    float *Sh = S + (size_t)h * dk * dv + j;

    float st[RT];
#pragma unroll
    for (int r = 0; r < RT; r++) st[r] = col && r0 + r < dk ? Sh[(size_t)(r0 + r) * dv] : 0.0f;

    const size_t ks = (size_t)Hk * dk, vs = (size_t)Hv * dv; /* from one token to the next */
    const float *kp = k + (size_t)kh * dk, *qp = q + (size_t)kh * dk, *vp = v + (size_t)h * dv + j;
    float kc[RT], qc[RT];
    load_rows<V4>(kp, r0, dk, kc);
    load_rows<V4>(qp, r0, dk, qc);
    float vc = col ? vp[0] : 0.0f, gc = g[h], bc = beta[h];
    for (int t = 0; t < T; t++) {
        /* token t + 1's inputs in flight while token t is computed (the last token loads itself again) */
        const int tn = t + 1 < T ? t + 1 : t;
        float kn[RT], qn[RT];
        load_rows<V4>(kp + tn * ks, r0, dk, kn);
        load_rows<V4>(qp + tn * ks, r0, dk, qn);
        const float vn = col ? vp[tn * vs] : 0.0f, gn = g[(size_t)tn * Hv + h], bn = beta[(size_t)tn * Hv + h];

        /* S *= exp(g); u = beta · (v − Sᵀk) */
        const float decay = expf(gc);
        float acc = 0.0f;
#pragma unroll
        for (int r = 0; r < RT; r++) {
            st[r] *= decay;
            acc = fmaf(st[r], kc[r], acc);
        }
        const float u = (vc - group_sum(acc, P)) * bc;
        /* S += k ⊗ u; out = Sᵀq */
        float o = 0.0f;
#pragma unroll
        for (int r = 0; r < RT; r++) {
            st[r] = fmaf(kc[r], u, st[r]);
            o = fmaf(st[r], qc[r], o);
        }
        o = group_sum(o, P);
        if (col && r0 == 0) out[((size_t)t * Hv + h) * dv + j] = o;

#pragma unroll
        for (int r = 0; r < RT; r++) kc[r] = kn[r], qc[r] = qn[r];
        vc = vn, gc = gn, bc = bn;
    }
    if (col)
#pragma unroll
        for (int r = 0; r < RT; r++)
            if (r0 + r < dk) Sh[(size_t)(r0 + r) * dv] = st[r];
}

bool aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

/* The recurrent form over all T tokens, one launch. */
void launch_recurrent(cudaStream_t s, float *out, float *S, const float *q, const float *k, const float *v,
                      const float *g, const float *beta, int T, int Hk, int Hv, int dk, int dv) {
    int lp = 0;
    while ((RT << lp) < dk) lp++;
    const int cols = GD_WARPS * (32 >> lp); /* columns per block */
    const dim3 grid((unsigned)((dv + cols - 1) / cols), (unsigned)Hv);
    if (dk % 4 == 0 && aligned16(q) && aligned16(k))
        gd_recurrent<true><<<grid, GD_WARPS * 32, 0, s>>>(out, S, q, k, v, g, beta, T, Hk, Hv, dk, dv, lp);
    else
        gd_recurrent<false><<<grid, GD_WARPS * 32, 0, s>>>(out, S, q, k, v, g, beta, T, Hk, Hv, dk, dv, lp);
}

} // namespace

fm_status fmc_gated_delta(cudaStream_t s, float *out, float *S, const float *q, const float *k, const float *v,
                          const float *g, const float *beta, int T, int pos0, int Hk, int Hv, int dk, int dv) {
    if (T < 0 || pos0 < 0 || Hk < 1 || Hv < 1 || Hv % Hk || Hv > 65535 || dk < 1 || dk > MAX_DK || dv < 1)
        return fm_fail(FM_ERR_INVALID,
                       "cuda backend: gated delta rule of %d tokens, %d key heads, %d value heads, dk %d, dv %d "
                       "(value heads a multiple of the key heads, at most 65535; dk 1..%d)",
                       T, Hk, Hv, dk, dv, MAX_DK);
    if (T == 0) return FM_OK;
    /* Every T takes the recurrent form. A chunked (WY) form for prefill would go here, for T past some
     * threshold: its chunks must end at multiples of FM_DELTANET_CHUNK in absolute position (pos0 + t), with
     * a 1-token chunk taking this same recurrent kernel, so that any split of a sequence into calls still
     * gives the same bits (backend.h). */
    launch_recurrent(s, out, S, q, k, v, g, beta, T, Hk, Hv, dk, dv);
    return FM_OK;
}
