/*
 * eltwise.cu — the CUDA backend's element-wise and row ops: norms, RoPE, the gates, the copies that split
 * and gather rows, the causal conv1d and the MoE combine. Each is the CPU op of the same name (cpu.h,
 * backend_cpu.c) with the same formula, one thread per output element unless a row reduction needs a
 * block; a row's reduction order depends on the row alone (batch invariance).
 */
#include "cuda_kernels.h"
#include "eltwise.cuh"
#include "launch.cuh"

namespace {

constexpr int THREADS = 256;
constexpr int CONV_FUSED_T = 4; /* conv1d calls of up to this many tokens: one kernel, a thread per channel */

unsigned blocks_for(size_t n) { return (unsigned)((n + THREADS - 1) / THREADS); }

/* A thread's loads of a row in flight at once: a loop of one load an iteration waits for each in turn (a decode
 * step's rmsnorm, one block over a row of 2048: 8 loads one after another, 4.4 us on an H100) */
constexpr int ROW_LOADS = 8;

/* The sum of squares of a row in double, as the CPU takes it (its fp32 result then rounds once): each thread
 * strides the row (its elements loaded ROW_LOADS at a time, added in order), a butterfly sums each warp (the
 * same bits in its every lane), then every thread adds the warps' sums in warp order. blockDim.x: a multiple of
 * 32, at most THREADS. */
__device__ double row_sum_sq(const float *x, int n) {
    __shared__ double part[THREADS / 32];
    double ss = 0.0;
    const int step = blockDim.x;
    for (int i0 = threadIdx.x; i0 < n; i0 += ROW_LOADS * step) {
        float v[ROW_LOADS];
#pragma unroll
        for (int j = 0; j < ROW_LOADS; j++) v[j] = i0 + j * step < n ? x[i0 + j * step] : 0.0f;
#pragma unroll
        for (int j = 0; j < ROW_LOADS; j++)
            if (i0 + j * step < n) ss += (double)v[j] * v[j];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
    __syncthreads();
    double total = 0.0;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) total += part[w];
    __syncthreads(); /* part is free again for a caller that reduces twice */
    return total;
}

/* out[t] = x[t] * rsqrt(mean(x²) + eps) * (1 + w) or * w; a block per row */
__global__ void rmsnorm_k(float *out, const float *x, const float *w, int n, float eps, int zc) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    const size_t r = blockIdx.x;
    const float *xr = x + r * n;
    float *o = out + r * n;
    const double ss = row_sum_sq(xr, n);
    const float inv = 1.0f / sqrtf((float)(ss / n) + eps);
    const int step = blockDim.x;
    for (int i0 = threadIdx.x; i0 < n; i0 += ROW_LOADS * step) { /* loads first, as row_sum_sq's */
        float xv[ROW_LOADS], wv[ROW_LOADS];
#pragma unroll
        for (int j = 0; j < ROW_LOADS; j++) {
            const int i = i0 + j * step;
            xv[j] = i < n ? xr[i] : 0.0f, wv[j] = i < n ? w[i] : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < ROW_LOADS; j++)
            if (i0 + j * step < n) o[i0 + j * step] = xv[j] * inv * (zc ? 1.0f + wv[j] : wv[j]);
    }
}

__global__ void l2norm_k(float *x, int n, float eps, float scale) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    float *xr = x + (size_t)blockIdx.x * n;
    const double ss = row_sum_sq(xr, n);
    const float inv = scale / sqrtf((float)ss + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) xr[i] *= inv;
}

/* NeoX rotate-half on dims [0, rot) of each head; the angle in double as the CPU takes it. Grid: (pairs of
 * the half, heads, tokens). */
__global__ void rope_k(float *x, int heads, int hd, int rot, int pos0, const int *dpos, float theta) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    const int half = rot / 2, i = blockIdx.x * blockDim.x + threadIdx.x, h = blockIdx.y, t = blockIdx.z;
    if (i >= half) return;
    if (dpos) pos0 = *dpos;
    const float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)rot);
    const double ang = (double)(pos0 + t) * (double)inv_freq;
    const float c = (float)cos(ang), s = (float)sin(ang);
    float *xh = x + ((size_t)t * heads + h) * hd;
    const float x1 = xh[i], x2 = xh[i + half];
    xh[i] = x1 * c - x2 * s;
    xh[i + half] = x2 * c + x1 * s;
}

/* cache rows [*pos, *pos + n / row) ← src (kv_write at a position read from device memory: a replayed step's) */
__global__ void kv_write_k(float *cache, const float *src, const int *pos, size_t n, int row) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) cache[(size_t)*pos * row + i] = src[i];
}

