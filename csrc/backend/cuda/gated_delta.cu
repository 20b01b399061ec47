/*
 * gated_delta.cu — the gated delta rule of Gated DeltaNet, in the CPU's two forms (cpu/gated_delta.c): per
 * value head h (key head h / (Hv / Hk)) and token t, with the state S [dk, dv],
 *     S *= exp(g);  u = beta · (v − Sᵀk);  S += k ⊗ u;  out = Sᵀq
 * recurrent (one token after another: decode, and a 1-token chunk) or chunked (prefill).
 *
 * Chunks. As on the CPU, a call's tokens are cut into chunks that end at multiples of CH = FM_DELTANET_CHUNK
 * (16) in absolute position (pos0 + t), so however the core splits a prompt into calls at multiples of 16 the
 * chunks are the same; a chunk of n >= 2 tokens takes the chunked form, a 1-token chunk (only the first or the
 * last of a call can be one) the recurrent kernel, the one a decode step takes, so the two give the same bits.
 * Every step depends only on the state it starts from and its chunk's (or token's) own inputs, in orders fixed
 * by dk, dv and the chunk's length n alone (never by T, the grid or the slice), so any split of a sequence
 * into calls at multiples of 16 gives the same bits (batch invariance, backend.h). dk above CHUNK_MAX_DK (256)
 * takes the recurrent form for every token (a property of the model, not of the call).
 *
 * gd_recurrent, the recurrent form: every column j of S evolves on its own (u_j and out_j need only column
 * j), so the state stays in registers through all T tokens of the launch: a column belongs to a group of P
 * adjacent lanes, lane s of the group holding rows [16s, 16s + 16) (P the least power of two with 16·P >= dk),
 * so a warp holds 32 / P columns and a block of GD_WARPS warps 4·32 / P; grid (column blocks, Hv). A sum over
 * dk (Sᵀk, Sᵀq) is each lane's 16 rows in row order, then a butterfly over the group (the same bits in each of
 * its lanes). The next token's k, q, v, g, beta are loaded while a token is computed. No shared memory, no
 * barrier. expf(g), as the CPU's recurrent step.
 *
 * The chunked form (the WY / UT transform; cpu/gated_delta.c derives it). Per value head, a chunk of n tokens
 * from the state S0, with γ_i = g_0 + … + g_i (cumulative log-decay, in double, each g clamped at G_FLOOR):
 *     A_ij = β_i e^{γ_i−γ_j} k_i·k_j (j < i),  T = (I + A)⁻¹,  M_ij = e^{γ_i−γ_j} q_i·k_j (j <= i)
 *     R_i  = β_i (v_i − e^{γ_i} S0ᵀk_i),  U = T R,  o_i = e^{γ_i} S0ᵀq_i + Σ_{m<=i} M_im u_m
 *     S    = e^{γ_{n−1}} S0 + Σ_i k_i (e^{γ_{n−1}−γ_i} u_i)ᵀ
 * Two kernels per slice of chunks (a long call runs in slices that reuse the scratch, which bounds it at
 * MAX_SCRATCH_FLOATS without changing a bit):
 *   gd_chunk_prep  one block of CH·CH = 256 threads per (chunk, key head), all in parallel (no state): the
 *                  chunk's K and Q [n, dk] staged in shared memory, thread (i, j) (i = tid / 16, j = tid % 16)
 *                  computes k_i·k_j and q_i·k_j (j <= i) as one fmaf chain over d = 0 .. dk − 1; then per
 *                  value head of the key head: threads i < n sum γ_i (m = 0 .. i, in double: the bits of the
 *                  running sum), thread (i, j) makes A_ij = (β_i·e^{γ_i−γ_j})·k_i·k_j and M_ij, and 16 lanes
 *                  invert I + A by forward substitution, lane j holding column j of T in registers (T_ij = δ_ij
 *                  − Σ_{m=j}^{i−1} A_im T_mj, an fmaf chain in m order). Out: a record of REC floats per
 *                  (value head, chunk) in scratch: T, M [16 × 16], e^{γ_i}, e^{γ_{n−1}−γ_i}, β_i [16] (zero
 *                  past n).
 *   gd_chunked     the serial walk: grid (column blocks, Hv) and lanes as gd_recurrent (template P), the
 *                  chunks of the slice in order. Each thread holds in registers its 16 rows of its column of S
 *                  (st), a chunk's S0ᵀk_i, S0ᵀq_i and u_i (16 each) and the next chunk's inputs in flight: its
 *                  share of the K and Q rows [16, 16P], of the block's V columns [16, 128 / P] and of the
 *                  record (2·2P + 16/P + 5 floats: 39 at P = 8). Per chunk the block stores those in shared
 *                  memory (K and Q with a lane's 16 rows every SEG = 20 floats, so the float4 reads of a
 *                  group's lanes fall in different banks; barrier), issues the next chunk's loads, and then
 *                  each lane makes its partials of S0ᵀk_i and S0ᵀq_i for i < n (its 16 rows in order, fmaf)
 *                  and butterflies them over the group: 2n independent sums a chunk where the recurrent form
 *                  makes 2 dependent ones a token. Then, the same bits in every lane of the group: r_i =
 *                  β_i·fmaf(−e^{γ_i}, S0ᵀk_i, v_i), u_i = Σ_{m<=i} T_im r_m (fmaf, m ascending from 0); out_i =
 *                  e^{γ_i}·S0ᵀq_i + Σ_{m<=i} M_im u_m (fmaf, m ascending; by lane i mod P of the group, which
 *                  stores it); and each lane's own rows S[d] = e^{γ_{n−1}}·S[d] + Σ_{i<n} k_i[d]·(u_i·
 *                  e^{γ_{n−1}−γ_i}) (fmaf, i ascending). A barrier before the next chunk's store. The orders
 *                  are the CPU's but for the dk-term sums (its sums run d = 0 .. dk − 1 in one chain).
 * Shared memory: gd_chunk_prep 33 KiB; gd_chunked 2·16·20P·4 + 16·(128 / P)·4 + REC·4 bytes (P = 8, dk 128:
 * 23 KiB; P = 16: 43 KiB). Scratch: Hv · chunks · REC floats (2304 bytes per value head and chunk: 9 MiB for
 * a 2048-token call at 32 value heads), in the table's one-op buffer beside attention's partials. fp32
 * throughout but γ, no tensor cores, no contraction left to the compiler (every multiply-add is an fmaf);
 * the results are those of the CPU's chunked form up to rounding (tests/test_ops.py's tolerance covers both).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "../../core/util.h" /* fm_fail, with C linkage: util.h has no extern "C" of its own */
