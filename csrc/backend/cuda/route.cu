/*
 * route.cu — the MoE router (cpu.h's fm_cpu_topk_softmax per token): probabilities softmax(logits[t, 0..E)),
 * the top k in descending order (equal logits: the lower index first), their weights, renormalised to sum 1
 * when norm; idx [T, k] (int32) and weights [T, k] out. One warp per token, ROUTE_WARPS tokens per block;
 * lane l holds logits l, l + 32, ... in registers (E <= MAX_E).
 *
 * Indices: exactly the CPU's. They are chosen by comparing logits, never probabilities (softmax is
 * monotonic), in the CPU's total order: logit descending, NaN after every number, then index ascending
 * (-0.0 and +0.0 are equal, as the CPU's > compares them). Round j takes the best element after round
 * j-1's winner in that order: each lane its own best, then a butterfly of shuffles keeps the better of two.
 * The maximum of a total order does not depend on the order it is taken in, so every lane agrees and lane j
 * keeps winner j.
 *
 * Weights: the CPU's arithmetic but for the order of one sum. The max logit (round 0's winner), e_i =
 * exp((double)(l_i - max)) with the difference in fp32, their sum in double (each lane over its own, then a
 * butterfly: the CPU adds them in index order; in double the two differ far below fp32's rounding),
 * w_j = (float)(e_j / sum), and when norm w_j / Σ_j w_j with the fp32 sum in j order from 0. exp may also
 * differ from glibc's (CUDA's double exp is within 1 ulp). A token's arithmetic is its own alone.
 *
 * Non-finite logits (the CPU's contract, ops.c; tests/test_ops.py's ref_topk_softmax and nonfinite cases):
 * - NaN ranks after every number (after -inf) and NaNs among themselves by index, so a token's choices
 *   are always k distinct indices in [0, E): the top of its numbers, then, if fewer than k, its first NaNs;
 * - the softmax term of logit l is 1 where l equals the max of the numbers (the max is round 0's winner, a
 *   NaN only when all are) and exp(l - max) elsewhere: a +inf max gives each +inf logit 1/(their count) and
 *   every other 0 (not inf - inf), all -inf gives 1/E each, -inf below a number 0;
 * - a NaN anywhere makes the sum, so all k weights of the token, NaN (the core multiplies them in, so the
 *   token's output is NaN too; its indices stay valid).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

extern "C" {
#include "../../core/util.h" /* fm_fail, with C linkage: util.h has no extern "C" of its own */
}
#include "cuda_kernels.h"
#include "launch.cuh"

namespace {

constexpr int ROUTE_WARPS = 4;   /* tokens per block */
constexpr int MAX_E = 1024;      /* logits per token: MAX_E / 32 per lane */
constexpr int PER_LANE = MAX_E / 32;
constexpr int MAX_K = 32;        /* a selection per lane */

/* whether (al, ai) comes before (bl, bi) in the CPU's order; NaN after every number; index -1 (none) after
 * everything */
__device__ __forceinline__ bool before(float al, int ai, float bl, int bi) {
    if (ai < 0) return false;
    if (bi < 0) return true;
    if (isnan(al) || isnan(bl)) return isnan(bl) && (!isnan(al) || ai < bi);
    return al > bl || (al == bl && ai < bi);
}

/* token blockIdx.x · ROUTE_WARPS + warp; ex: ROUTE_WARPS × E doubles of dynamic shared memory; one, tok: each choice
 * (and with has_sh the shared expert sh) as an expert of one token (fmc_route) where tab is given */
__global__ void __launch_bounds__(ROUTE_WARPS * 32) route_k(const float *__restrict__ logits, int T, int E, int k,
                                                            int norm, int32_t *__restrict__ idx,
                                                            float *__restrict__ weights,
                                                            const fmc_expert *__restrict__ tab,
                                                            fmc_expert *__restrict__ one, int32_t *__restrict__ tok,
                                                            fmc_expert sh, int has_sh) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    extern __shared__ double ex[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = blockIdx.x * ROUTE_WARPS + warp;
    if (t >= T) return; /* the whole warp; only warp-level syncs below */
    const float *lt = logits + (size_t)t * E;
    double *e = ex + (size_t)warp * E;

    float x[PER_LANE];
#pragma unroll
    for (int r = 0; r < PER_LANE; r++) x[r] = lane + 32 * r < E ? lt[lane + 32 * r] : 0.0f;

    /* top k: round j picks the best element after (pl, pi), the previous winner */
    float pl = 0.0f, mx = 0.0f;
    int pi = -1, my_i = -1;
    for (int j = 0; j < k; j++) {
        float bl = 0.0f;
        int bi = -1;
#pragma unroll
        for (int r = 0; r < PER_LANE; r++) {
            const int i = lane + 32 * r;
            if (32 * r >= E) break; /* uniform */
            const float l = x[r];
            if (i < E && (pi < 0 || before(pl, pi, l, i)) && before(l, i, bl, bi)) bl = l, bi = i;
        }
#pragma unroll
        for (int m = 16; m > 0; m >>= 1) {
            const float ol = __shfl_xor_sync(0xffffffffu, bl, m);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, m);
            if (before(ol, oi, bl, bi)) bl = ol, bi = oi;
        }
        if (lane == j) my_i = bi;
        if (j == 0) mx = bl; /* the max logit; k <= E, so every round finds one */
        pl = bl, pi = bi;
    }

