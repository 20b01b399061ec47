/*
 * gated_delta.c — the gated delta rule of Gated DeltaNet (shared/DESIGN.md §3), two ways:
 *
 *   fm_cpu_gated_delta        the recurrent form, one token at a time: decode, and the reference.
 *   fm_cpu_gated_delta_chunk  the chunked (WY / UT-transform) form for prefill: the same map, computed
 *                            C tokens at a time with matrix products instead of T rank-1 updates.
 *
 * The chunked form. Per value head, a chunk of n tokens starting from the state S0 [dk, dv]; with
 * γ_i = g_0 + … + g_i (cumulative log-decay inside the chunk) the recurrence
 *     S_i = e^{g_i} S_{i-1} + k_i u_iᵀ,   u_i = β_i (v_i − e^{g_i} S_{i-1}ᵀ k_i)
 * unrolls to S_i = e^{γ_i} S0 + Σ_{j≤i} e^{γ_i−γ_j} k_j u_jᵀ, so the "new values" u solve
 *     (I + A) U = R,   A_ij = β_i e^{γ_i−γ_j} k_i·k_j  (j < i, strictly lower),
 *                      R_i  = β_i (v_i − e^{γ_i} S0ᵀ k_i),
 * and then
 *     o_i   = e^{γ_i} S0ᵀ q_i + Σ_{j≤i} e^{γ_i−γ_j} (q_i·k_j) u_j
 *     S_end = e^{γ_{n−1}} S0 + Σ_j e^{γ_{n−1}−γ_j} k_j u_jᵀ.
 * U = T R with T = (I + A)⁻¹ (unit lower-triangular, by forward substitution, n³/6). The heavy parts
 * are the products K S0 and Q S0 ([n, dk]·[dk, dv]), Kᵀ U ([dk, n]·[n, dv]) and the n×n ones; they
 * all go through one register-tiled product, gemm() below. Every decay is exp of a difference of
 * cumulative log-decays (≤ 0, held in double), so nothing is ever divided by a small exp.
 *
 * Floating point: fp32 everywhere but the cumulative log-decays. Results are not bit-equal to the
 * recurrent form (the sums are associated differently), see tests/test_ops.py for the tolerance.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "threads.h"
#include "../../core/util.h"
#include "cpu.h"

/* ---------------------------------------------------------------- recurrent form */

typedef struct {
    float *out, *S;
    const float *q, *k, *v, *g, *beta;
    int T, Hk, Hv, dk, dv, heads_per_task;
} recurrent_job;

/* Value head h through tokens [t0, t1), one rank-1 update each. The one copy of the recurrent step:
 * decode, and a 1-token chunk of the chunked form, call it, so the two give the same bits (noinline:
 * one compiled body, whatever the caller's ISA copy). */
static __attribute__((noinline)) void recurrent_steps(float *out, float *Sh, const float *q, const float *k,
                                                      const float *v, const float *g, const float *beta, int h,
                                                      int t0, int t1, int Hk, int Hv, int dk, int dv) {
    const int kh = h / (Hv / Hk);
    float u[dv];
    for (int t = t0; t < t1; t++) {
        const float *qt = q + ((size_t)t * Hk + kh) * dk, *kt = k + ((size_t)t * Hk + kh) * dk;
        const float *vt = v + ((size_t)t * Hv + h) * dv;
        const float decay = expf(g[(size_t)t * Hv + h]), b = beta[(size_t)t * Hv + h];
        /* S *= exp(g); u = beta * (v - Sᵀk) */
        for (int j = 0; j < dv; j++) u[j] = 0.0f;
        for (int i = 0; i < dk; i++) {
            float *Si = Sh + (size_t)i * dv;
            for (int j = 0; j < dv; j++) {
                Si[j] *= decay;
                u[j] += Si[j] * kt[i];
            }
        }
        for (int j = 0; j < dv; j++) u[j] = (vt[j] - u[j]) * b;
        /* S += k ⊗ u; o = Sᵀq */
        float *ot = out + ((size_t)t * Hv + h) * dv;
        for (int j = 0; j < dv; j++) ot[j] = 0.0f;
        for (int i = 0; i < dk; i++) {
            float *Si = Sh + (size_t)i * dv;
            const float ki = kt[i], qi = qt[i];
            for (int j = 0; j < dv; j++) {
                Si[j] += ki * u[j];
                ot[j] += Si[j] * qi;
            }
        }
    }
}

