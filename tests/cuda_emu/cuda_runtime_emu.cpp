/*
 * cuda_runtime_emu.cpp — the CUDA runtime API the backend calls (csrc/backend/cuda/cuda_ops.cu and the
 * kernels' launchers), on the host, for the CPU emulator (README.md).
 *
 * One device with 132 SMs and 8 GiB free of 16. Device memory is host memory of exactly the size asked
 * (posix_memalign: AddressSanitizer sees an overrun), filled with 0xFF bytes first (NaN: reading memory
 * nothing wrote shows), registered so cudaPointerGetAttributes tells device memory from pinned host memory
 * (cudaMallocHost, cudaHostRegister) and from pageable memory. Copies and fills whose device side is not
 * inside one allocation are errors (the process ends, saying which). Streams and events are handles only:
 * every copy, fill and kernel runs to the end when it is issued, so every wait is already satisfied.
 *
 * Fault injection (tests of the backend's error paths): FM_CUDA_EMU_FAIL=memcpy:N makes the process's N-th
 * cudaMemcpyAsync from host to device memory (counted from 1) fail, copying nothing: it returns
 * cudaErrorUnknown, which cudaGetLastError reports too, as CUDA does. Once; every other call succeeds.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <map>
#include <mutex>

#include "cuda_compat.h"

namespace fm_cuda_emu {
std::recursive_mutex &big_lock() {
    static std::recursive_mutex m;
    return m;
}
} // namespace fm_cuda_emu

using fm_cuda_emu::fail;

namespace {
std::map<uintptr_t, size_t> device_mem, host_mem; /* start -> bytes */
cudaError_t last_error = cudaSuccess;
int current_device = 0;
const size_t TOTAL = (size_t)16 << 30, FREE = (size_t)8 << 30;
size_t in_use = 0;

struct CUstream_st_ {
    unsigned magic = 0x5354524d;
};
struct CUevent_st_ {
    unsigned magic = 0x45564e54;
};

cudaError_t err(cudaError_t e) {
    if (e != cudaSuccess) last_error = e;
    return e;
}

/* the allocation of m holding [p, p + n), or nullptr */
const std::pair<const uintptr_t, size_t> *find(const std::map<uintptr_t, size_t> &m, const void *p, size_t n = 1) {
    auto it = m.upper_bound((uintptr_t)p);
    if (it == m.begin()) return nullptr;
    --it;
    const uintptr_t a = (uintptr_t)p;
    if (a >= it->first + it->second && !(it->second == 0 && a == it->first)) return nullptr;
    return &*it;
}

bool is_device(const void *p) { return find(device_mem, p) != nullptr; }

/* FM_CUDA_EMU_FAIL=memcpy:N: true for the N-th host-to-device cudaMemcpyAsync (the caller counts it) */
bool inject_memcpy_fault() {
    static const long n = [] {
        const char *e = getenv("FM_CUDA_EMU_FAIL");
        if (!e || !*e) return 0L;
        char *end = nullptr;
        const long v = strncmp(e, "memcpy:", 7) == 0 ? strtol(e + 7, &end, 10) : 0;
        if (v <= 0 || *end) fail("FM_CUDA_EMU_FAIL=%s: expected memcpy:N, N >= 1", e);
        return v;
    }();
    static long seen = 0;
    return n > 0 && ++seen == n;
}

/* a device side of a copy or fill: inside one allocation, or the process ends */
void check_device_range(const void *p, size_t n, const char *what) {
    auto *a = find(device_mem, p);
    if (!a) fail("%s: %p is not device memory", what, p);
    if ((uintptr_t)p + n > a->first + a->second)
        fail("%s: %zu bytes at offset %zu overrun a device allocation of %zu bytes", what, n,
             (size_t)((uintptr_t)p - a->first), a->second);
}

void check_stream(cudaStream_t s, const char *what) {
    if (s && ((CUstream_st_ *)s)->magic != 0x5354524d) fail("%s: not a stream", what);
}

