/*
 * selftest.cu — the emulator's own tests (tests/test_cuda_emu.py): kernels right and kernels broken on purpose,
 * as CUDA source, rewritten (rewrite_cu.py) and compiled with the emulator like the backend's.
 * `selftest CASE` runs one case and prints its result; the broken ones end the process (exit 3) with the
 * emulator's message, or print a result that is wrong (NaN: shared memory read before any lane wrote it) or
 * that depends on the lanes' order (FM_CUDA_EMU_ORDER). The graph cases capture a stream and replay the graph,
 * or do what a capture forbids.
 */
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <thread>

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

/* cp.async as the emulator models it (fm_cuda_emu's calls, which matmul_mma.cu's cp16/cp4 make under the emulator):
 * each lane copies 4 bytes of x into shared memory and reads them back before its wait (out[i]), after waiting
 * for all but the newest group (out[32 + i]: the second copy's group is newer) and after waiting for all (out[64 +
 * i]); NO_WAIT returns with a copy never waited for. */
template <bool NO_WAIT> __global__ void cp_async_order(const int *x, int *out) {
    __shared__ int a[32], b[32];
    const int i = threadIdx.x;
    a[i] = -1, b[i] = -1;
    fm_cuda_emu::cp_async(&a[i], &x[i], 4);
    fm_cuda_emu::cp_commit();
    fm_cuda_emu::cp_async(&b[i], &x[32 + i], 4);
    fm_cuda_emu::cp_commit();
    out[i] = a[i];
    if (NO_WAIT) return;
    fm_cuda_emu::cp_wait(1);
    out[32 + i] = a[i] + b[i];
    fm_cuda_emu::cp_wait(0);
    out[64 + i] = b[i];
}

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

/* ---- stream capture and graphs */
#define GN 64

__global__ void axpb(const float *x, float *y, float a, float b, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + b;
}

__global__ void add_into(const float *x, float *y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += x[i];
}

/* c = 2 hin + 1 (reset first), *hsum = its sum: in a function of its own, so the launches' frames are gone when
 * the graph runs */
static void step(cudaStream_t s, const float *hin, float *a, float *b, float *c, float *sum, float *hsum) {
    const float k = 2.0f;
    cudaMemcpyAsync(a, hin, sizeof(float) * GN, cudaMemcpyHostToDevice, s);
    axpb<<<2, 32, 0, s>>>(a, b, k, 1.0f, GN);
    cudaMemsetAsync(c, 0, sizeof(float) * GN, s);
    add_into<<<1, GN, 0, s>>>(b, c, GN);
    block_sum<true><<<1, THREADS, 0, s>>>(c, sum, GN);
    cudaMemcpyAsync(hsum, sum, sizeof(float), cudaMemcpyDeviceToHost, s);
}

/* captured, nothing runs; replayed twice, each run reads the pinned input as it is then */
static void graph_replays(cudaStream_t s) {
    float *hin, *hsum, *a, *b, *c, *sum, five[GN], ha[GN], hb[GN], hc[GN];
    cudaMallocHost((void **)&hin, sizeof(float) * GN);
    cudaMallocHost((void **)&hsum, sizeof(float));
    for (int i = 0; i < GN; i++) five[i] = 5.0f, hin[i] = 1.0f;
    *hsum = -1.0f;
    a = dev_floats(nullptr, GN), b = dev_floats(nullptr, GN), c = dev_floats(five, GN), sum = dev_floats(nullptr, 1);
    cudaMemset(a, 0, sizeof(float) * GN);
    cudaMemset(b, 0, sizeof(float) * GN);
    cudaStreamCaptureStatus during, after;
    cudaGraph_t g = nullptr;
    cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal);
    cudaStreamIsCapturing(s, &during);
    step(s, hin, a, b, c, sum, hsum);
    const cudaError_t e = cudaStreamEndCapture(s, &g);
    cudaStreamIsCapturing(s, &after);
    cudaMemcpy(ha, a, sizeof ha, cudaMemcpyDeviceToHost);
    cudaMemcpy(hb, b, sizeof hb, cudaMemcpyDeviceToHost);
    cudaMemcpy(hc, c, sizeof hc, cudaMemcpyDeviceToHost);
    printf("captured %s %d %d %g %g %g %g\n", cudaGetErrorName(e), (int)during, (int)after, ha[0], hb[GN - 1], hc[0],
           *hsum);
    cudaGraphExec_t exec;
    cudaGraphInstantiate(&exec, g, 0);
    cudaGraphDestroy(g); /* the instantiation does not need it */
    for (int r = 0; r < 2; r++) {
        for (int i = 0; i < GN; i++) hin[i] = r ? -0.5f * i : (float)i;
        const cudaError_t le = cudaGraphLaunch(exec, s);
        cudaStreamSynchronize(s);
        cudaMemcpy(hc, c, sizeof hc, cudaMemcpyDeviceToHost);
        printf("replay %s %g %g %g\n", cudaGetErrorName(le), *hsum, hc[0], hc[GN - 1]);
    }
    cudaGraphExecDestroy(exec);
    cudaFree(a), cudaFree(b), cudaFree(c), cudaFree(sum);
    cudaFreeHost(hin), cudaFreeHost(hsum);
}