    /* the CPU's terms exp((double)(l - mx)) (1 at the max), summed in double: each lane its own in index
     * order, then a butterfly over the warp (the same bits in every lane) */
    double sum = 0.0;
#pragma unroll
    for (int r = 0; r < PER_LANE; r++)
        if (lane + 32 * r < E) sum += e[lane + 32 * r] = x[r] == mx ? 1.0 : exp((double)(x[r] - mx));
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, m);
    __syncwarp();
    const float w = lane < k ? (float)(e[my_i] / sum) : 0.0f;
    float wsum = 0.0f;
    for (int j = 0; j < k; j++) wsum += __shfl_sync(0xffffffffu, w, j);
    if (lane < k) {
        idx[(size_t)t * k + lane] = my_i;
        weights[(size_t)t * k + lane] = norm ? w / wsum : w;
        if (tab) { /* choice i as an expert of one token (fmc_experts) */
            const size_t i = (size_t)t * k + lane;
            fmc_expert x = tab[my_i];
            x.tok = tok + i, x.n = 1, x.row0 = (int)i;
            one[i] = x;
            tok[i] = t;
        }
    }
    if (tab && has_sh && lane == 0) { /* the shared expert on token t, after every token's choices */
        const size_t i = (size_t)T * k + t;
        fmc_expert x = sh;
        x.tok = tok + i, x.n = 1, x.row0 = (int)i;
        one[i] = x;
        tok[i] = t;
    }
}

} // namespace

fm_status fmc_route(cudaStream_t s, const float *logits, int T, int E, int k, int norm, int32_t *idx,
                    float *weights, const fmc_expert *tab, fmc_expert *ex, int32_t *tok, const fmc_expert *shared) {
    if (T < 0 || E < 1 || E > MAX_E || k < 1 || k > MAX_K || k > E)
        return fm_fail(FM_ERR_INVALID, "cuda backend: route of %d tokens, top %d of %d experts (1..%d experts, "
                       "k at most %d and the experts)", T, k, E, MAX_E, MAX_K);
    if (T == 0) return FM_OK;
    const size_t smem = (size_t)ROUTE_WARPS * E * sizeof(double); /* <= 32 KiB: no opt-in needed */
    const fmc_expert sh = shared ? *shared : fmc_expert{};
    fmc_launch(route_k, (unsigned)((T + ROUTE_WARPS - 1) / ROUTE_WARPS), ROUTE_WARPS * 32, smem, s,
        logits, T, E, k, norm, idx, weights, tab, ex, tok, sh, shared != nullptr);
    return FM_OK;
}
