/*
 * attention.cu — causal GQA attention over the KV cache (cpu.h's fm_cpu_attention) as flash-decoding: for
 * query t (position pos0 + t) and head h, out = Σ_j softmax_j(scale · q·k_j) v_j over cache positions
 * j <= pos0 + t of KV head h / (nh / nkv). As the CPU: fp32 scores (the dot, then × scale), the softmax
 * online with the running max subtracted, exp as 0 below -87 (fm_exp), one division at the end.
 *
 * A query's keys are cut into blocks of KB positions counted from 0 (block c: [c·KB, (c+1)·KB)), so the
 * cut depends on the key position alone, never on T or on how many blocks the call has. Two kernels:
 *   attn_partial  one CUDA block per (group of HG heads of one KV head, key block, token): warp w takes keys
 *                 c·KB + w, + WARPS, ... (the next one's K and V rows loaded while one is computed), each
 *                 K/V row once for the HG heads, each head with its own online softmax (lane l holds dims
 *                 4l..4l+3 and 128+4l..128+4l+3; a score is a butterfly sum over the warp); the warps'
 *                 partials (max, sum, values) meet in shared memory and merge in warp order into the
 *                 head's partial (M, L, O[hd]) for the key block, in scratch. HG (4, 2, 1) only shares loads:
 *                 a head's arithmetic is the same for each, so the launcher picks it by grid size;
 *   attn_combine  one CUDA block per (head, token): the query's partials merged in block order against
 *                 their common max.
 * A query always takes both (one block of keys too), so its bits are fixed by its position, head dim and
 * data alone: the same alone (decode) as inside any prefill (batch invariance). Long calls run in slices of
 * tokens that reuse the scratch, which bounds it (fmc_attention_scratch_floats) without changing a bit.
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

constexpr int KB = 256;                 /* keys per block, at multiples of KB in absolute position */
constexpr int WARPS = 8;                /* warps per attn_partial block */
constexpr int THREADS = WARPS * 32;     /* = MAX_HD: the block merge gives each thread one dim */
constexpr int MAX_HD = 256;             /* 8 dims per lane */
constexpr int MAX_CHUNKS = 65535;       /* key blocks in gridDim.y */
constexpr int MAX_SLICE = 65535;        /* tokens per slice in gridDim.z */
constexpr int PARTIAL_BLOCKS = 512;     /* attn_partial blocks wanted at least (some 4 per SM) */
constexpr size_t MAX_PART_FLOATS = (size_t)16 << 20; /* partials of a slice (64 MiB) past one token's */

/* "no max yet": finite, so a difference with it is never inf - inf; minus any real score it is below -87 */
constexpr float NO_MAX = -3.40282347e38f;

__device__ __forceinline__ float att_exp(float x) { return x < -87.0f ? 0.0f : expf(x); }

/* This lane's 8 dims of row p (0 past hd) in slot order: x[4i + e] = p[128i + 4·lane + e]. V4 loads them as
 * two float4 (p 16-byte aligned, hd % 4 == 0), else one float at a time: the same values in the same slots,
 * so the arithmetic after it (and the bits) does not depend on the path. */
template <bool V4>
__device__ __forceinline__ void load_row(const float *p, int hd, int lane, float (&x)[8]) {
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int d = 128 * i + 4 * lane;
        if (V4) {
            const float4 v = d < hd ? *reinterpret_cast<const float4 *>(p + d) : make_float4(0.f, 0.f, 0.f, 0.f);
            x[4 * i] = v.x, x[4 * i + 1] = v.y, x[4 * i + 2] = v.z, x[4 * i + 3] = v.w;
        } else {
#pragma unroll
            for (int e = 0; e < 4; e++) x[4 * i + e] = d + e < hd ? p[d + e] : 0.0f;
        }
    }
}

/* Pass 1: key block c = blockIdx.y of query t0 + blockIdx.z, for the HG heads HG·blockIdx.x .. (of one KV
 * head: HG divides nh / nkv); each head's partial (M, L, O[hd]) to part[tl, h, c] (2 + hd floats; tl =
 * blockIdx.z, nchunks blocks per (tl, h)). A K and V row is loaded once for the HG heads; each head's
 * arithmetic is its own, the same whatever HG. Blocks past the query's keys do nothing. Every query reads
 * only cache rows < pos0 + t + 1: the rows the call filled. */
template <bool V4, int HG>
__global__ void __launch_bounds__(THREADS, 2) attn_partial(float *part, const float *q, const float *k_cache,
                                                        const float *v_cache, int t0, int pos0, const int *dpos,
                                                        int nh, int nkv, int hd, float scale, int nchunks) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    __shared__ float pm[HG][WARPS], pl[HG][WARPS];
    __shared__ __align__(16) float po[HG][WARPS][MAX_HD];
    const int h0 = blockIdx.x * HG, c = blockIdx.y, tl = blockIdx.z, t = t0 + tl;
    if (dpos) pos0 = *dpos;
    const int n = pos0 + t + 1, c0 = c * KB; /* query t sees keys [0, n) */
    if (c0 >= n) return;                     /* the whole block, before any barrier */
    const int c1 = min(c0 + KB, n);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, kvh = h0 / (nh / nkv);
    const bool hi = hd > 128; /* slots 4..7 hold dims; else they are 0 and skipped */
    const size_t stride = (size_t)nkv * hd; /* from one position's row of a KV head to the next */
    const float *kb = k_cache + (size_t)kvh * hd, *vb = v_cache + (size_t)kvh * hd;

    float qv[HG][8], o[HG][8], m[HG], l[HG];