__global__ void silu_mul_k(float *out, const float *g, const float *u, size_t n) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = fmc_silu_mul(g[i], u[i]);
}

__global__ void sigmoid_mul_k(float *out, const float *g, const float *x, size_t n) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = x[i] * fmc_sigmoid(g[i]);
}

__global__ void add_k(float *x, const float *y, size_t n) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

/* q2 [T·nh, 2·hd] → q, gate [T·nh, hd] */
__global__ void split_q_gate_k(float *q, float *gate, const float *q2, size_t rows, int hd) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * hd) return;
    const size_t r = i / hd, j = i % hd;
    q[i] = q2[r * 2 * hd + j];
    gate[i] = q2[r * 2 * hd + hd + j];
}

/* conv [T, 2·kd + vd] → q, k [T, kd], v [T, vd] */
__global__ void deltanet_split_k(float *q, float *k, float *v, const float *conv, int T, int kd, int vd) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    const size_t row = 2 * (size_t)kd + vd, i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)T * row) return;
    const size_t t = i / row, j = i % row;
    const float val = conv[i];
    if (j < (size_t)kd) q[t * kd + j] = val;
    else if (j < 2 * (size_t)kd) k[t * kd + j - kd] = val;
    else v[t * vd + j - 2 * kd] = val;
}

/* b → sigmoid(b), a → -exp(A_log)·softplus(a + dt_bias), [T, Hv] */
__global__ void deltanet_gates_k(float *b, float *a, const float *A_log, const float *dt_bias, int T, int Hv) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)T * Hv) return;
    const int h = (int)(i % Hv);
    b[i] = fmc_sigmoid(b[i]);
    const float z = a[i] + dt_bias[h];
    a[i] = -expf(A_log[h]) * (z > 20.0f ? z : log1pf(expf(z)));
}

__global__ void gate_rows_k(float *out, const float *g, int n, size_t total) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) out[i] *= fmc_sigmoid(g[i / n]);
}

/* out[t, i] += Σ_j w[t, j]·ye[row[t, j], i], j in order */
__global__ void moe_combine_k(float *out, const float *ye, const int32_t *row, const float *wt, int T, int k, int h) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)T * h) return;
    const size_t t = i / h;
    out[i] = fmc_combine(out[i], ye, row + t * k, wt + t * k, k, h, i % h);
}

__global__ void gather_rows_k(float *dst, const float *src, const int32_t *rows, int n, int cols) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n * cols) return;
    dst[i] = src[(size_t)rows[i / cols] * cols + i % cols];
}

/* Causal depthwise conv, then SiLU: out[t, c] = silu(Σ_j w[c, j]·in[t - (K-1) + j, c]), in = [state | x], the taps
 * in order. */
__device__ __forceinline__ float conv_tap_silu(const float *x, const float *state, const float *w, int t, int c, int C,
                                               int K) {
    const int S = K - 1;
    float acc = 0.0f;
    for (int j = 0; j < K; j++) {
        const int src = t - S + j; /* < 0: from the state */
        const float v = src >= 0 ? x[(size_t)src * C + c] : state[(size_t)(S + src) * C + c];
        acc += w[(size_t)c * K + j] * v;
    }
    return acc / (1.0f + expf(-acc));
}

/* A thread per (token, channel); the state moves on in a second kernel, after every token has read the old one. */
__global__ void conv1d_silu_k(float *out, const float *x, const float *state, const float *w, int T, int C, int K) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)T * C) return;
    out[i] = conv_tap_silu(x, state, w, (int)(i / C), (int)(i % C), C, K);
}

/* The new state [K-1, C]: the last K-1 inputs of [state | x]; a thread per channel, rows in rising order
 * (a row moved up is read before it is written). */
__device__ __forceinline__ void conv_state(const float *x, float *state, int c, int T, int C, int K) {
    for (int s = 0; s < K - 1; s++) {
        const int src = T - (K - 1) + s; /* position in x, < 0: an older state row */
        state[(size_t)s * C + c] = src >= 0 ? x[(size_t)src * C + c] : state[(size_t)(s + T) * C + c];
    }
}

__global__ void conv1d_state_k(const float *x, float *state, int T, int C, int K) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < C) conv_state(x, state, c, T, C, K);
}

/* Both in one launch where a thread per channel has work enough (decode, short calls): a channel's tokens, then its
 * state, which only this thread reads. The same arithmetic per output. */
__global__ void conv1d_silu_state_k(float *out, const float *x, float *state, const float *w, int T, int C, int K) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    for (int t = 0; t < T; t++) out[(size_t)t * C + c] = conv_tap_silu(x, state, w, t, c, C, K);
    conv_state(x, state, c, T, C, K);
}

