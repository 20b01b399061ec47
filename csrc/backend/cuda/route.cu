/*
 * route.cu — the MoE router (cpu.h's fm_cpu_topk_softmax per token): probabilities softmax(logits[t, 0..E)),
 * the top k in descending order (equal logits: the lower index first), their weights, renormalised to sum 1
 * when norm; idx [T, k] (int32) and weights [T, k] out. One block per token, a thread per logit (E <= MAX_E):
 * B threads, E rounded up to a group size G, the pad logits NaN.
 *
 * Indices: exactly the CPU's. They are chosen by comparing logits, never probabilities (softmax is
 * monotonic), in the CPU's total order: logit descending, NaN after every number, then index ascending
 * (-0.0 and +0.0 are equal, as the CPU's > compares them; the pad comes after every logit). key_of makes
 * (logit, index) one 64-bit integer in that order, distinct for each index, so an element's rank (the number
 * of elements before it) is a count of larger keys, and ranks are distinct. Stage 1: each element's rank in
 * its group of G (G comparisons); those below k are the group's candidates, at their rank's slot. Stage 2:
 * each candidate's rank among the nc candidates (P threads' counts); the one of rank j < k is choice j. Exact:
 * whatever comes before an element of rank j < k has a rank below j, so below k in its group: a candidate;
 * so among the candidates that element counts exactly j. One of rank >= k comes after the first k, all
 * candidates, so it counts >= k. G is the one of fewest comparisons (B·G + nc²): 32 for E = 256, k = 8.
 *
 * Weights: the CPU's arithmetic but for the order of one sum; bit for bit the router's earlier kernel (a warp a
 * token, lane l holding logits l, l + 32, ...). The max logit (the top element's), e_i =
 * exp((double)(l_i - max)) with the difference in fp32, their sum in double (warp 0, lane l over e_l, e_{l+32},
 * ... in that order, then a butterfly: the CPU adds them in index order; in double the two differ far below
 * fp32's rounding), w_j = (float)(e_j / sum), and when norm w_j / Σ_j w_j with the fp32 sum in j order from 0.
 * exp may also differ from glibc's (CUDA's double exp is within 1 ulp). A token's arithmetic is its own alone.
 *
 * Non-finite logits (the CPU's contract, ops.c; tests/test_ops.py's ref_topk_softmax and nonfinite cases):
 * - NaN ranks after every number (after -inf) and NaNs among themselves by index, so a token's choices
 *   are always k distinct indices in [0, E): the top of its numbers, then, if fewer than k, its first NaNs;
 * - the softmax term of logit l is 1 where l equals the max of the numbers (the max is the top element's, a
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

constexpr int MAX_E = 1024; /* logits per token: a thread each, a block */
constexpr int MAX_K = 32;

/* the CPU's order as one unsigned key, larger first: the logit's bits made monotonic (-0.0 as +0.0, every NaN
 * below -inf), then the index ascending; distinct indices give distinct keys */
__device__ __forceinline__ uint64_t key_of(float l, int i) {
    const uint32_t u = __float_as_uint(l);
    const uint32_t m = isnan(l) ? 0u : l == 0.0f ? 0x80000000u : u >> 31 ? ~u : u | 0x80000000u;
    return (uint64_t)m << 32 | (uint32_t)~i;
}

/* token blockIdx.x, element threadIdx.x; groups of G = 2^lg_g (32 or more), P = 2^lg_p (32 at most) threads a
 * candidate in stage 2; dynamic shared memory: route_smem(blockDim.x). one, tok: each choice (and with has_sh the
 * shared expert sh) as an expert of one token (fmc_route) where tab is given. */