/* A forbidden call in a capture: its error, the stream's capture status after it, the next launch's error,
 * cudaStreamEndCapture's and whether it made a graph. Then the stream works as before. */
static void graph_refusals(cudaStream_t s, const float *x, float *out) {
    static const char *what[] = {"cudaStreamSynchronize", "cudaMemcpy", "cudaMalloc", "cudaMemcpyAsync_pageable",
                                 "cudaEventRecord", "cudaStreamWaitEvent", "cudaDeviceSynchronize",
                                 "cudaGraphLaunch"};
    float *pin, page[4];
    cudaMallocHost((void **)&pin, sizeof(float) * 4);
    cudaEvent_t ev;
    cudaEventCreate(&ev);
    cudaGraph_t g;
    cudaGraphExec_t exec;
    cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal);
    block_sum<true><<<4, THREADS, 0, s>>>(x, out, 1000);
    cudaStreamEndCapture(s, &g);
    cudaGraphInstantiate(&exec, g);
    for (int i = 0; i < (int)(sizeof what / sizeof *what); i++) {
        cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal);
        block_sum<true><<<4, THREADS, 0, s>>>(x, out, 1000);
        void *p = (void *)1;
        const cudaError_t e = i == 0 ? cudaStreamSynchronize(s)
                            : i == 1 ? cudaMemcpy(pin, out, sizeof(float), cudaMemcpyDeviceToHost)
                            : i == 2 ? cudaMalloc(&p, 16)
                            : i == 3 ? cudaMemcpyAsync(page, out, sizeof page, cudaMemcpyDeviceToHost, s)
                            : i == 4 ? cudaEventRecord(ev, s)
                            : i == 5 ? cudaStreamWaitEvent(s, ev, 0)
                            : i == 6 ? cudaDeviceSynchronize()
                                     : cudaGraphLaunch(exec, s);
        cudaStreamCaptureStatus st;
        cudaStreamIsCapturing(s, &st);
        block_sum<true><<<4, THREADS, 0, s>>>(x, out, 1000);
        const cudaError_t launch = cudaGetLastError();
        cudaGraph_t gi = (cudaGraph_t)&g;
        const cudaError_t end = cudaStreamEndCapture(s, &gi);
        printf("%s %s %d %s %s %s%s\n", what[i], cudaGetErrorName(e), (int)st, cudaGetErrorName(launch),
               cudaGetErrorName(end), gi ? "graph" : "null", i == 2 && p ? " p" : "");
    }
    cudaGetLastError();
    /* Relaxed: allocation allowed, a synchronisation of the capturing stream still not */
    void *p = nullptr;
    cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed);
    const cudaError_t m = cudaMalloc(&p, 16), f = cudaFree(p), y = cudaStreamSynchronize(s);
    printf("relaxed %s %s %s %s\n", cudaGetErrorName(m), cudaGetErrorName(f), cudaGetErrorName(y),
           cudaGetErrorName(cudaStreamEndCapture(s, &g)));
    /* another thread: refused during a Global capture, not during a ThreadLocal one */
    cudaError_t other[2];
    for (int i = 0; i < 2; i++) {
        cudaStreamBeginCapture(s, i ? cudaStreamCaptureModeThreadLocal : cudaStreamCaptureModeGlobal);
        std::thread([&] {
            void *q = nullptr;
            other[i] = cudaMalloc(&q, 16);
            cudaFree(q);
        }).join();
        cudaStreamEndCapture(s, &g);
        if (g) cudaGraphDestroy(g);
    }
    printf("threads %s %s\n", cudaGetErrorName(other[0]), cudaGetErrorName(other[1]));
    /* the legacy stream: refused while a blocking stream captures, not while a non-blocking one does */
    cudaStream_t blocking;
    cudaStreamCreate(&blocking);
    cudaStreamBeginCapture(blocking, cudaStreamCaptureModeGlobal);
    block_sum<true><<<4, THREADS>>>(x, out, 1000);
    const cudaError_t l1 = cudaGetLastError(), l1end = cudaStreamEndCapture(blocking, &g);
    cudaGetLastError();
    cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal);
    block_sum<true><<<4, THREADS>>>(x, out, 1000);
    const cudaError_t l2 = cudaGetLastError(), l2end = cudaStreamEndCapture(s, &g);
    cudaGraphDestroy(g);
    printf("legacy %s %s %s %s\n", cudaGetErrorName(l1), cudaGetErrorName(l1end), cudaGetErrorName(l2),
           cudaGetErrorName(l2end));
    /* a graph launched on another stream during a capture runs */
    float r[4] = {0, 0, 0, 0};
    cudaMemset(out, 0, sizeof(float) * THREADS);
    cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal);
    const cudaError_t o = cudaGraphLaunch(exec, blocking);
    cudaMemcpyAsync(pin, out, sizeof(float) * 4, cudaMemcpyDeviceToHost, blocking);
    const cudaError_t oend = cudaStreamEndCapture(s, &g);
    cudaGraphDestroy(g);
    printf("other_stream %s %g %s\n", cudaGetErrorName(o), (double)(pin[0] + pin[1] + pin[2] + pin[3]),
           cudaGetErrorName(oend));
    /* and s works as before */
    cudaStreamCaptureStatus st;
    cudaStreamIsCapturing(s, &st);
    block_sum<true><<<4, THREADS, 0, s>>>(x, out, 1000);
    cudaMemcpyAsync(r, out, sizeof r, cudaMemcpyDeviceToHost, s);
    cudaStreamSynchronize(s);
    printf("after %d %g\n", (int)st, (double)(r[0] + r[1] + r[2] + r[3]));
    cudaGraphExecDestroy(exec);
    cudaStreamDestroy(blocking);
    cudaEventDestroy(ev);
    cudaFreeHost(pin);
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
    } else if (!strcmp(c, "cp_async") || !strcmp(c, "cp_async_no_wait")) {
        int h[96], *d = nullptr;
        for (int i = 0; i < 64; i++) h[i] = i;
        cudaMalloc((void **)&d, sizeof h);
        cudaMemcpy(d, h, 64 * sizeof(int), cudaMemcpyHostToDevice);
        if (!strcmp(c, "cp_async")) cp_async_order<false><<<1, 32, 0, s>>>(d, d);
        else cp_async_order<true><<<1, 32, 0, s>>>(d, d);
        cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost);
        printf("cp_async %d %d %d\n", h[5], h[32 + 5], h[64 + 5]);
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
        cudaFree(in), cudaFree(o);
    } else if (!strcmp(c, "graph")) {
        graph_replays(s);
    } else if (!strcmp(c, "graph_refusals")) {
        graph_refusals(s, x, out);
    } else if (!strcmp(c, "graph_destroy_twice") || !strcmp(c, "graph_early_return") ||
               !strcmp(c, "graph_freed_host")) {
        float *pin;
        cudaMallocHost((void **)&pin, sizeof(float) * THREADS);
        cudaGraph_t g;
        cudaGraphExec_t exec;
        cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal);
        if (!strcmp(c, "graph_early_return")) early_return<<<1, THREADS, 0, s>>>(out);
        else cudaMemcpyAsync(out, pin, sizeof(float) * THREADS, cudaMemcpyHostToDevice, s);
        cudaStreamEndCapture(s, &g);
        cudaGraphInstantiate(&exec, g);
        cudaGraphDestroy(g);
        if (!strcmp(c, "graph_destroy_twice")) cudaGraphDestroy(g);
        if (!strcmp(c, "graph_freed_host")) cudaFreeHost(pin);
        cudaGraphLaunch(exec, s); /* early_return: the divergent barrier shows now */
    } else {
        fprintf(stderr, "unknown case %s\n", c);
        return 2;
    }
    cudaFree(x), cudaFree(out), cudaStreamDestroy(s); /* leak-free under LeakSanitizer */
    return cudaGetLastError() == cudaSuccess ? 0 : 1;
}