/* The greedy token (the sampler's argmax: the lowest id holding the largest value, NaN never, 0 when all are
 * NaN) as the largest 64-bit key: the value's bits made to order as unsigned (-0 as +0, so the two tie as they
 * compare equal) above the complement of the id. A max over keys is the same whichever order it takes them in. */
__device__ __forceinline__ unsigned long long argmax_key(float v, int i) {
    if (v != v) return 0; /* NaN: below every key of a number */
    const unsigned b = __float_as_uint(v == 0.0f ? 0.0f : v), u = b & 0x80000000u ? ~b : b | 0x80000000u;
    return (unsigned long long)u << 32 | (0xFFFFFFFFu - (unsigned)i);
}

/* the largest key of the block's threads, in every thread (blockDim.x: THREADS) */
__device__ unsigned long long block_max_key(unsigned long long k) {
    __shared__ unsigned long long part[THREADS / 32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long v = __shfl_xor_sync(0xffffffffu, k, o);
        k = v > k ? v : k;
    }
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = k;
    __syncthreads();
    for (int w = 0; w < THREADS / 32; w++) k = part[w] > k ? part[w] : k;
    return k;
}

/* keys[b]: the largest key of x's ARGMAX_SPAN entries from b·ARGMAX_SPAN */
constexpr int ARGMAX_SPAN = THREADS * 16;
__global__ void argmax_part_k(unsigned long long *keys, const float *x, int n) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    const int i0 = blockIdx.x * ARGMAX_SPAN, end = min(n, i0 + ARGMAX_SPAN);
    unsigned long long k = 0;
    for (int i = i0 + threadIdx.x; i < end; i += THREADS) {
        const unsigned long long v = argmax_key(x[i], i);
        k = v > k ? v : k;
    }
    k = block_max_key(k);
    if (threadIdx.x == 0) keys[blockIdx.x] = k;
}

/* *out: the id of the largest of keys [nb] (0 when every key is 0: all NaN) */
__global__ void argmax_final_k(int32_t *out, const unsigned long long *keys, int nb) {
    fmc_pdl_wait(), fmc_pdl_trigger();
    unsigned long long k = 0;
    for (int b = threadIdx.x; b < nb; b += THREADS) k = keys[b] > k ? keys[b] : k;
    k = block_max_key(k);
    if (threadIdx.x == 0) *out = k ? (int32_t)(0xFFFFFFFFu - (unsigned)k) : 0;
}

} // namespace