/* Value heads [h0, h1) through all T tokens: each head's state is its own, so heads split over
 * threads give the same numbers as one thread. */
static void recurrent_task(void *ctx, int task) {
    const recurrent_job *J = (const recurrent_job *)ctx;
    const int h0 = task * J->heads_per_task, h1 = h0 + J->heads_per_task < J->Hv ? h0 + J->heads_per_task : J->Hv;
    for (int h = h0; h < h1; h++)
        recurrent_steps(J->out, J->S + (size_t)h * J->dk * J->dv, J->q, J->k, J->v, J->g, J->beta, h, 0, J->T, J->Hk,
                        J->Hv, J->dk, J->dv);
}

void fm_cpu_gated_delta(float *out, float *S, const float *q, const float *k, const float *v, const float *g,
                       const float *beta, int T, int Hk, int Hv, int dk, int dv) {
    recurrent_job J = {out, S, q, k, v, g, beta, T, Hk, Hv, dk, dv, Hv};
    /* Decode streams every head's state (2 MB a layer at the 35B shape) twice: worth the pool. */
    const int tasks = (double)T * Hv * dk * dv < 1e5 ? 1 : (Hv < 2 * fm_threads_get() ? Hv : 2 * fm_threads_get());
    J.heads_per_task = (Hv + tasks - 1) / tasks;
    fm_parallel_for((Hv + J.heads_per_task - 1) / J.heads_per_task, recurrent_task, &J);
}

/* ---------------------------------------------------------------- chunked form: the product */

/* Register tile: MR rows × NR columns of C held in registers while the K loop streams a column of A
 * (broadcast) and a row of B (contiguous). GCC vector types keep the tile in registers (left alone,
 * GCC vectorised the wrong loop of a plain-C tile, with shuffles). Everything below is inlined into
 * a portable and an AVX2+FMA copy of chunk_head (runtime dispatch, as the matmul kernels); `wide`, a
 * constant in each copy, picks the tile: 4×16 in 8 AVX registers, or 4×8 in 8 SSE / NEON ones. */
enum { MR = 4, NR_MAX = 16 };
typedef float v8f __attribute__((vector_size(32)));
typedef float v8fu __attribute__((vector_size(32), aligned(4), may_alias)); /* unaligned loads/stores */
typedef float v4f __attribute__((vector_size(16)));
typedef float v4fu __attribute__((vector_size(16), aligned(4), may_alias));

#define INLINE static inline __attribute__((always_inline))

#define GEMM_TRI_A 1 /* A is lower-triangular (zero right of the diagonal): row block i0 reads k < i0 + MR */
#define GEMM_TRI_C 2 /* only C's lower triangle is wanted: column blocks right of the row block are skipped */

/* One tile, C[mr, 2·W] = alpha·C + A[mr, K]·B[K, 2·W] for mr ≤ MR, vectors of W floats (VT; VTU
 * unaligned). Rows past mr repeat row mr − 1 (valid memory, same cost) and are not stored. */
#define TILE_FULL(NAME, VT, VTU, W)                                                                                \
    INLINE void NAME(int mr, int K, const float *A, size_t lda, const float *B, size_t ldb, float *C, size_t ldc,  \
                     float alpha) {                                                                                \
        const float *Ar[MR];                                                                                       \
        VT acc[MR][2];                                                                                             \
        for (int r = 0; r < MR; r++) {                                                                             \
            const int rr = r < mr ? r : mr - 1;                                                                    \
            Ar[r] = A + rr * lda;                                                                                  \
            for (int j = 0; j < 2; j++)                                                                            \
                acc[r][j] = alpha == 0.0f ? (VT){0} : alpha * (VT) * (const VTU *)(C + rr * ldc + W * j);          \
        }                                                                                                          \
        for (int kk = 0; kk < K; kk++) {                                                                           \
            const VT b0 = *(const VTU *)(B + kk * ldb), b1 = *(const VTU *)(B + kk * ldb + W);                     \
            for (int r = 0; r < MR; r++) {                                                                         \
                const float a = Ar[r][kk];                                                                         \
                acc[r][0] += a * b0;                                                                               \
                acc[r][1] += a * b1;                                                                               \
            }                                                                                                      \
        }                                                                                                          \
        for (int r = 0; r < mr; r++)                                                                               \
            for (int j = 0; j < 2; j++) *(VTU *)(C + r * ldc + W * j) = acc[r][j];                                 \
    }