__global__ void __launch_bounds__(MAX_E) route_k(const float *logits, int T, int E, int k, int norm, int lg_g,
                                                 int lg_p, int32_t *idx, float *weights, const fmc_expert *tab,
                                                 fmc_expert *one, int32_t *tok, fmc_expert sh, int has_sh) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    extern __shared__ __align__(16) uint64_t smem[];
    const int B = blockDim.x, i = threadIdx.x, t = blockIdx.x, G = 1 << lg_g, P = 1 << lg_p, kg = min(k, G);
    const int nc = (B >> lg_g) * kg;
    uint64_t *key = smem, *cand = key + B; /* every key; each group's first kg by rank in the group */
    double *ex = (double *)(cand + B);     /* the softmax terms */
    float *xs = (float *)(ex + B);         /* the logits */
    int *sel = (int *)(xs + B);            /* the choices, by rank */

    const float x = i < E ? logits[(size_t)t * E + i] : __int_as_float(0x7fffffff);
    const uint64_t kx = key_of(x, i);
    key[i] = kx, xs[i] = x;
    if (G == 32) __syncwarp(); /* stage 1 reads its group's keys only */
    else __syncthreads();

    /* stage 1: the rank in the group; ranks 0..kg-1 of each group are candidates */
    int r = 0;
    const int g0 = i & -G & -32; /* -32 tells the compiler: loads of 2 keys */
    for (int j0 = g0; j0 < g0 + G; j0 += 32)
#pragma unroll
        for (int j = 0; j < 32; j++) r += key[j0 + j] > kx;
    if (r < kg) cand[(i >> lg_g) * kg + r] = kx;
    __syncthreads();

    /* the softmax terms, from the max logit: the top of the groups' first candidates */
    uint64_t top = 0;
    for (int g = 0; g < B >> lg_g; g++) top = cand[g * kg] > top ? cand[g * kg] : top;
    const float mx = xs[(uint32_t)~top];
    if (i < E) ex[i] = x == mx ? 1.0 : exp((double)(x - mx));

    /* stage 2: candidate c's rank among the candidates, from P threads' counts */
    const int c = i >> lg_p;
    const uint64_t kc = c < nc ? cand[c] : 0;
    int rc = 0;
    for (int j = i & (P - 1); j < (c < nc ? nc : 0); j += P) rc += cand[j] > kc;
    for (int m = 1; m < P; m <<= 1) rc += __shfl_xor_sync(0xffffffffu, rc, m);
    if (c < nc && !(i & (P - 1)) && rc < k) sel[rc] = (int)~(uint32_t)kc;
    __syncthreads();
    if (i >= 32) return;

    /* warp 0: the weights, in the arithmetic of one warp holding the logits lane + 32 r */
    const int lane = i, my_i = lane < k ? sel[lane] : 0;
    double sum = 0.0;
    for (int j = lane; j < E; j += 32) sum += ex[j];
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, m);
    const float w = lane < k ? (float)(ex[my_i] / sum) : 0.0f;
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

/* The lanes of this warp whose e equals this lane's (every lane calls it) */
__device__ __forceinline__ unsigned peers_of(int e) {
#ifdef FLASHMOE_CUDA_EMU /* tests/cuda_emu: no match.any; the same mask from 32 shuffles */
    unsigned m = 0;
    for (int l = 0; l < 32; l++) m |= (unsigned)(__shfl_sync(0xffffffffu, e, l) == e) << l;
    return m;
#else
    return __match_any_sync(0xffffffffu, e);
#endif
}

/* an expert of n choices: its token tiles of bn on tensor cores (0 under big; big 0: none anywhere) */
__device__ __forceinline__ int tiles_of(int n, int big, int bn) { return big > 0 && n >= big ? (n + bn - 1) / bn : 0; }

/* fmc_route_group, one block of GW warps: choice i's expert e = idx[i] (i = t·k + j, t-major), a stable counting
 * sort. Warp w owns the choices [w·n/GW, (w+1)·n/GW), walked GU·32 at a time (GU loads in flight: the walk is
 * otherwise one load's latency a batch), a batch of 32 at a time in order: a first walk counts each expert's
 * choices in cnt[w][e], which then become the choices of e in the warps before w; a second walk places each
 * choice after those and after its own warp's earlier ones (its rank among its batch's lanes of the same e, then
 * the batch's count added). So expert e's tokens are listed in ascending order, as the host's group_by_expert
 * lists them. With has_sh the shared expert sh follows as expert E, of every token, its rows after the choices'.
 * Dynamic shared memory: group_smem(E, GW), GW = blockDim.x / 32. */