cudaError_t copy(void *dst, const void *src, size_t n, cudaMemcpyKind k, const char *what) {
    if (!n) return cudaSuccess;
    if (!dst || !src) return err(cudaErrorInvalidValue);
    const bool dd = is_device(dst), sd = is_device(src);
    switch (k) {
    case cudaMemcpyHostToDevice:
        if (sd) fail("%s: host-to-device from device memory %p", what, src);
        check_device_range(dst, n, what);
        break;
    case cudaMemcpyDeviceToHost:
        if (dd) fail("%s: device-to-host into device memory %p", what, dst);
        check_device_range(src, n, what);
        break;
    case cudaMemcpyDeviceToDevice:
        check_device_range(dst, n, what), check_device_range(src, n, what);
        break;
    case cudaMemcpyHostToHost:
        if (dd || sd) fail("%s: host-to-host with device memory", what);
        break;
    case cudaMemcpyDefault:
        if (dd) check_device_range(dst, n, what);
        if (sd) check_device_range(src, n, what);
        break;
    default: return err(cudaErrorInvalidValue);
    }
    memmove(dst, src, n);
    return cudaSuccess;
}
} // namespace

#define LOCK std::lock_guard<std::recursive_mutex> lock_(fm_cuda_emu::big_lock())

extern "C" {

cudaError_t cudaGetDeviceCount(int *n) {
    *n = 1;
    return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) {
    if (d != 0) return err(cudaErrorInvalidDevice);
    current_device = d;
    return cudaSuccess;
}
cudaError_t cudaGetDevice(int *d) {
    *d = current_device;
    return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int *v, enum cudaDeviceAttr a, int d) {
    if (d != 0) return err(cudaErrorInvalidDevice);
    switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = 132; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = 48 << 10; return cudaSuccess;
    default: return err(cudaErrorInvalidValue);
    }
}
cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int d) {
    if (d != 0) return err(cudaErrorInvalidDevice);
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "flashmoe CPU emulator");
    p->totalGlobalMem = TOTAL, p->sharedMemPerBlock = 48 << 10;
    p->multiProcessorCount = 132, p->major = 9, p->minor = 0, p->warpSize = 32, p->maxThreadsPerBlock = 1024;
    return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t *s) { return cudaStreamCreateWithFlags(s, 0); }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned) {
    *s = (cudaStream_t) new CUstream_st_();
    return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
    check_stream(s, "cudaStreamDestroy");
    delete (CUstream_st_ *)s;
    return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    check_stream(s, "cudaStreamSynchronize");
    return cudaSuccess;
}
static void check_event(cudaEvent_t e, const char *what) {
    if (!e || ((CUevent_st_ *)e)->magic != 0x45564e54) fail("%s: not an event", what);
}
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned) {
    check_stream(s, "cudaStreamWaitEvent");
    check_event(e, "cudaStreamWaitEvent");
    return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t *e) { return cudaEventCreateWithFlags(e, 0); }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned) {
    *e = (cudaEvent_t) new CUevent_st_();
    return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
    check_event(e, "cudaEventDestroy");
    ((CUevent_st_ *)e)->magic = 0;
    delete (CUevent_st_ *)e;
    return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
    check_event(e, "cudaEventRecord");
    check_stream(s, "cudaEventRecord");
    return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    check_event(e, "cudaEventSynchronize");
    return cudaSuccess;
}
cudaError_t cudaEventQuery(cudaEvent_t e) {
    check_event(e, "cudaEventQuery");
    return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes) {
    LOCK;
    *free_bytes = in_use < FREE ? FREE - in_use : 0;
    *total_bytes = TOTAL;
    return cudaSuccess;
}
cudaError_t cudaMalloc(void **p, size_t n) {
    LOCK;
    *p = nullptr;
    if (n > FREE - in_use) return err(cudaErrorMemoryAllocation);
    void *q = nullptr;
    if (posix_memalign(&q, 256, n ? n : 1)) return err(cudaErrorMemoryAllocation);
    memset(q, 0xFF, n); /* poison: NaN */
    device_mem[(uintptr_t)q] = n;
    in_use += n;
    *p = q;
    return cudaSuccess;
}
cudaError_t cudaFree(void *p) {
    LOCK;
    if (!p) return cudaSuccess;
    auto it = device_mem.find((uintptr_t)p);
    if (it == device_mem.end()) fail("cudaFree(%p): not a cudaMalloc allocation", p);
    in_use -= it->second;
    device_mem.erase(it);
    free(p);
    return cudaSuccess;
}
cudaError_t cudaMallocHost(void **p, size_t n) {
    LOCK;
    void *q = nullptr;
    if (posix_memalign(&q, 256, n ? n : 1)) return err(cudaErrorMemoryAllocation);
    host_mem[(uintptr_t)q] = n;
    *p = q;
    return cudaSuccess;
}
cudaError_t cudaFreeHost(void *p) {
    LOCK;
    if (!p) return cudaSuccess;
    auto it = host_mem.find((uintptr_t)p);
    if (it == host_mem.end()) fail("cudaFreeHost(%p): not a cudaMallocHost allocation", p);
    host_mem.erase(it);
    free(p);
    return cudaSuccess;
}
cudaError_t cudaHostRegister(void *p, size_t n, unsigned) {
    LOCK;
    if (!p || !n) return err(cudaErrorInvalidValue);
    if (find(host_mem, p) || is_device(p)) fail("cudaHostRegister(%p): already registered or device memory", p);
    host_mem[(uintptr_t)p] = n;
    return cudaSuccess;
}
cudaError_t cudaHostUnregister(void *p) {
    LOCK;
    auto it = host_mem.find((uintptr_t)p);
    if (it == host_mem.end()) fail("cudaHostUnregister(%p): not registered", p);
    host_mem.erase(it);
    return cudaSuccess;
}
cudaError_t cudaPointerGetAttributes(struct cudaPointerAttributes *a, const void *p) {
    LOCK;
    memset(a, 0, sizeof *a);
    if (is_device(p)) a->type = cudaMemoryTypeDevice, a->devicePointer = (void *)p;
    else if (find(host_mem, p)) a->type = cudaMemoryTypeHost, a->devicePointer = a->hostPointer = (void *)p;
    else a->type = cudaMemoryTypeUnregistered;
    return cudaSuccess;
}