#pragma unroll
    for (int g = 0; g < HG; g++) {
        load_row<V4>(q + ((size_t)t * nh + h0 + g) * hd, hd, lane, qv[g]);
#pragma unroll
        for (int x = 0; x < 8; x++) o[g][x] = 0.0f;
        m[g] = NO_MAX, l[g] = 0.0f;
    }
    /* key j's rows in kv, vv; key j + WARPS's loads in flight while j is computed (the last loads itself) */
    float kv[8], vv[8];
    load_row<V4>(kb + (size_t)min(c0 + warp, c1 - 1) * stride, hd, lane, kv);
    load_row<V4>(vb + (size_t)min(c0 + warp, c1 - 1) * stride, hd, lane, vv);
    for (int j = c0 + warp; j < c1; j += WARPS) { /* the same trip count for every lane of the warp */
        const int jn = j + WARPS < c1 ? j + WARPS : j;
        float kn[8], vn[8], s[HG];
        load_row<V4>(kb + (size_t)jn * stride, hd, lane, kn);
        load_row<V4>(vb + (size_t)jn * stride, hd, lane, vn);
#pragma unroll
        for (int g = 0; g < HG; g++) {
            s[g] = 0.0f;
#pragma unroll
            for (int x = 0; x < 8; x++)
                if (x < 4 || hi) s[g] = fmaf(qv[g][x], kv[x], s[g]);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) /* the same bits in every lane */
#pragma unroll
            for (int g = 0; g < HG; g++) s[g] += __shfl_xor_sync(0xffffffffu, s[g], off);
#pragma unroll
        for (int g = 0; g < HG; g++) {
            const float sg = s[g] * scale;
            if (sg > m[g]) { /* rescale what was summed under the old max */
                const float r = att_exp(m[g] - sg);
                l[g] *= r;
#pragma unroll
                for (int x = 0; x < 8; x++) o[g][x] *= r;
                m[g] = sg;
            }
            const float p = att_exp(sg - m[g]);
            l[g] += p;
#pragma unroll
            for (int x = 0; x < 8; x++)
                if (x < 4 || hi) o[g][x] = fmaf(p, vv[x], o[g][x]);
        }
#pragma unroll
        for (int x = 0; x < 8; x++) kv[x] = kn[x], vv[x] = vn[x];
    }
    /* the warp's partials; a warp without keys (a block of fewer than WARPS) has max NO_MAX, sum 0, values 0 */
#pragma unroll
    for (int g = 0; g < HG; g++) {
        if (lane == 0) pm[g][warp] = m[g], pl[g][warp] = l[g];
#pragma unroll
        for (int i = 0; i < 2; i++)
            *reinterpret_cast<float4 *>(&po[g][warp][128 * i + 4 * lane]) =
                make_float4(o[g][4 * i], o[g][4 * i + 1], o[g][4 * i + 2], o[g][4 * i + 3]);
    }
    __syncthreads();
    /* merged in warp order against the block's max (warp 0 has key c0, so M is a score); thread d: dim d */
    const int d = threadIdx.x;
#pragma unroll
    for (int g = 0; g < HG; g++) {
        float M = pm[g][0];
#pragma unroll
        for (int w = 1; w < WARPS; w++) M = fmaxf(M, pm[g][w]);
        float L = 0.0f, O = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) {
            const float e = att_exp(pm[g][w] - M);
            L = fmaf(pl[g][w], e, L);
            O = fmaf(po[g][w][d], e, O);
        }
        float *pp = part + (((size_t)tl * nh + h0 + g) * nchunks + c) * (2 + hd);
        if (d == 0) pp[0] = M, pp[1] = L;
        if (d < hd) pp[2 + d] = O;
    }
}

/* Pass 2: query t0 + blockIdx.y, head blockIdx.x, thread d: dim d. Its (pos0 + t) / KB + 1 partials merged
 * in block order against their max, then the one division. */
__global__ void __launch_bounds__(MAX_HD) attn_combine(float *out, const float *part,
                                                       int t0, int pos0, const int *dpos, int nh, int hd,
                                                       int nchunks) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    const int h = blockIdx.x, tl = blockIdx.y, t = t0 + tl, d = threadIdx.x;
    if (d >= hd) return; /* no barrier below */
    if (dpos) pos0 = *dpos;
    const int nc = (pos0 + t) / KB + 1;
    const size_t sz = 2 + (size_t)hd;
    const float *p = part + ((size_t)tl * nh + h) * nchunks * sz;
    float M = p[0];