constexpr int GU = 4;
/* ev[u]: the expert of choice b + 32u + lane (-1 past hi or outside [0, E)) */
__device__ __forceinline__ void load_batches(const int32_t *idx, int b, int hi, int lane, int E, int (&ev)[GU]) {
#pragma unroll
    for (int u = 0; u < GU; u++) {
        const int i = b + 32 * u + lane, e = i < hi ? fmc_ld(idx + i) : -1;
        ev[u] = e >= 0 && e < E ? e : -1;
    }
}
__global__ void __launch_bounds__(1024) group_k(const int32_t *idx, int n, int k, int E, const fmc_expert *tab,
                                                int big, int bn, const fmc_expert sh, int has_sh, fmc_expert *ex,
                                                int32_t *tok, int32_t *rows, int2 *map, int map_n) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    extern __shared__ int gsm[];
    const int B = blockDim.x, GW = B >> 5, i0 = threadIdx.x, w = i0 >> 5, lane = i0 & 31;
    int *cnt = gsm, *tot = cnt + GW * E, *off = tot + E, *toff = off + E; /* [GW][E], [E], [E], [E + 1] */
    const int lo = (int)((long long)n * w / GW), hi = (int)((long long)n * (w + 1) / GW);
    for (int i = i0; i < GW * E; i += B) cnt[i] = 0;
    __syncthreads();
    for (int b = lo; b < hi; b += 32 * GU) { /* uniform in the warp */
        int ev[GU];
        load_batches(idx, b, hi, lane, E, ev);
#pragma unroll
        for (int u = 0; u < GU; u++) {
            const int e = ev[u];
            const unsigned p = peers_of(e);
            if (e >= 0 && 31 - __clz(p) == lane) cnt[w * E + e] += __popc(p); /* the last lane of its e in the batch */
            __syncwarp();
        }
    }
    __syncthreads();
    for (int e = i0; e < E; e += B) { /* cnt[w][e]: e's choices in the warps before w */
        int run = 0;
        for (int v = 0; v < GW; v++) {
            const int c = cnt[v * E + e];
            cnt[v * E + e] = run, run += c;
        }
        tot[e] = run;
    }
    __syncthreads();
    if (w == 0) { /* exclusive sums over the experts of their choices (off) and of their tiles (toff) */
        const int per = (E + 31) / 32, e0 = lane * per, e1 = min(e0 + per, E);
        int sc = 0, st = 0;
        for (int e = e0; e < e1; e++) sc += tot[e], st += tiles_of(tot[e], big, bn);
        int ic = sc, it = st;
        for (int o = 1; o < 32; o <<= 1) {
            const int vc = __shfl_up_sync(0xffffffffu, ic, o), vt = __shfl_up_sync(0xffffffffu, it, o);
            if (lane >= o) ic += vc, it += vt;
        }
        sc = ic - sc, st = it - st;
        for (int e = e0; e < e1; e++) {
            off[e] = sc, toff[e] = st;
            sc += tot[e], st += tiles_of(tot[e], big, bn);
        }
        if (lane == 31) toff[E] = it;
    }
    __syncthreads();
    for (int e = i0; e < E; e += B) { /* expert e's entry, and its token tiles' entries in the tile map */
        fmc_expert x = tab[e];
        x.n = tot[e], x.row0 = off[e], x.tok = tok + off[e];
        ex[e] = x;
        for (int j = toff[e]; j < toff[e + 1]; j++) map[j] = make_int2(e, j - toff[e]);
    }
    int end = toff[E]; /* the routed experts' tiles end here */
    if (has_sh) { /* the shared expert, on tokens 0..T-1 in rows [n, n + T) */
        const int T = n / k, st = tiles_of(T, big, bn);
        if (i0 == 0) {
            fmc_expert x = sh;
            x.n = T, x.row0 = n, x.tok = tok + n;
            ex[E] = x;
        }
        for (int t = i0; t < T; t += B) tok[n + t] = t;
        for (int j = i0; j < st; j += B) map[end + j] = make_int2(E, j);
        end += st;
    }
    for (int j = end + i0; j < map_n; j += B) map[j] = make_int2(-1, 0); /* past the last tile: none */
    for (int b = lo; b < hi; b += 32 * GU) {
        int ev[GU];
        load_batches(idx, b, hi, lane, E, ev);
#pragma unroll
        for (int u = 0; u < GU; u++) {
            const int i = b + 32 * u + lane, e = ev[u];
            const unsigned p = peers_of(e);
            if (e >= 0) {
                const int r = off[e] + cnt[w * E + e] + __popc(p & ((1u << lane) - 1));
                tok[r] = i / k;
                rows[i] = r;
            }
            __syncwarp();
            if (e >= 0 && 31 - __clz(p) == lane) cnt[w * E + e] += __popc(p);
            __syncwarp();
        }
    }
}