TILE_FULL(tile_full8, v8f, v8fu, 8)
TILE_FULL(tile_full4, v4f, v4fu, 4)

/* The right edge: mr ≤ MR rows, nr < NR columns. */
INLINE void tile_edge(int mr, int nr, int K, const float *A, size_t lda, const float *B, size_t ldb, float *C,
                      size_t ldc, float alpha) {
    float acc[MR][NR_MAX];
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < nr; j++) acc[r][j] = alpha == 0.0f ? 0.0f : alpha * C[r * ldc + j];
    for (int kk = 0; kk < K; kk++) {
        const float *b = B + kk * ldb;
        for (int r = 0; r < mr; r++) {
            const float a = A[r * lda + kk];
            for (int j = 0; j < nr; j++) acc[r][j] += a * b[j];
        }
    }
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < nr; j++) C[r * ldc + j] = acc[r][j];
}

/* C[m, N] = alpha·C + A[m, K]·B[K, N], row-major with leading dimensions; alpha 0 never reads C. */
INLINE void gemm(int m, int N, int K, const float *A, size_t lda, const float *B, size_t ldb, float *C, size_t ldc,
                 float alpha, int flags, const int wide) {
    const int NR = wide ? 16 : 8;
    for (int i0 = 0; i0 < m; i0 += MR) {
        const int mr = m - i0 < MR ? m - i0 : MR;
        const int kmax = (flags & GEMM_TRI_A) && i0 + MR < K ? i0 + MR : K;
        const int nmax = (flags & GEMM_TRI_C) && i0 + MR < N ? i0 + MR : N;
        const float *Ai = A + (size_t)i0 * lda;
        float *Ci = C + (size_t)i0 * ldc;
        for (int j0 = 0; j0 < nmax; j0 += NR) {
            const int nr = N - j0 < NR ? N - j0 : NR;
            if (nr == NR && wide)
                tile_full8(mr, kmax, Ai, lda, B + j0, ldb, Ci + j0, ldc, alpha);
            else if (nr == NR)
                tile_full4(mr, kmax, Ai, lda, B + j0, ldb, Ci + j0, ldc, alpha);
            else
                tile_edge(mr, nr, kmax, Ai, lda, B + j0, ldb, Ci + j0, ldc, alpha);
        }
    }
}

/* ---------------------------------------------------------------- chunked form: value heads */

typedef struct chunk_job {
    float *out, *S;
    const float *q, *k, *v, *g, *beta;
    int T, Hk, Hv, dk, dv, chunk, pos0;
    int per; /* value heads per task, all of one key head (they share Kᵀ and the Gram matrices) */
    void (*group)(const struct chunk_job *, int, float *); /* chunk_group for the CPU's ISA */
} chunk_job;

/* Per-thread scratch that only grows (fresh large allocations would be new zeroed pages every call). */
static float *scratch(size_t n) {
    static _Thread_local void *buf;
    static _Thread_local size_t cap;
    return (float *)fm_grow(&buf, &cap, n * sizeof(float), n * sizeof(float));
}

static size_t chunk_scratch_floats(int C, int dk, int dv) {
    return (size_t)dk * C + 5 * (size_t)C * C + 2 * (size_t)C * dv + 4 * (size_t)C + 16;
}

/* Log-decays at or below this give exp() == 0 in fp32 whatever is added to them (all g ≤ 0), so
 * clamping there changes no result and keeps -inf or huge inputs from making inf − inf. */
#define G_FLOOR (-256.0)