cudaError_t cudaMemset(void *p, int v, size_t n) {
    LOCK;
    if (!n) return cudaSuccess;
    check_device_range(p, n, "cudaMemset");
    memset(p, v, n);
    return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s) {
    check_stream(s, "cudaMemsetAsync");
    return cudaMemset(p, v, n);
}
cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, enum cudaMemcpyKind k) {
    LOCK;
    return copy(dst, src, n, k, "cudaMemcpy");
}
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, enum cudaMemcpyKind k, cudaStream_t s) {
    LOCK;
    check_stream(s, "cudaMemcpyAsync");
    const bool to_device = k == cudaMemcpyHostToDevice || (k == cudaMemcpyDefault && is_device(dst) && !is_device(src));
    if (n && to_device && inject_memcpy_fault()) return err(cudaErrorUnknown);
    return copy(dst, src, n, k, "cudaMemcpyAsync");
}

cudaError_t cudaGetLastError(void) {
    LOCK;
    const cudaError_t e = last_error;
    last_error = cudaSuccess;
    return e;
}
cudaError_t cudaPeekAtLastError(void) { return last_error; }
const char *cudaGetErrorName(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorUnknown: return "cudaErrorUnknown";
    }
    return "cudaErrorUnknown";
}
const char *cudaGetErrorString(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory (emulated device)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorUnknown: return "unknown error (injected by FM_CUDA_EMU_FAIL)";
    }
    return "unknown error";
}

} // extern "C"