#pragma unroll 8
    for (int c = 1; c < nc; c++) M = fmaxf(M, p[c * sz]);
    float L = 0.0f, O = 0.0f;
#pragma unroll 8
    for (int c = 0; c < nc; c++) {
        const float *pc = p + c * sz;
        const float e = att_exp(pc[0] - M);
        L = fmaf(pc[1], e, L);
        O = fmaf(pc[2 + d], e, O);
    }
    out[((size_t)t * nh + h) * hd + d] = O / L;
}

/* The call's plan: key blocks of its last query (the most of any), tokens per slice, and the scratch of a
 * slice in floats. */
struct att_plan {
    int nchunks, slice;
    size_t floats;
};

att_plan plan_of(int T, int pos0, int nh, int hd) {
    att_plan a;
    a.nchunks = (int)(((long long)pos0 + T + KB - 1) / KB);
    const size_t per_token = (size_t)nh * a.nchunks * (2 + (size_t)hd);
    const size_t fit = MAX_PART_FLOATS / per_token;
    a.slice = (int)(fit < 1 ? 1 : (fit < (size_t)T ? fit : (size_t)T));
    if (a.slice > MAX_SLICE) a.slice = MAX_SLICE;
    a.floats = (size_t)a.slice * per_token;
    return a;
}

bool aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

/* attn_partial with hg (4, 2 or 1) heads a block */
template <bool V4, typename... A> void launch_partial(cudaStream_t s, int hg, dim3 grid, A... a) {
    if (hg == 4)
        fmc_launch(attn_partial<V4, 4>, grid, THREADS, 0, s, a...);
    else if (hg == 2)
        fmc_launch(attn_partial<V4, 2>, grid, THREADS, 0, s, a...);
    else
        fmc_launch(attn_partial<V4, 1>, grid, THREADS, 0, s, a...);
}

} // namespace

size_t fmc_attention_scratch_floats(int T, int pos0, int nh, int hd) {
    if (T < 1 || pos0 < 0 || nh < 1 || hd < 1) return 0;
    return plan_of(T, pos0, nh, hd).floats;
}

size_t fmc_attention_scratch_cap_floats(void) { return MAX_PART_FLOATS; }

int fmc_attention_key_block(void) { return KB; }

fm_status fmc_attention(cudaStream_t s, float *out, const float *q, const float *k_cache, const float *v_cache, int T,
                        int pos0, const int *dpos, int nh, int nkv, int hd, float scale, float *scratch) {
    if (T < 0 || pos0 < 0 || nh < 1 || nkv < 1 || nh % nkv || hd < 1 || hd > MAX_HD ||
        (long long)pos0 + T > (long long)KB * MAX_CHUNKS)
        return fm_fail(FM_ERR_INVALID,
                       "cuda backend: attention of %d tokens from position %d, %d heads over %d KV heads, head_dim "
                       "%d (head_dim 1..%d, heads a multiple of the KV heads, at most %d positions)",
                       T, pos0, nh, nkv, hd, MAX_HD, KB * MAX_CHUNKS);
    if (T == 0) return FM_OK;
    if (!scratch) return fm_fail(FM_ERR_INVALID, "cuda backend: attention without its scratch");
    const att_plan a = plan_of(T, pos0, nh, hd);
    /* the float4 loads where every row is 16-byte aligned; the bits are the same either way (load_row) */
    const bool v4 = hd % 4 == 0 && aligned16(q) && aligned16(k_cache) && aligned16(v_cache);
    /* heads a block (4, 2 or 1, dividing a KV head's): the most that still leaves PARTIAL_BLOCKS blocks, or
     * 1; each K and V row is loaded once for them. A head's bits are the same for each (attn_partial). */
    const int G = nh / nkv;
    int hg = G % 4 == 0 ? 4 : (G % 2 == 0 ? 2 : 1);
    while (hg > 1 && (long long)(nh / hg) * a.nchunks * a.slice < PARTIAL_BLOCKS) hg /= 2;
    for (int t0 = 0; t0 < T; t0 += a.slice) { /* a slice's partials are read before the next one's are written */
        const int ts = T - t0 < a.slice ? T - t0 : a.slice;
        const int nc = (int)(((long long)pos0 + t0 + ts + KB - 1) / KB); /* this slice's last query's blocks */
        const dim3 grid((unsigned)(nh / hg), (unsigned)nc, (unsigned)ts); /* the heads of a key block run together */
        if (v4)
            launch_partial<true>(s, hg, grid, scratch, q, k_cache, v_cache, t0, pos0, dpos, nh, nkv, hd, scale, nc);
        else
            launch_partial<false>(s, hg, grid, scratch, q, k_cache, v_cache, t0, pos0, dpos, nh, nkv, hd, scale, nc);
        fmc_launch(attn_combine, dim3((unsigned)nh, (unsigned)ts), (unsigned)((hd + 31) / 32 * 32), 0, s, out, scratch,
                   t0, pos0, dpos, nh, hd, nc);
    }
    return FM_OK;
}