/* Value heads h0 .. h0 + per − 1 (one key head), all chunks in order. */
INLINE void chunk_group(const chunk_job *J, int h0, float *buf, const int wide) {
    const int Hk = J->Hk, Hv = J->Hv, dk = J->dk, dv = J->dv, C = J->chunk, kh = h0 / (Hv / Hk);
    const size_t ldq = (size_t)Hk * dk, ldv = (size_t)Hv * dv;
    float *Kt = buf;                 /* [dk, C]  Kᵀ of the chunk */
    float *KK = Kt + (size_t)dk * C; /* [C, C]   K Kᵀ (lower triangle) */
    float *QK = KK + (size_t)C * C;  /* [C, C]   Q Kᵀ (lower triangle) */
    float *A = QK + (size_t)C * C;   /* [C, C]   A (strictly lower) */
    float *M = A + (size_t)C * C;    /* [C, C]   M = decay ⊙ Q Kᵀ (lower, zero above) */
    float *Tm = M + (size_t)C * C;   /* [C, C]   T = (I + A)⁻¹ (zero above the diagonal) */
    float *R = Tm + (size_t)C * C;   /* [C, dv]  K S0, then R */
    float *U = R + (size_t)C * dv;   /* [C, dv]  U = T R */
    float *eg = U + (size_t)C * dv;  /* [C] e^{γ_i} */
    float *el = eg + C;              /* [C] e^{γ_last − γ_i} */
    double *gam = (double *)(el + C); /* [C] γ_i */

    for (int c0 = 0, n; c0 < J->T; c0 += n) {
        /* chunks end at multiples of C in absolute positions (pos0 + c0), so a prompt is cut into the
         * same chunks however the calls split it at multiples of C; a 1-token chunk is the recurrent step */
        n = C - (J->pos0 + c0) % C;
        if (n > J->T - c0) n = J->T - c0;
        if (n == 1) {
            for (int h = h0; h < h0 + J->per; h++)
                recurrent_steps(J->out, J->S + (size_t)h * dk * dv, J->q, J->k, J->v, J->g, J->beta, h, c0, c0 + 1, Hk,
                                Hv, dk, dv);
            continue;
        }
        const float *Q = J->q + ((size_t)c0 * Hk + kh) * dk, *K = J->k + ((size_t)c0 * Hk + kh) * dk;

        /* shared by the key head's value heads: Kᵀ and the Gram matrices' lower triangles */
        for (int i = 0; i < n; i++)
            for (int d = 0; d < dk; d++) Kt[(size_t)d * n + i] = K[(size_t)i * ldq + d];
        gemm(n, n, dk, K, ldq, Kt, n, KK, n, 0.0f, GEMM_TRI_C, wide);
        gemm(n, n, dk, Q, ldq, Kt, n, QK, n, 0.0f, GEMM_TRI_C, wide);

        for (int h = h0; h < h0 + J->per; h++) {
            const float *V = J->v + ((size_t)c0 * Hv + h) * dv;
            const float *g = J->g + (size_t)c0 * Hv + h, *beta = J->beta + (size_t)c0 * Hv + h;
            float *O = J->out + ((size_t)c0 * Hv + h) * dv;
            float *S0 = J->S + (size_t)h * dk * dv; /* [dk, dv] */

            double acc = 0.0;
            for (int i = 0; i < n; i++) {
                const double gi = g[(size_t)i * Hv];
                acc += gi > G_FLOOR ? gi : G_FLOOR;
                gam[i] = acc;
            }
            for (int i = 0; i < n; i++) {
                eg[i] = expf((float)gam[i]);
                el[i] = expf((float)(gam[n - 1] - gam[i]));
            }
            /* A and M: the Gram matrices with the pairwise decays e^{γ_i − γ_j} (j ≤ i) */
            for (int i = 0; i < n; i++) {
                const float bi = beta[(size_t)i * Hv];
                const float *kk = KK + (size_t)i * n, *qk = QK + (size_t)i * n;
                float *ai = A + (size_t)i * n, *mi = M + (size_t)i * n;
                for (int j = 0; j < i; j++) {
                    const float d = expf((float)(gam[i] - gam[j]));
                    ai[j] = bi * d * kk[j];
                    mi[j] = d * qk[j];
                }
                mi[i] = qk[i];
                for (int j = i + 1; j < n; j++) mi[j] = 0.0f;
            }
            /* T = (I + A)⁻¹: row i = e_i − Σ_{m<i} A_im T_m, and row m of T is zero right of column m */
            for (int i = 0; i < n; i++) {
                float *t = Tm + (size_t)i * n;
                const float *ai = A + (size_t)i * n;
                for (int j = 0; j < n; j++) t[j] = j == i ? 1.0f : 0.0f;
                for (int m = 0; m < i; m++) {
                    const float am = ai[m];
                    const float *tm = Tm + (size_t)m * n;
                    for (int j = 0; j <= m; j++) t[j] -= am * tm[j];
                }
            }

            /* R = β (V − e^{γ} K S0);  U = T R */
            gemm(n, dv, dk, K, ldq, S0, dv, R, dv, 0.0f, 0, wide);
            for (int i = 0; i < n; i++) {
                const float bi = beta[(size_t)i * Hv], ei = eg[i];
                float *ri = R + (size_t)i * dv;
                const float *vi = V + (size_t)i * ldv;
                for (int j = 0; j < dv; j++) ri[j] = bi * (vi[j] - ei * ri[j]);
            }
            gemm(n, dv, n, Tm, n, R, dv, U, dv, 0.0f, GEMM_TRI_A, wide);

            /* O = e^{γ} Q S0 + M U */
            gemm(n, dv, dk, Q, ldq, S0, dv, O, ldv, 0.0f, 0, wide);
            for (int i = 0; i < n; i++) {
                float *oi = O + (size_t)i * ldv;
                const float ei = eg[i];
                for (int j = 0; j < dv; j++) oi[j] *= ei;
            }
            gemm(n, dv, n, M, n, U, dv, O, ldv, 1.0f, GEMM_TRI_A, wide);

            /* S0 = e^{γ_last} S0 + Kᵀ (e^{γ_last − γ} U) */
            for (int i = 0; i < n; i++) {
                float *ui = U + (size_t)i * dv;
                const float li = el[i];
                for (int j = 0; j < dv; j++) ui[j] *= li;
            }
            gemm(dk, dv, n, Kt, n, U, dv, S0, dv, eg[n - 1], 0, wide);
        }
    }
}

