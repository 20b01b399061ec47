/*
 * cuda_compat.h — the CUDA surface the backend's sources use (csrc/backend/cuda/), as plain C++17 for the CPU
 * emulator (README.md). Force-included before each rewritten source (rewrite_cu.py), as nvcc includes
 * cuda_runtime.h; include/cuda_runtime.h and include/cuda_fp16.h resolve here too.
 *
 * Device side: the execution-space keywords as nothing, the built-in positions as globals the scheduler sets
 * before it resumes a lane (lanes are fibers of one OS thread), __syncthreads / warp shuffles / __syncwarp as
 * scheduling points (emu.cpp), and the intrinsics with their exact IEEE results (fp32 arithmetic, fmaf fused,
 * round to nearest even). Host side: the runtime API the table calls, stream capture and graphs included
 * (cuda_runtime_emu.cpp).
 */
#ifndef FM_CUDA_COMPAT_H
#define FM_CUDA_COMPAT_H

#ifdef __cplusplus
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

/* ---- keywords */
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
/* __shared__ never reaches the compiler: rewrite_cu.py turns each declaration into fm_cuda_emu::shared */

/* ---- vector types */
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 { unsigned x, y, z; };
struct __align__(16) uint4 { unsigned x, y, z, w; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(8) float2 { float x, y; };
struct __align__(8) uint2 { unsigned x, y; };
struct __align__(8) int2 { int x, y; };
static inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }
static inline uint2 make_uint2(unsigned a, unsigned b) { return uint2{a, b}; }
static inline int4 make_int4(int a, int b, int c, int d) { return int4{a, b, c, d}; }
static inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
static inline float2 make_float2(float a, float b) { return float2{a, b}; }
static inline int2 make_int2(int a, int b) { return int2{a, b}; }

/* ---- the built-in positions: the running lane's (set by the scheduler before each resume) */
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
enum { warpSize = 32 };

/* ---- runtime types (cuda_runtime_emu.cpp) */
typedef struct CUstream_st *cudaStream_t;
typedef struct CUevent_st *cudaEvent_t;
typedef struct CUgraph_st *cudaGraph_t;
typedef struct CUgraphExec_st *cudaGraphExec_t;
enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorIllegalState = 401,
    cudaErrorNoDevice = 100,
    cudaErrorNotReady = 600, /* never returned here: everything has run by the time a call returns */
    cudaErrorStreamCaptureUnsupported = 900,
    cudaErrorStreamCaptureInvalidated = 901,
    cudaErrorStreamCaptureMerge = 902,
    cudaErrorStreamCaptureUnmatched = 903,
    cudaErrorStreamCaptureUnjoined = 904,
    cudaErrorStreamCaptureIsolation = 905,
    cudaErrorStreamCaptureImplicit = 906,
    cudaErrorCapturedEvent = 907,
    cudaErrorStreamCaptureWrongThread = 908,
    cudaErrorUnknown = 999,
};
typedef enum cudaError cudaError_t;
enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4
};
enum cudaMemoryType { cudaMemoryTypeUnregistered = 0, cudaMemoryTypeHost = 1, cudaMemoryTypeDevice = 2,
                      cudaMemoryTypeManaged = 3 };
struct cudaPointerAttributes {
    enum cudaMemoryType type;
    int device;
    void *devicePointer, *hostPointer;
};
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlock = 8,
                     cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrComputeCapabilityMinor = 76 };
struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem, sharedMemPerBlock;
    int multiProcessorCount, major, minor, warpSize, maxThreadsPerBlock;
};
enum cudaStreamCaptureMode { cudaStreamCaptureModeGlobal = 0, cudaStreamCaptureModeThreadLocal = 1,
                             cudaStreamCaptureModeRelaxed = 2 };
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1,
                               cudaStreamCaptureStatusInvalidated = 2 };
enum cudaGraphInstantiateFlags { cudaGraphInstantiateFlagAutoFreeOnLaunch = 1, cudaGraphInstantiateFlagUpload = 2,
                                 cudaGraphInstantiateFlagDeviceLaunch = 4,
                                 cudaGraphInstantiateFlagUseNodePriority = 8 };
#define cudaStreamDefault 0x00
#define cudaStreamNonBlocking 0x01
#define cudaEventDefault 0x00
#define cudaEventDisableTiming 0x02
#define cudaHostRegisterDefault 0x00
#define cudaHostAllocDefault 0x00

extern "C" {
cudaError_t cudaGetDeviceCount(int *n);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaGetDevice(int *d);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaDeviceGetAttribute(int *v, enum cudaDeviceAttr a, int d);
cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int d);
cudaError_t cudaStreamCreate(cudaStream_t *s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags);
cudaError_t cudaEventCreate(cudaEvent_t *e);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventQuery(cudaEvent_t e);
cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes);
cudaError_t cudaMalloc(void **p, size_t n);
cudaError_t cudaFree(void *p);
cudaError_t cudaMallocHost(void **p, size_t n);
cudaError_t cudaFreeHost(void *p);
cudaError_t cudaHostRegister(void *p, size_t n, unsigned flags);
cudaError_t cudaHostUnregister(void *p);
cudaError_t cudaPointerGetAttributes(struct cudaPointerAttributes *a, const void *p);
cudaError_t cudaMemset(void *p, int v, size_t n);
cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, enum cudaMemcpyKind k);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, enum cudaMemcpyKind k, cudaStream_t s);
cudaError_t cudaStreamBeginCapture(cudaStream_t s, enum cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *graph);
cudaError_t cudaStreamIsCapturing(cudaStream_t s, enum cudaStreamCaptureStatus *status);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long flags = 0);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec);
cudaError_t cudaGraphDestroy(cudaGraph_t graph);
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char *cudaGetErrorString(cudaError_t e);
const char *cudaGetErrorName(cudaError_t e);
}
template <class T> static inline cudaError_t cudaMalloc(T **p, size_t n) { return cudaMalloc((void **)p, n); }
template <class T> static inline cudaError_t cudaMallocHost(T **p, size_t n) { return cudaMallocHost((void **)p, n); }