#include "../backend.h"      /* FM_DELTANET_CHUNK */
}
#include "cuda_kernels.h"
#include "launch.cuh"

namespace {

constexpr int RT = 16;       /* state rows per lane */
constexpr int GD_WARPS = 4;  /* warps per block */
constexpr int GD_THREADS = GD_WARPS * 32;
constexpr int MAX_DK = 32 * RT;

constexpr int CH = 16;                 /* tokens per chunk: FM_DELTANET_CHUNK */
static_assert(CH == FM_DELTANET_CHUNK, "the chunks end where backend.h says");
constexpr int CHUNK_MAX_DK = 256;      /* the chunked form's dk (above: the recurrent form for every token) */
constexpr int SEG = RT + 4;            /* a lane's 16 rows of a K or Q row in shared memory, padded */
constexpr int REC = 576;               /* floats of a (value head, chunk) record: */
constexpr int R_T = 0, R_M = CH * CH, R_EG = 2 * CH * CH, R_EL = R_EG + CH, R_B = R_EL + CH; /* + 16 unused */
static_assert(R_B + 2 * CH == REC && REC % 4 == 0, "record layout");
constexpr size_t MAX_SCRATCH_FLOATS = (size_t)16 << 20; /* records of a slice (64 MiB) past one chunk's */
constexpr double G_FLOOR = -256.0; /* as the CPU: exp() of anything this low is 0 in fp32; no inf − inf */

/* rows [r0, r0 + RT) of a key-head vector p (0 at dk and past). V4: float4 loads (p 16-byte aligned,
 * dk % 4 == 0); else one float at a time: the same values either way. */
template <bool V4>
__device__ __forceinline__ void load_rows(const float *p, int r0, int dk, float (&x)[RT]) {
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
__global__ void __launch_bounds__(GD_THREADS)
    gd_recurrent(float *out, float *S, const float *q, const float *k, const float *v, const float *g,
                 const float *beta, int T, int Hk, int Hv, int dk, int dv, int lp) {
    fmc_pdl_wait(), fmc_pdl_trigger();
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

/* ---------------------------------------------------------------- the chunked form */

/* Chunk c of a slice of ts tokens whose first chunk has n0 tokens (the others CH, the last maybe fewer):
 * its first token and its length. */
__device__ __forceinline__ int chunk_start(int c, int n0) { return c ? n0 + CH * (c - 1) : 0; }
__device__ __forceinline__ int chunk_len(int c, int n0, int ts) {
    const int s = chunk_start(c, n0), e = s + (c ? CH : n0);
    return (e < ts ? e : ts) - s;
}

/* Chunk blockIdx.x of the slice, key head blockIdx.y: the records of the key head's value heads (rec + (h ·
 * nch + c) · REC). q, k, g, beta from the slice's first token. */
__global__ void __launch_bounds__(CH * CH)
    gd_chunk_prep(float *rec, const float *q, const float *k, const float *g, const float *beta, int ts, int n0,
                  int nch, int Hk, int Hv, int dk) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    __shared__ float K1[CH][CHUNK_MAX_DK + 1], Q1[CH][CHUNK_MAX_DK + 1]; /* +1: rows j of a warp in other banks */
    __shared__ float A1[CH][CH + 1];
    __shared__ double gam[CH];
    const int c = blockIdx.x, kh = blockIdx.y, tid = threadIdx.x, i = tid / CH, j = tid % CH;
    const int sc = chunk_start(c, n0), n = chunk_len(c, n0, ts);
    for (int r = 0; r < CH; r++)
        for (int d = tid; d < dk; d += CH * CH) {
            const size_t at = ((size_t)(sc + r) * Hk + kh) * dk + d;
            K1[r][d] = r < n ? k[at] : 0.0f;
            Q1[r][d] = r < n ? q[at] : 0.0f;
        }
    __syncthreads();
    /* the key head's Gram matrices, lower triangles: k_i·k_j and q_i·k_j, d in order */
    float kk = 0.0f, qk = 0.0f;
    if (j <= i && i < n)
        for (int d = 0; d < dk; d++) {
            kk = fmaf(K1[i][d], K1[j][d], kk);
            qk = fmaf(Q1[i][d], K1[j][d], qk);
        }
    const int G = Hv / Hk;
    for (int hv = kh * G; hv < (kh + 1) * G; hv++) {
        float *R = rec + ((size_t)hv * nch + c) * REC;
        if (tid < CH) { /* γ_i, the running sum's bits: m = 0 .. i in order */
            double acc = 0.0;
            for (int m = 0; m <= tid && m < n; m++) {
                const double gm = g[(size_t)(sc + m) * Hv + hv];
                acc += gm > G_FLOOR ? gm : G_FLOOR;
            }
            gam[tid] = acc;
        }
        __syncthreads();
        /* A (strictly lower) and M (lower) with the pairwise decays e^{γ_i − γ_j} */
        float a = 0.0f, m = 0.0f;
        if (j <= i && i < n) {
            if (j < i) {
                const float dec = expf((float)(gam[i] - gam[j]));
                a = beta[(size_t)(sc + i) * Hv + hv] * dec * kk;
                m = dec * qk;
            } else {
                m = qk;
            }
        }
        A1[i][j] = a;
        R[R_M + tid] = m;
        if (tid < CH) {
            const bool in = tid < n;
            R[R_EG + tid] = in ? expf((float)gam[tid]) : 0.0f;
            R[R_EL + tid] = in ? expf((float)(gam[n - 1] - gam[tid])) : 0.0f;
            R[R_B + tid] = in ? beta[(size_t)(sc + tid) * Hv + hv] : 0.0f;
            R[R_B + CH + tid] = 0.0f;
        }
        __syncthreads();
        if (tid < CH) { /* T = (I + A)⁻¹, column tid: T_ij = δ_ij − Σ_{m=j}^{i−1} A_im T_mj */
            float t[CH];
#pragma unroll
            for (int r = 0; r < CH; r++) {
                float acc = r == tid ? 1.0f : 0.0f;
#pragma unroll
                for (int mm = 0; mm < r; mm++)
                    if (mm >= tid) acc = fmaf(-A1[r][mm], t[mm], acc);
                t[r] = acc;
                R[R_T + r * CH + tid] = acc;
            }
        }
        __syncthreads(); /* A1 and gam are the next value head's */
    }
}

/* One chunk's inputs of a gd_chunked block, in flight in registers while the block computes the previous
 * chunk: its K and Q rows [CH, 16P] (consecutive threads, consecutive floats), its V columns [CH, COLS] and
 * its record. Zeros past the chunk's n, past dk and past dv. */
template <int P> struct chunk_stage {
    static constexpr int DKP = RT * P, LD = P * SEG, COLS = GD_THREADS / P;
    static constexpr int NKQ = CH * DKP / GD_THREADS, NV = CH * COLS / GD_THREADS;
    static constexpr int NR = (REC + GD_THREADS - 1) / GD_THREADS;
    float k[NKQ], q[NKQ], v[NV], r[NR];

    __device__ __forceinline__ void fetch(const float *kp, const float *qp, const float *vp, const float *rp, int sc,
                                          int n, size_t kstride, size_t vstride, int dk, int cols) {
        const int tid = threadIdx.x;
#pragma unroll
        for (int m = 0; m < NKQ; m++) {
            const int e = tid + GD_THREADS * m, i = e / DKP, d = e % DKP;
            const bool in = i < n && d < dk;
            k[m] = in ? kp[(size_t)(sc + i) * kstride + d] : 0.0f;
            q[m] = in ? qp[(size_t)(sc + i) * kstride + d] : 0.0f;
        }
#pragma unroll
        for (int m = 0; m < NV; m++) {
            const int e = tid + GD_THREADS * m, i = e / COLS, c = e % COLS;
            v[m] = i < n && c < cols ? vp[(size_t)(sc + i) * vstride + c] : 0.0f;
        }
#pragma unroll
        for (int m = 0; m < NR; m++) {
            const int e = tid + GD_THREADS * m;
            r[m] = e < REC ? rp[e] : 0.0f;
        }
    }
    __device__ __forceinline__ void store(float *Ks, float *Qs, float *Vs, float *Rs) const {
        const int tid = threadIdx.x;
#pragma unroll
        for (int m = 0; m < NKQ; m++) {
            const int e = tid + GD_THREADS * m, i = e / DKP, d = e % DKP, at = i * LD + d / RT * SEG + d % RT;
            Ks[at] = k[m];
            Qs[at] = q[m];
        }
#pragma unroll
        for (int m = 0; m < NV; m++) Vs[tid + GD_THREADS * m] = v[m];
#pragma unroll
        for (int m = 0; m < NR; m++)
            if (tid + GD_THREADS * m < REC) Rs[tid + GD_THREADS * m] = r[m];
    }
};

/* Value head blockIdx.y, the columns of column block blockIdx.x, through the nch chunks of a slice of ts tokens
 * (its first chunk n0 of them; out, q, k, v from the slice's first token); records rec + (h · nch + c) · REC. */
template <int P>
__global__ void __launch_bounds__(GD_THREADS)
    gd_chunked(float *out, float *S, const float *q, const float *k, const float *v, const float *rec, int ts,
               int n0, int nch, int Hk, int Hv, int dk, int dv) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    using stage = chunk_stage<P>;
    constexpr int LD = stage::LD, COLS = stage::COLS;
    __shared__ __align__(16) float Ks[CH * LD], Qs[CH * LD];
    __shared__ float Vs[CH * COLS];
    __shared__ float Rs[REC];
    const int tid = threadIdx.x, lane = tid & 31, s = lane & (P - 1), r0 = s * RT;
    const int jl = (tid >> 5) * (32 / P) + lane / P; /* this lane: column jl of the block, rows [r0, r0 + RT) */
    const int j0 = blockIdx.x * COLS, j = j0 + jl, h = blockIdx.y, kh = h / (Hv / Hk);
    const bool col = j < dv; /* a group past dv computes zeros (its lanes still take part in everything) */
    float *Sh = S + (size_t)h * dk * dv + j;

    float st[RT];
#pragma unroll
    for (int r = 0; r < RT; r++) st[r] = col && r0 + r < dk ? Sh[(size_t)(r0 + r) * dv] : 0.0f;

    const size_t kstride = (size_t)Hk * dk, vstride = (size_t)Hv * dv;
    const float *kp = k + (size_t)kh * dk, *qp = q + (size_t)kh * dk, *vp = v + (size_t)h * dv + j0;
    const float *rp = rec + (size_t)h * nch * REC;
    const int cols = dv - j0; /* the block's columns before dv */
    stage in;
    in.fetch(kp, qp, vp, rp, 0, chunk_len(0, n0, ts), kstride, vstride, dk, cols);
    const float *Kl = Ks + s * SEG, *Ql = Qs + s * SEG; /* this lane's rows of row 0 */
    for (int c = 0; c < nch; c++) {
        const int sc = chunk_start(c, n0), n = chunk_len(c, n0, ts);
        __syncthreads(); /* every lane is done with the previous chunk's */
        in.store(Ks, Qs, Vs, Rs);
        __syncthreads();
        if (c + 1 < nch)
            in.fetch(kp, qp, vp, rp + (size_t)(c + 1) * REC, chunk_start(c + 1, n0), chunk_len(c + 1, n0, ts),
                     kstride, vstride, dk, cols);

        /* S0ᵀk_i and S0ᵀq_i: this lane's 16 rows in order, then the group's butterfly */
        float sk[CH], sq[CH];
#pragma unroll
        for (int i = 0; i < CH; i++) {
            float a = 0.0f, b = 0.0f;
            if (i < n) {
#pragma unroll
                for (int r = 0; r < RT; r += 4) {
                    const float4 k4 = *reinterpret_cast<const float4 *>(Kl + i * LD + r);
                    const float4 q4 = *reinterpret_cast<const float4 *>(Ql + i * LD + r);
                    a = fmaf(k4.x, st[r], a), b = fmaf(q4.x, st[r], b);
                    a = fmaf(k4.y, st[r + 1], a), b = fmaf(q4.y, st[r + 1], b);
                    a = fmaf(k4.z, st[r + 2], a), b = fmaf(q4.z, st[r + 2], b);
                    a = fmaf(k4.w, st[r + 3], a), b = fmaf(q4.w, st[r + 3], b);
                }
            }
            sk[i] = a, sq[i] = b;
        }
#pragma unroll
        for (int i = 0; i < CH; i++)
            if (i < n) sk[i] = group_sum(sk[i], P), sq[i] = group_sum(sq[i], P);

        /* r_i = β_i (v_i − e^{γ_i} S0ᵀk_i) (into sk), then u = T r */
        float u[CH];
#pragma unroll
        for (int i = 0; i < CH; i++) {
            u[i] = 0.0f;
            if (i < n) {
                sk[i] = Rs[R_B + i] * fmaf(-Rs[R_EG + i], sk[i], Vs[i * COLS + jl]);
                float acc = 0.0f;
#pragma unroll
                for (int m = 0; m <= i; m++) acc = fmaf(Rs[R_T + i * CH + m], sk[m], acc);
                u[i] = acc;
            }
        }
        /* out_i = e^{γ_i} S0ᵀq_i + Σ_{m<=i} M_im u_m, by lane i mod P of the group */
#pragma unroll
        for (int i = 0; i < CH; i++)
            if (i < n && (i & (P - 1)) == s) {
                float acc = Rs[R_EG + i] * sq[i];
#pragma unroll
                for (int m = 0; m <= i; m++) acc = fmaf(Rs[R_M + i * CH + m], u[m], acc);
                if (col) out[((size_t)(sc + i) * Hv + h) * dv + j] = acc;
            }
        /* S = e^{γ_{n−1}} S0 + Σ_i k_i (e^{γ_{n−1} − γ_i} u_i)ᵀ, this lane's rows */
        const float last = Rs[R_EG + n - 1];
#pragma unroll
        for (int r = 0; r < RT; r++) st[r] *= last;
#pragma unroll
        for (int i = 0; i < CH; i++)
            if (i < n) {
                const float w = u[i] * Rs[R_EL + i];
#pragma unroll
                for (int r = 0; r < RT; r += 4) {
                    const float4 k4 = *reinterpret_cast<const float4 *>(Kl + i * LD + r);
                    st[r] = fmaf(k4.x, w, st[r]);
                    st[r + 1] = fmaf(k4.y, w, st[r + 1]);
                    st[r + 2] = fmaf(k4.z, w, st[r + 2]);
                    st[r + 3] = fmaf(k4.w, w, st[r + 3]);
                }
            }
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
        fmc_launch(gd_recurrent<true>, grid, GD_THREADS, 0, s, out, S, q, k, v, g, beta, T, Hk, Hv, dk, dv, lp);
    else
        fmc_launch(gd_recurrent<false>, grid, GD_THREADS, 0, s, out, S, q, k, v, g, beta, T, Hk, Hv, dk, dv, lp);
}

template <int P>
void launch_chunked_p(cudaStream_t s, float *out, float *S, const float *q, const float *k, const float *v,
                      const float *rec, int ts, int n0, int nch, int Hk, int Hv, int dk, int dv) {
    const int cols = GD_THREADS / P;
    const dim3 grid((unsigned)((dv + cols - 1) / cols), (unsigned)Hv);
    fmc_launch(gd_chunked<P>, grid, GD_THREADS, 0, s, out, S, q, k, v, rec, ts, n0, nch, Hk, Hv, dk, dv);
}

/* A call's plan: tokens [a, b) take the chunked form (in nch chunks, the first of n0 tokens), in slices of
 * `slice` chunks with `floats` of scratch; the tokens before a and from b (1-token chunks) the recurrent one.
 * a = b = 0: every token the recurrent form (one token, or two 1-token chunks, or dk past the chunked form's). */
struct gd_plan {
    int a, b, n0, nch, slice;
    size_t floats;
};

/* FLASHMOE_CUDA_GD_CHUNKED=0: the recurrent form for every token (benchmarks: the chunked form's baseline, in
 * the same build). Read at each call. */
bool chunked_on() {
    const char *e = getenv("FLASHMOE_CUDA_GD_CHUNKED");
    return !(e && strcmp(e, "0") == 0);
}

gd_plan plan_of(int T, int pos0, int Hv, int dk) {
    gd_plan p = {0, 0, 0, 0, 0, 0};
    if (T < 2 || dk > CHUNK_MAX_DK || !chunked_on()) return p;
    const int first = CH - pos0 % CH; /* the first chunk's length, if the call is that long */
    const int a = first == 1 ? 1 : 0;
    const int last = (int)(((long long)pos0 + T - 1) / CH * CH - pos0); /* the last chunk's first token */
    const int b = last >= a && T - last == 1 ? T - 1 : T;
    if (b <= a) return p;
    p.a = a, p.b = b;
    p.n0 = CH - (pos0 + a) % CH < b - a ? CH - (pos0 + a) % CH : b - a;
    p.nch = 1 + (b - a - p.n0 + CH - 1) / CH;
    const size_t per = (size_t)Hv * REC;
    size_t fit = MAX_SCRATCH_FLOATS / per;
    if (const char *env = getenv("FLASHMOE_CUDA_GD_SLICE")) /* tests: slices of this many chunks */
        if (atoi(env) > 0 && (size_t)atoi(env) < fit) fit = (size_t)atoi(env);
    p.slice = fit < 1 ? 1 : (fit < (size_t)p.nch ? (int)fit : p.nch);
    p.floats = (size_t)p.slice * per;
    return p;
}

} // namespace

size_t fmc_gated_delta_scratch_floats(int T, int pos0, int Hk, int Hv, int dk, int dv) {
    (void)Hk, (void)dv;
    if (T < 1 || pos0 < 0 || Hv < 1 || dk < 1) return 0;
    return plan_of(T, pos0, Hv, dk).floats;
}

size_t fmc_gated_delta_scratch_cap_floats(void) { return MAX_SCRATCH_FLOATS; }

fm_status fmc_gated_delta(cudaStream_t s, float *out, float *S, const float *q, const float *k, const float *v,
                          const float *g, const float *beta, int T, int pos0, int Hk, int Hv, int dk, int dv,
                          float *scratch) {
    if (T < 0 || pos0 < 0 || Hk < 1 || Hv < 1 || Hv % Hk || Hv > 65535 || dk < 1 || dk > MAX_DK || dv < 1)
        return fm_fail(FM_ERR_INVALID,
                       "cuda backend: gated delta rule of %d tokens, %d key heads, %d value heads, dk %d, dv %d "
                       "(value heads a multiple of the key heads, at most 65535; dk 1..%d)",
                       T, Hk, Hv, dk, dv, MAX_DK);
    if (T == 0) return FM_OK;
    const gd_plan p = plan_of(T, pos0, Hv, dk);
    if (p.b <= p.a) {
        launch_recurrent(s, out, S, q, k, v, g, beta, T, Hk, Hv, dk, dv);
        return FM_OK;
    }
    if (!scratch) return fm_fail(FM_ERR_INVALID, "cuda backend: gated delta rule without its scratch");
    const size_t kq = (size_t)Hk * dk, vo = (size_t)Hv * dv; /* floats a token of q, k; of v, out */
    if (p.a) /* a 1-token first chunk: the recurrent step */
        launch_recurrent(s, out, S, q, k, v, g, beta, 1, Hk, Hv, dk, dv);
    for (int c0 = 0; c0 < p.nch; c0 += p.slice) { /* a slice's records are read before the next one's are written */
        const int cn = p.nch - c0 < p.slice ? p.nch - c0 : p.slice;
        const int tb = p.a + (c0 ? p.n0 + CH * (c0 - 1) : 0);                      /* its tokens [tb, te) */
        const int te = c0 + cn < p.nch ? p.a + p.n0 + CH * (c0 + cn - 1) : p.b;
        const int n0 = c0 ? (te - tb < CH ? te - tb : CH) : p.n0; /* past the first slice, chunks start at 16s */
        fmc_launch(gd_chunk_prep, dim3((unsigned)cn, (unsigned)Hk), CH * CH, 0, s, scratch, q + tb * kq, k + tb * kq,
                   g + (size_t)tb * Hv, beta + (size_t)tb * Hv, te - tb, n0, cn, Hk, Hv, dk);
        float *o = out + tb * vo;
        const float *qs = q + tb * kq, *ks = k + tb * kq, *vs = v + tb * vo;
        if (dk <= 16)
            launch_chunked_p<1>(s, o, S, qs, ks, vs, scratch, te - tb, n0, cn, Hk, Hv, dk, dv);
        else if (dk <= 32)
            launch_chunked_p<2>(s, o, S, qs, ks, vs, scratch, te - tb, n0, cn, Hk, Hv, dk, dv);
        else if (dk <= 64)
            launch_chunked_p<4>(s, o, S, qs, ks, vs, scratch, te - tb, n0, cn, Hk, Hv, dk, dv);
        else if (dk <= 128)
            launch_chunked_p<8>(s, o, S, qs, ks, vs, scratch, te - tb, n0, cn, Hk, Hv, dk, dv);
        else
            launch_chunked_p<16>(s, o, S, qs, ks, vs, scratch, te - tb, n0, cn, Hk, Hv, dk, dv);
    }
    if (p.b < T) { /* a 1-token last chunk */
        const size_t t = (size_t)T - 1;
        launch_recurrent(s, out + t * vo, S, q + t * kq, k + t * kq, v + t * vo, g + t * Hv, beta + t * Hv, 1, Hk,
                         Hv, dk, dv);
    }
    return FM_OK;
}