static void chunk_group_portable(const chunk_job *J, int h0, float *buf) { chunk_group(J, h0, buf, 0); }

#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_AVX2_COPY 1
__attribute__((target("avx2,fma"))) static void chunk_group_avx2(const chunk_job *J, int h0, float *buf) {
    chunk_group(J, h0, buf, 1);
}
#endif

static void chunk_task(void *ctx, int i) {
    const chunk_job *J = (const chunk_job *)ctx;
    float *buf = scratch(chunk_scratch_floats(J->chunk, J->dk, J->dv));
    for (int h = i * J->per; h < (i + 1) * J->per && !buf; h++) /* no memory for the scratch: the recurrent form */
        recurrent_steps(J->out, J->S + (size_t)h * J->dk * J->dv, J->q, J->k, J->v, J->g, J->beta, h, 0, J->T, J->Hk,
                        J->Hv, J->dk, J->dv);
    if (buf) J->group(J, i * J->per, buf);
}

void fm_cpu_gated_delta_chunk(float *out, float *S, const float *q, const float *k, const float *v, const float *g,
                             const float *beta, int T, int Hk, int Hv, int dk, int dv, int chunk, int pos0) {
    if (T <= 0) return;
    if (chunk <= 0) chunk = 64;
    if (pos0 < 0) pos0 = 0;
    chunk_job J = {out, S, q, k, v, g, beta, T, Hk, Hv, dk, dv, chunk, pos0, Hv / Hk, chunk_group_portable};
#ifdef HAVE_AVX2_COPY
    if (fm_cpu_use_avx2()) J.group = chunk_group_avx2; /* the CPU has it and no variant is forced */
#endif
    /* Value heads over the pool when there is enough work to pay for waking it (~50 µs; a value head
     * of a token is ~3·dk·dv multiply-adds). A task takes all value heads of a key head while there
     * are at least as many key heads as threads, else one value head (recomputing the Gram matrices). */
    const int threads = (double)T * Hv * dk * dv >= 2e5 ? fm_threads_get() : 1;
    if (Hk < threads) J.per = 1;
    if (threads == 1)
        for (int i = 0; i < Hk; i++) chunk_task(&J, i);
    else
        fm_parallel_for(Hv / J.per, chunk_task, &J);
}