extern "C" {

fm_status fmc_rmsnorm(cudaStream_t s, float *out, const float *x, const float *w, int T, int n, float eps, int zc) {
    if (T > 0) fmc_launch(rmsnorm_k, T, THREADS, 0, s, out, x, w, n, eps, zc);
    return FM_OK;
}

fm_status fmc_l2norm(cudaStream_t s, float *x, int T, int n, float eps, float scale) {
    if (T > 0) fmc_launch(l2norm_k, T, THREADS, 0, s, x, n, eps, scale);
    return FM_OK;
}

fm_status fmc_rope(cudaStream_t s, float *x, int T, int heads, int hd, int rot, int pos0, const int *dpos, float theta) {
    if (rot > hd || rot % 2)
        return fm_fail(FM_ERR_INVALID, "cuda backend: rope over %d of %d dims (needs an even count <= head_dim)", rot, hd);
    if (T <= 0 || heads <= 0 || rot == 0) return FM_OK;
    if (T > 65535 || heads > 65535)
        return fm_fail(FM_ERR_INVALID, "cuda backend: rope over %d tokens of %d heads (at most 65535 each)", T, heads);
    const dim3 grid((unsigned)((rot / 2 + 63) / 64), (unsigned)heads, (unsigned)T);
    fmc_launch(rope_k, grid, 64, 0, s, x, heads, hd, rot, pos0, dpos, theta);
    return FM_OK;
}

fm_status fmc_silu_mul(cudaStream_t s, float *out, const float *gate, const float *up, size_t n) {
    if (n) fmc_launch(silu_mul_k, blocks_for(n), THREADS, 0, s, out, gate, up, n);
    return FM_OK;
}

fm_status fmc_sigmoid_mul(cudaStream_t s, float *out, const float *gate, const float *x, size_t n) {
    if (n) fmc_launch(sigmoid_mul_k, blocks_for(n), THREADS, 0, s, out, gate, x, n);
    return FM_OK;
}

fm_status fmc_add(cudaStream_t s, float *x, const float *y, size_t n) {
    if (n) fmc_launch(add_k, blocks_for(n), THREADS, 0, s, x, y, n);
    return FM_OK;
}

fm_status fmc_split_q_gate(cudaStream_t s, float *q, float *gate, const float *q2, int T, int nh, int hd) {
    const size_t rows = (size_t)T * nh;
    if (rows && hd > 0) fmc_launch(split_q_gate_k, blocks_for(rows * hd), THREADS, 0, s, q, gate, q2, rows, hd);
    return FM_OK;
}

fm_status fmc_kv_write(cudaStream_t s, float *cache, const float *src, int pos0, const int *dpos, int T, int row) {
    const size_t bytes = sizeof(float) * (size_t)T * row;
    if (dpos) { /* the row's address is known on the device alone: a kernel, not a copy */
        if (bytes)
            fmc_launch(kv_write_k, blocks_for((size_t)T * row), THREADS, 0, s, cache, src, dpos, (size_t)T * row, row);
        return FM_OK;
    }
    if (bytes && cudaMemcpyAsync(cache + (size_t)pos0 * row, src, bytes, cudaMemcpyDeviceToDevice, s) != cudaSuccess)
        return fm_fail(FM_ERR_DEVICE, "cuda backend: kv_write copy failed");
    return FM_OK;
}

fm_status fmc_conv1d_silu(cudaStream_t s, float *out, const float *x, float *state, const float *w, int T, int C, int K) {
    if (K < 1) return fm_fail(FM_ERR_INVALID, "cuda backend: conv1d with kernel %d", K);
    if (T <= 0 || C <= 0) return FM_OK;
    if (T <= CONV_FUSED_T) {
        fmc_launch(conv1d_silu_state_k, blocks_for((size_t)C), THREADS, 0, s, out, x, state, w, T, C, K);
        return FM_OK;
    }
    fmc_launch(conv1d_silu_k, blocks_for((size_t)T * C), THREADS, 0, s, out, x, state, w, T, C, K);
    if (K > 1) fmc_launch(conv1d_state_k, blocks_for((size_t)C), THREADS, 0, s, x, state, T, C, K);
    return FM_OK;
}

fm_status fmc_deltanet_split(cudaStream_t s, float *q, float *k, float *v, const float *conv, int T, int kd, int vd) {
    const size_t n = (size_t)T * (2 * (size_t)kd + vd);
    if (n) fmc_launch(deltanet_split_k, blocks_for(n), THREADS, 0, s, q, k, v, conv, T, kd, vd);
    return FM_OK;
}

fm_status fmc_deltanet_gates(cudaStream_t s, float *b, float *a, const float *A_log, const float *dt_bias, int T,
                             int Hv) {
    const size_t n = (size_t)T * Hv;
    if (n) fmc_launch(deltanet_gates_k, blocks_for(n), THREADS, 0, s, b, a, A_log, dt_bias, T, Hv);
    return FM_OK;
}

fm_status fmc_gate_rows(cudaStream_t s, float *out, const float *g, int T, int n) {
    const size_t total = (size_t)T * n;
    if (total) fmc_launch(gate_rows_k, blocks_for(total), THREADS, 0, s, out, g, n, total);
    return FM_OK;
}

fm_status fmc_moe_combine(cudaStream_t s, float *out, const float *ye, const int32_t *row, const float *weights, int T,
                          int k, int h) {
    const size_t n = (size_t)T * h;
    if (n && k > 0) fmc_launch(moe_combine_k, blocks_for(n), THREADS, 0, s, out, ye, row, weights, T, k, h);
    return FM_OK;
}

fm_status fmc_gather_rows(cudaStream_t s, float *dst, const float *src, const int32_t *rows, int n, int cols) {
    const size_t total = (size_t)n * cols;
    if (total) fmc_launch(gather_rows_k, blocks_for(total), THREADS, 0, s, dst, src, rows, n, cols);
    return FM_OK;
}

size_t fmc_argmax_scratch_bytes(int n) {
    return n > 0 ? sizeof(unsigned long long) * (size_t)((n + ARGMAX_SPAN - 1) / ARGMAX_SPAN) : 0;
}

fm_status fmc_argmax(cudaStream_t s, int32_t *out, const float *x, int n, void *scratch) {
    if (n <= 0 || !out || !x || !scratch) return fm_fail(FM_ERR_INVALID, "cuda backend: argmax over %d values", n);
    const unsigned nb = (unsigned)((n + ARGMAX_SPAN - 1) / ARGMAX_SPAN);
    fmc_launch(argmax_part_k, nb, THREADS, 0, s, (unsigned long long *)scratch, x, n);
    fmc_launch(argmax_final_k, 1, THREADS, 0, s, out, (const unsigned long long *)scratch, (int)nb);
    return FM_OK;
}

} // extern "C"