/* ---- the scheduler (emu.cpp) */
namespace fm_cuda_emu {
[[noreturn]] void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void launch_impl(dim3 grid, dim3 block, size_t shmem, cudaStream_t s, const char *name, void (*fn)(void *), void *ctx,
                 void *(*clone)(const void *), void (*destroy)(void *));
/* kernel<<<grid, block, shmem, s>>>(args) as rewrite_cu.py writes it: f calls the kernel. clone and destroy let
 * a capturing stream keep a copy of f (the arguments' values at capture) for the graph's replays. */
template <class F> void launch(dim3 grid, dim3 block, size_t shmem, cudaStream_t s, const char *name, F f) {
    launch_impl(grid, block, shmem, s, name, [](void *p) { (*(F *)p)(); }, &f,
                [](const void *p) -> void * { return new F(*(const F *)p); }, [](void *p) { delete (F *)p; });
}
/* the block's allocation for one __shared__ declaration (key: a static of the declaration) */
void *shared_alloc(const void *key, size_t bytes, size_t align);
template <class T, size_t A> inline T &shared(const void *key) { return *(T *)shared_alloc(key, sizeof(T), A); }
void *dynamic_shared(void); /* extern __shared__: the launch's dynamic shared memory */
void syncthreads(void);
void syncwarp(unsigned mask);
/* cp.async's copies, commit_group and wait_group (emu.cpp: at once, or late) */
void cp_async(void *dst, const void *src, size_t n);
void cp_commit(void);
void cp_wait(int n);
enum shfl_kind { SHFL_IDX, SHFL_XOR, SHFL_DOWN, SHFL_UP };
/* every lane of the warp posts 8 bytes and reads those of lane src(kind, arg, width) */
uint64_t shfl(unsigned mask, uint64_t v, int kind, int arg, int width);
template <class T> inline T shfl_t(unsigned mask, T v, int kind, int arg, int width) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "a shuffle of more than 8 bytes");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof v);
    u = shfl(mask, u, kind, arg, width);
    T r;
    memcpy(&r, &u, sizeof r);
    return r;
}
} // namespace fm_cuda_emu

static inline void __syncthreads(void) { fm_cuda_emu::syncthreads(); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) { fm_cuda_emu::syncwarp(mask); }
template <class T> static inline T __shfl_sync(unsigned m, T v, int src, int w = 32) {
    return fm_cuda_emu::shfl_t(m, v, fm_cuda_emu::SHFL_IDX, src, w);
}
template <class T> static inline T __shfl_xor_sync(unsigned m, T v, int mask, int w = 32) {
    return fm_cuda_emu::shfl_t(m, v, fm_cuda_emu::SHFL_XOR, mask, w);
}
template <class T> static inline T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32) {
    return fm_cuda_emu::shfl_t(m, v, fm_cuda_emu::SHFL_DOWN, (int)d, w);
}
template <class T> static inline T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32) {
    return fm_cuda_emu::shfl_t(m, v, fm_cuda_emu::SHFL_UP, (int)d, w);
}

/* ---- intrinsics: exact results */
template <class T> static inline T __ldg(const T *p) { return *p; }
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
static inline int __float_as_int(float f) { int u; memcpy(&u, &f, 4); return u; }
/* result byte n = byte (s >> 4n) & 7 of the 8 bytes y:x (x the low four) */
static inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const uint64_t b = (uint64_t)y << 32 | x;
    unsigned r = 0;
    for (int n = 0; n < 4; n++) r |= (unsigned)(b >> (8 * ((s >> (4 * n)) & 7)) & 0xFF) << (8 * n);
    return r;
}
/* round to nearest even, saturating; NaN is 0 (cvt.rni.s32.f32) */
static inline int __float2int_rn(float x) {
    if (x != x) return 0;
    if (x >= 2147483647.0f) return 2147483647;
    if (x <= -2147483648.0f) return (-2147483647 - 1);
    return (int)nearbyintf(x);
}
/* the _rn operations are never contracted: with -ffp-contract=off (CMake) neither is anything else */
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline float __frcp_rn(float a) { return 1.0f / a; }
static inline float __fsqrt_rn(float a) { return sqrtf(a); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
static inline float __saturatef(float x) { return x != x ? 0.0f : x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x; }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
static inline int __ffs(int x) { return __builtin_ffs(x); }

/* CUDA's device min/max overloads */
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
static inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }

/* ---- half: storage only, converted exactly */
struct __half {
    unsigned short x;
};
static inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
static inline unsigned short __half_as_ushort(__half h) { return h.x; }
static inline float __half2float(__half h) {
    const unsigned sign = (unsigned)(h.x & 0x8000) << 16;
    unsigned e = (h.x >> 10) & 0x1f, m = h.x & 0x3ff, u;
    if (e == 0x1f) u = sign | 0x7f800000u | (m << 13);
    else if (e) u = sign | ((e + 112) << 23) | (m << 13);
    else if (!m) u = sign;
    else { /* subnormal: normalise */
        e = 113;
        while (!(m & 0x400)) m <<= 1, e--;
        u = sign | (e << 23) | ((m & 0x3ff) << 13);
    }
    return __uint_as_float(u);
}

#endif /* __cplusplus */
#endif /* FM_CUDA_COMPAT_H */
