/*
 * selftest.cu — the emulator's own tests (tests/test_cuda_emu.py): kernels right and kernels broken on purpose,
 * as CUDA source, rewritten (rewrite_cu.py) and compiled with the emulator like the backend's.
 * `selftest CASE` runs one case and prints its result; the broken ones end the process (exit 3) with the
 * emulator's message, or print a result that is wrong (NaN: shared memory read before any lane wrote it) or
 * that depends on the lanes' order (FM_CUDA_EMU_ORDER).
 */
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define THREADS 128

/* a block's sum: a tree over shared memory, then a warp's xor butterfly; BARRIER 0 leaves the barriers out */
template <bool BARRIER> __global__ void block_sum(const float *__restrict__ x, float *__restrict__ out, int n) {
    __shared__ float part[THREADS];
    float v = 0.0f;
    for (int i = blockIdx.x * THREADS + threadIdx.x; i < n; i += gridDim.x * THREADS) v += x[i];
    part[threadIdx.x] = v;
    if (BARRIER) __syncthreads();
    for (int w = THREADS / 2; w >= 32; w >>= 1) {
        if ((int)threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
        if (BARRIER) __syncthreads();
    }
    if (threadIdx.x < 32) {
        float s = part[threadIdx.x];
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (threadIdx.x == 0) out[blockIdx.x] = s;
    }
}

__global__ void early_return(float *out) {
    __shared__ float a[THREADS];
    if (threadIdx.x >= 64) return; /* half the block leaves before the barrier */
    a[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = a[THREADS - 1 - threadIdx.x];
}

__global__ void shuffle_exited(float *out) {
    if (threadIdx.x & 1) return;
    out[threadIdx.x] = __shfl_sync(0xffffffffu, 1.0f, 0);
}

__global__ void too_much_shared(float *out) {
    __shared__ float big[16384]; /* 64 KiB */
    big[threadIdx.x] = 0.0f;
    __syncthreads();
    out[threadIdx.x] = big[threadIdx.x];
}

__global__ void last_writer(int *out) { out[0] = threadIdx.x; } /* a race: which lane writes last */

/* dynamic shared memory, __shfl_down_sync and __shfl_sync, the exact intrinsics */
__global__ void misc(const uint32_t *in, int *out) {
    extern __shared__ int dyn[];
    const int t = threadIdx.x;
    dyn[t] = t * 3;
    __syncthreads();
    int v = dyn[31 - t];
    v += __shfl_down_sync(0xffffffffu, v, 1); /* lane 31 keeps its own */
    v = __shfl_sync(0xffffffffu, v, (t + 5) & 31);
    out[t] = v;
    if (t == 0) {
        out[32] = (int)__byte_perm(in[0], in[1], 0x7531);
        out[33] = __float2int_rn(2.5f) * 100 + __float2int_rn(-3.5f);
        out[34] = (int)__float_as_uint(__half2float(__ushort_as_half((unsigned short)0x0001))); /* 2^-24 */
        out[35] = (int)__float_as_uint(__half2float(__ushort_as_half((unsigned short)0xC248))); /* -3.140625 */
    }
}

static float *dev_floats(const float *h, int n) {
    float *d = nullptr;
    cudaMalloc((void **)&d, sizeof(float) * n);
    if (h) cudaMemcpy(d, h, sizeof(float) * n, cudaMemcpyHostToDevice);
    return d;
}

int main(int argc, char **argv) {
    const char *c = argc > 1 ? argv[1] : "";
    cudaStream_t s;
    cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    float hx[1000];
    for (int i = 0; i < 1000; i++) hx[i] = (float)(i % 7) - 3.0f;
    float *x = dev_floats(hx, 1000), *out = dev_floats(nullptr, THREADS), r[4];
    if (!strcmp(c, "sum") || !strcmp(c, "sum_no_barrier")) {
        if (!strcmp(c, "sum")) block_sum<true><<<4, THREADS, 0, s>>>(x, out, 1000);
        else block_sum<false><<<4, THREADS, 0, s>>>(x, out, 1000);
        cudaMemcpyAsync(r, out, sizeof r, cudaMemcpyDeviceToHost, s);
        cudaStreamSynchronize(s);
        double ref = 0.0;
        for (int i = 0; i < 1000; i++) ref += hx[i];
        printf("sum %g ref %g\n", (double)(r[0] + r[1] + r[2] + r[3]), ref);
    } else if (!strcmp(c, "early_return")) {
        early_return<<<1, THREADS, 0, s>>>(out);
    } else if (!strcmp(c, "shuffle_exited")) {
        shuffle_exited<<<1, 32, 0, s>>>(out);
    } else if (!strcmp(c, "too_much_shared")) {
        too_much_shared<<<1, 32>>>(out);
    } else if (!strcmp(c, "copy_overrun")) {
        cudaMemcpy(out, hx, sizeof(float) * (THREADS + 1), cudaMemcpyHostToDevice);
    } else if (!strcmp(c, "last_writer")) {
        last_writer<<<1, 64, 0, s>>>((int *)out);
        int w;
        cudaMemcpy(&w, out, sizeof w, cudaMemcpyDeviceToHost);
        printf("last_writer %d\n", w);
    } else if (!strcmp(c, "misc")) {
        const uint32_t hin[2] = {0x33221100u, 0x77665544u};
        uint32_t *in = nullptr;
        int *o = nullptr, ho[36];
        cudaMalloc((void **)&in, sizeof hin);
        cudaMalloc((void **)&o, sizeof ho);
        cudaMemcpy(in, hin, sizeof hin, cudaMemcpyHostToDevice);
        misc<<<1, 32, 32 * sizeof(int), s>>>(in, o);
        cudaMemcpy(ho, o, sizeof ho, cudaMemcpyDeviceToHost);
        for (int i = 0; i < 36; i++) printf("%s%d", i ? " " : "misc ", ho[i]);
        printf("\n");
    } else {
        fprintf(stderr, "unknown case %s\n", c);
        return 2;
    }
    return cudaGetLastError() == cudaSuccess ? 0 : 1;
}