/* the block's warps for n choices of E experts: one per 256 choices (two rounds of GU batches), as many as the
 * 48 KiB of shared memory hold counts for, 32 at most; 0 where not even one fits */
int group_warps(int n, int E) {
    const long long fit = (48 * 1024 / (long long)sizeof(int) - 3LL * E - 1) / E, want = ((long long)n + 255) / 256;
    const long long w = want < fit ? want : fit;
    return fit < 1 ? 0 : w < 1 ? 1 : w > 32 ? 32 : (int)w;
}
size_t group_smem(int E, int gw) { return sizeof(int) * ((size_t)(gw + 3) * E + 1); }

size_t route_smem(int B) { return (size_t)B * (3 * sizeof(uint64_t) + sizeof(float)) + MAX_K * sizeof(int); }

} // namespace

fm_status fmc_route(cudaStream_t s, const float *logits, int T, int E, int k, int norm, int32_t *idx,
                    float *weights, const fmc_expert *tab, fmc_expert *ex, int32_t *tok, const fmc_expert *shared) {
    if (T < 0 || E < 1 || E > MAX_E || k < 1 || k > MAX_K || k > E)
        return fm_fail(FM_ERR_INVALID, "cuda backend: route of %d tokens, top %d of %d experts (1..%d experts, "
                       "k at most %d and the experts)", T, k, E, MAX_E, MAX_K);
    if (T == 0) return FM_OK;
    /* the group size 2^lg_g of least work (comparisons: B·G in stage 1, nc² in stage 2), then 2^lg_p */
    int lg_g = 0, B = 0, nc = 0;
    for (int lg = 5; 1 << lg <= MAX_E; lg++) {
        const int g = 1 << lg, b = (E + g - 1) / g * g, n = b / g * (k < g ? k : g);
        if (!lg_g || (long)b * g + (long)n * n < ((long)B << lg_g) + (long)nc * nc) lg_g = lg, B = b, nc = n;
    }
    int lg_p = 0;
    while (lg_p < 5 && nc << (lg_p + 1) <= B) lg_p++;
    const fmc_expert sh = shared ? *shared : fmc_expert{};
    fmc_launch(route_k, (unsigned)T, B, route_smem(B), s, logits, T, E, k, norm, lg_g, lg_p, idx, weights, tab, ex, tok,
               sh, (int)(shared != nullptr));
    return FM_OK;
}

fm_status fmc_route_group(cudaStream_t s, const int32_t *idx, int T, int k, int E, const fmc_expert *tab, int big,
                          int bn, const fmc_expert *shared, fmc_expert *ex, int32_t *tok, int32_t *rows, int2 *map,
                          int map_n) {
    if (T < 0 || k < 1 || E < 1 || E > MAX_E || (long long)T * k > 0x7FFFFFFF || big < 0 || bn < 1 || map_n < 0)
        return fm_fail(FM_ERR_INVALID, "cuda backend: grouping %d tokens' top %d of %d experts (1..%d)", T, k, E,
                       MAX_E);
    const int gw = group_warps(T * k, E);
    if (!gw) return fm_fail(FM_ERR_INVALID, "cuda backend: grouping the choices of %d experts: too many", E);
    const fmc_expert sh = shared ? *shared : fmc_expert{};
    fmc_launch(group_k, 1u, 32 * gw, group_smem(E, gw), s, idx, T * k, k, E, tab, big, bn, sh, (int)(shared != nullptr),
               ex, tok, rows, map, map_n);
    return FM_OK;
}
