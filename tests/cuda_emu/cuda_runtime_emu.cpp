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
 * Stream capture (README.md): while a stream captures, the launches, copies and fills issued on it are recorded
 * (a launch's closure copied) into the graph cudaStreamEndCapture returns; cudaGraphLaunch runs an instantiation's
 * nodes in order, then and there. What CUDA forbids during a capture is refused and invalidates it, as strictly
 * as CUDA or more (an event recorded or waited for on a capturing stream too).
 *
 * Fault injection (tests of the backend's error paths): FM_CUDA_EMU_FAIL=memcpy:N[:MIN] makes the process's N-th
 * cudaMemcpyAsync from host to device memory (counted from 1; of at least MIN bytes) fail, copying nothing: it returns
 * cudaErrorUnknown, which cudaGetLastError reports too, as CUDA does. Once; every other call succeeds.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "cuda_compat.h"

namespace fm_cuda_emu {
std::recursive_mutex &big_lock() {
    static std::recursive_mutex m;
    return m;
}
void run_kernel(dim3 grid, dim3 block, size_t shmem, const char *name, void (*fn)(void *), void *ctx); /* emu.cpp */
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
    bool blocking = true; /* not cudaStreamNonBlocking: the legacy stream waits for it */
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

/* FM_CUDA_EMU_FAIL=memcpy:N[:MIN]: true for the N-th host-to-device cudaMemcpyAsync (of at least MIN bytes: a
 * test aims at one kind of copy, e.g. experts' and not the small uploads whose number and order depend on how
 * the expert reads happened to land) */
bool inject_memcpy_fault(size_t bytes) {
    static long n = 0, min_bytes = 0;
    static const bool parsed = [] {
        const char *e = getenv("FM_CUDA_EMU_FAIL");
        if (!e || !*e) return true;
        char *end = nullptr;
        n = strncmp(e, "memcpy:", 7) == 0 ? strtol(e + 7, &end, 10) : 0;
        if (n > 0 && *end == ':') min_bytes = strtol(end + 1, &end, 10);
        if (n <= 0 || min_bytes < 0 || *end) fail("FM_CUDA_EMU_FAIL=%s: expected memcpy:N or memcpy:N:MIN, N >= 1", e);
        return true;
    }();
    (void)parsed;
    static long seen = 0;
    return n > 0 && (long)bytes >= min_bytes && ++seen == n;
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

/* ---- stream capture */
/* A captured launch's closure: a copy of the kernel's arguments as they were at capture, owned by the node (an
 * instantiation's nodes own copies of their own; no std::shared_ptr: <memory> and cuda_compat.h's __noinline__
 * do not mix) */
struct closure {
    void (*fn)(void *) = nullptr;
    void *(*clone)(const void *) = nullptr;
    void (*destroy)(void *) = nullptr;
    void *ctx = nullptr;
    closure() = default;
    closure(void (*f)(void *), const void *c, void *(*cl)(const void *), void (*d)(void *))
        : fn(f), clone(cl), destroy(d), ctx(cl(c)) {}
    closure(const closure &o) : fn(o.fn), clone(o.clone), destroy(o.destroy), ctx(o.ctx ? o.clone(o.ctx) : nullptr) {}
    closure(closure &&o) noexcept : fn(o.fn), clone(o.clone), destroy(o.destroy), ctx(o.ctx) { o.ctx = nullptr; }
    closure &operator=(closure o) noexcept { /* o takes what this held away, to destroy it */
        std::swap(fn, o.fn), std::swap(clone, o.clone), std::swap(destroy, o.destroy), std::swap(ctx, o.ctx);
        return *this;
    }
    ~closure() {
        if (ctx) destroy(ctx);
    }
};
struct node {
    enum { KERNEL, COPY, FILL } op = KERNEL;
    dim3 grid, block;
    size_t shmem = 0, n = 0;
    const char *name = nullptr; /* a string literal (rewrite_cu.py) */
    closure k;
    void *dst = nullptr;
    const void *src = nullptr;
    cudaMemcpyKind kind = cudaMemcpyDefault;
    int value = 0;
};
struct capture {
    cudaStream_t stream;
    cudaStreamCaptureMode mode;
    std::thread::id thread; /* that began it */
    bool blocking;          /* the stream's: the legacy stream may not be used while it captures */
    bool invalidated = false;
    std::vector<node> nodes;
};
std::map<cudaStream_t, capture> captures; /* the streams capturing now */
/* captures.size(), read without the lock: the calls that took none before captures existed still take none
 * while nothing captures */
std::atomic<size_t> n_captures{0};

/* CUDA invalidates a capture on an operation it forbids: later work on the stream fails, and
 * cudaStreamEndCapture returns cudaErrorStreamCaptureInvalidated and no graph. The error code does not say which
 * call it was: stderr does. */
void invalidate(capture &c, const std::string &why) {
    if (!c.invalidated)
        fprintf(stderr, "cuda-emu: the capture on stream %p is invalidated: %s\n", (void *)c.stream, why.c_str());
    c.invalidated = true;
    c.nodes.clear();
}

/* A call that may synchronise (allocation, a synchronous copy or fill, any synchronisation or query): CUDA refuses
 * it (cudaErrorStreamCaptureUnsupported) in a thread with a capture not begun in Relaxed mode, or while another
 * thread captures in Global mode (every thread's own mode is Global: no cudaThreadExchangeStreamCaptureMode);
 * the captures that forbid it are invalidated. */
cudaError_t unsafe(const char *what) {
    const std::thread::id me = std::this_thread::get_id();
    bool refused = false;
    for (auto &sc : captures) {
        capture &c = sc.second;
        if (c.thread == me ? c.mode != cudaStreamCaptureModeRelaxed : c.mode == cudaStreamCaptureModeGlobal)
            invalidate(c, std::string(what) + (c.thread == me ? " in the capturing thread (not in Relaxed mode)"
                                                              : " in another thread (a capture in Global mode)")),
                refused = true;
    }
    return refused ? err(cudaErrorStreamCaptureUnsupported) : cudaSuccess;
}

/* Using the legacy stream (stream 0, which the synchronous copies and fills use too) while a stream not created
 * cudaStreamNonBlocking captures: it would depend on captured work (cudaErrorStreamCaptureImplicit); those
 * captures are invalidated. */
cudaError_t legacy(const std::string &what) {
    bool refused = false;
    for (auto &sc : captures)
        if (sc.second.blocking) invalidate(sc.second, what + " while a blocking stream captures"), refused = true;
    return refused ? err(cudaErrorStreamCaptureImplicit) : cudaSuccess;
}

/* a synchronous call on the legacy stream (cudaMemcpy, cudaMemset) */
cudaError_t sync_legacy(const char *what) {
    const cudaError_t e = unsafe(what);
    return e ? e : legacy(what);
}

bool pinned(const void *p, size_t n) {
    auto *a = find(host_mem, p, n);
    return a && (uintptr_t)p + n <= a->first + a->second;
}
/* A graph's copy runs when the graph does, with no staging: its host sides must be pinned (a copy from pageable
 * memory may synchronise, which a capture refuses) */
bool host_sides_pinned(const void *dst, const void *src, size_t n) {
    return (is_device(dst) || pinned(dst, n)) && (is_device(src) || pinned(src, n));
}

cudaError_t record_copy(capture &c, void *dst, const void *src, size_t n, cudaMemcpyKind k) {
    if (!host_sides_pinned(dst, src, n)) {
        invalidate(c, "cudaMemcpyAsync with pageable host memory");
        return err(cudaErrorStreamCaptureUnsupported);
    }
    node m;
    m.op = node::COPY, m.dst = dst, m.src = src, m.n = n, m.kind = k;
    c.nodes.push_back(m);
    return cudaSuccess;
}

/* a copy after its checks, or its node in rec (checked now and again when the graph runs) */
cudaError_t copy(void *dst, const void *src, size_t n, cudaMemcpyKind k, const char *what, capture *rec = nullptr) {
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
    if (rec) return record_copy(*rec, dst, src, n, k);
    memmove(dst, src, n);
    return cudaSuccess;
}

/* a fill, or its node in rec */
cudaError_t fill(void *p, int v, size_t n, const char *what, capture *rec = nullptr) {
    if (!n) return cudaSuccess;
    check_device_range(p, n, what);
    if (rec) {
        node f;
        f.op = node::FILL, f.dst = p, f.value = v, f.n = n;
        rec->nodes.push_back(f);
    } else {
        memset(p, v, n);
    }
    return cudaSuccess;
}

/* Where work issued on s goes: nullptr to run it now, or the capture recording it; *e says when it is refused
 * instead (nullptr returned): s's capture invalidated already, or s the legacy stream while a blocking one captures. */
capture *recording(cudaStream_t s, const char *what, cudaError_t *e) {
    *e = cudaSuccess;
    if (captures.empty()) return nullptr;
    auto it = captures.find(s);
    if (it == captures.end()) {
        if (!s) *e = legacy(std::string(what) + " on the legacy stream");
        return nullptr;
    }
    if (it->second.invalidated) {
        *e = err(cudaErrorStreamCaptureInvalidated);
        return nullptr;
    }
    return &it->second;
}

/* a graph's nodes, in capture order (one stream: a chain), on the calling thread */
void replay(const std::vector<node> &nodes) {
    for (const node &n : nodes) {
        switch (n.op) {
        case node::KERNEL: fm_cuda_emu::run_kernel(n.grid, n.block, n.shmem, n.name, n.k.fn, n.k.ctx); break;
        case node::COPY:
            /* still pinned and allocated now, as the GPU's copy engine reads them now */
            if (!host_sides_pinned(n.dst, n.src, n.n))
                fail("a graph's cudaMemcpyAsync of %zu bytes %p -> %p: the host side is no longer pinned (freed or "
                     "unregistered since the capture)", n.n, n.src, n.dst);
            copy(n.dst, n.src, n.n, n.kind, "a graph's cudaMemcpyAsync");
            break;
        case node::FILL: fill(n.dst, n.value, n.n, "a graph's cudaMemsetAsync"); break;
        }
    }
}

/* graphs and instantiations: handles are serial numbers, never reused nor dereferenced, so a second destroy or a
 * graph passed for an instantiation is always caught */
std::map<cudaGraph_t, std::vector<node>> graphs;
std::map<cudaGraphExec_t, std::vector<node>> execs; /* a copy of the graph's nodes: it outlives the graph */
uintptr_t handles = 0;
template <class H> H new_handle() { return (H)(uintptr_t)(0x6700000 + 16 * ++handles); }
} // namespace

namespace fm_cuda_emu {
bool capture_launch(cudaStream_t s, dim3 grid, dim3 block, size_t shmem, const char *name, void (*fn)(void *),
                    void *ctx, void *(*clone)(const void *), void (*destroy)(void *)) {
    std::lock_guard<std::recursive_mutex> lock(big_lock());
    cudaError_t e;
    capture *c = recording(s, name, &e);
    if (e) return true;
    if (!c) return false;
    node k;
    k.op = node::KERNEL, k.grid = grid, k.block = block, k.shmem = shmem, k.name = name;
    k.k = closure(fn, ctx, clone, destroy);
    c->nodes.push_back(std::move(k));
    return true;
}
} // namespace fm_cuda_emu

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
cudaError_t cudaDeviceSynchronize(void) {
    if (!n_captures) return cudaSuccess;
    LOCK;
    /* it would wait for every capturing stream: refused during any capture, whatever its mode */
    for (auto &sc : captures) invalidate(sc.second, "cudaDeviceSynchronize");
    return captures.empty() ? cudaSuccess : err(cudaErrorStreamCaptureUnsupported);
}
cudaError_t cudaDeviceGetAttribute(int *v, enum cudaDeviceAttr a, int d) {
    if (d != 0) return err(cudaErrorInvalidDevice);
    switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = 132; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = 48 << 10; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *v = 9; return cudaSuccess; /* as cudaGetDeviceProperties says */
    case cudaDevAttrComputeCapabilityMinor: *v = 0; return cudaSuccess;
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
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags) {
    CUstream_st_ *st = new CUstream_st_();
    st->blocking = !(flags & cudaStreamNonBlocking);
    *s = (cudaStream_t)st;
    return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
    check_stream(s, "cudaStreamDestroy");
    if (n_captures) {
        LOCK;
        if (captures.count(s))
            fail("cudaStreamDestroy(%p): the stream captures (cudaStreamEndCapture first)", (void *)s);
    }
    delete (CUstream_st_ *)s;
    return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    check_stream(s, "cudaStreamSynchronize");
    if (!n_captures) return cudaSuccess;
    LOCK;
    if (cudaError_t e = unsafe("cudaStreamSynchronize")) return e;
    auto it = captures.find(s);
    if (it != captures.end()) { /* its work is not scheduled, only recorded: refused whatever the mode */
        invalidate(it->second, "cudaStreamSynchronize of the capturing stream");
        return err(cudaErrorStreamCaptureUnsupported);
    }
    return s ? cudaSuccess : legacy("cudaStreamSynchronize of the legacy stream");
}
static void check_event(cudaEvent_t e, const char *what) {
    if (!e || ((CUevent_st_ *)e)->magic != 0x45564e54) fail("%s: not an event", what);
}
/* An event recorded, or waited for, on a capturing stream: refused and the capture invalidated (stricter than
 * CUDA, where it forks or joins a capture across streams: not modelled) */
static cudaError_t event_on(cudaStream_t s, const char *what) {
    cudaError_t e;
    capture *c = recording(s, what, &e);
    if (c) {
        invalidate(*c, std::string(what) + " on the capturing stream (events in a capture are not modelled)");
        e = err(cudaErrorStreamCaptureUnsupported);
    }
    return e;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned) {
    check_stream(s, "cudaStreamWaitEvent");
    check_event(e, "cudaStreamWaitEvent");
    if (!n_captures) return cudaSuccess;
    LOCK;
    return event_on(s, "cudaStreamWaitEvent");
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
    if (!n_captures) return cudaSuccess;
    LOCK;
    return event_on(s, "cudaEventRecord");
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    check_event(e, "cudaEventSynchronize");
    if (!n_captures) return cudaSuccess;
    LOCK;
    return unsafe("cudaEventSynchronize");
}
cudaError_t cudaEventQuery(cudaEvent_t e) {
    check_event(e, "cudaEventQuery");
    if (!n_captures) return cudaSuccess;
    LOCK;
    return unsafe("cudaEventQuery");
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
    if (cudaError_t e = unsafe("cudaMalloc")) return e;
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
    if (cudaError_t e = unsafe("cudaFree")) return e;
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
    if (cudaError_t e = unsafe("cudaMallocHost")) return e;
    void *q = nullptr;
    if (posix_memalign(&q, 256, n ? n : 1)) return err(cudaErrorMemoryAllocation);
    host_mem[(uintptr_t)q] = n;
    *p = q;
    return cudaSuccess;
}
cudaError_t cudaFreeHost(void *p) {
    LOCK;
    if (cudaError_t e = unsafe("cudaFreeHost")) return e;
    if (!p) return cudaSuccess;
    auto it = host_mem.find((uintptr_t)p);
    if (it == host_mem.end()) fail("cudaFreeHost(%p): not a cudaMallocHost allocation", p);
    host_mem.erase(it);
    free(p);
    return cudaSuccess;
}
cudaError_t cudaHostRegister(void *p, size_t n, unsigned) {
    LOCK;
    if (cudaError_t e = unsafe("cudaHostRegister")) return e;
    if (!p || !n) return err(cudaErrorInvalidValue);
    if (find(host_mem, p) || is_device(p)) fail("cudaHostRegister(%p): already registered or device memory", p);
    host_mem[(uintptr_t)p] = n;
    return cudaSuccess;
}
cudaError_t cudaHostUnregister(void *p) {
    LOCK;
    if (cudaError_t e = unsafe("cudaHostUnregister")) return e;
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
    if (cudaError_t e = sync_legacy("cudaMemset")) return e;
    return fill(p, v, n, "cudaMemset");
}
cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s) {
    LOCK;
    check_stream(s, "cudaMemsetAsync");
    cudaError_t e;
    capture *c = recording(s, "cudaMemsetAsync", &e);
    return e ? e : fill(p, v, n, "cudaMemset", c);
}
cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, enum cudaMemcpyKind k) {
    LOCK;
    if (cudaError_t e = sync_legacy("cudaMemcpy")) return e;
    return copy(dst, src, n, k, "cudaMemcpy");
}
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, enum cudaMemcpyKind k, cudaStream_t s) {
    LOCK;
    check_stream(s, "cudaMemcpyAsync");
    cudaError_t e;
    capture *c = recording(s, "cudaMemcpyAsync", &e);
    if (e) return e;
    const bool to_device = k == cudaMemcpyHostToDevice || (k == cudaMemcpyDefault && is_device(dst) && !is_device(src));
    if (!c && n && to_device && inject_memcpy_fault(n)) return err(cudaErrorUnknown);
    return copy(dst, src, n, k, "cudaMemcpyAsync", c);
}

/* ---- stream capture and graphs */
cudaError_t cudaStreamBeginCapture(cudaStream_t s, enum cudaStreamCaptureMode mode) {
    LOCK;
    check_stream(s, "cudaStreamBeginCapture");
    if (mode != cudaStreamCaptureModeGlobal && mode != cudaStreamCaptureModeThreadLocal &&
        mode != cudaStreamCaptureModeRelaxed)
        return err(cudaErrorInvalidValue);
    if (!s) return err(cudaErrorStreamCaptureUnsupported); /* the legacy stream cannot capture */
    if (captures.count(s)) return err(cudaErrorIllegalState);
    capture &c = captures[s];
    n_captures = captures.size();
    c.stream = s, c.mode = mode, c.thread = std::this_thread::get_id(), c.blocking = ((CUstream_st_ *)s)->blocking;
    return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *graph) {
    LOCK;
    check_stream(s, "cudaStreamEndCapture");
    if (!graph) return err(cudaErrorInvalidValue);
    auto it = captures.find(s);
    if (it == captures.end()) return err(cudaErrorIllegalState);
    capture &c = it->second;
    if (c.mode != cudaStreamCaptureModeRelaxed && c.thread != std::this_thread::get_id())
        return err(cudaErrorStreamCaptureWrongThread);
    const bool valid = !c.invalidated;
    *graph = nullptr;
    if (valid) {
        *graph = new_handle<cudaGraph_t>();
        graphs[*graph] = std::move(c.nodes);
    }
    captures.erase(it);
    n_captures = captures.size();
    return valid ? cudaSuccess : err(cudaErrorStreamCaptureInvalidated);
}
cudaError_t cudaStreamIsCapturing(cudaStream_t s, enum cudaStreamCaptureStatus *status) {
    LOCK;
    check_stream(s, "cudaStreamIsCapturing");
    if (!status) return err(cudaErrorInvalidValue);
    if (!s)
        for (auto &sc : captures)
            if (sc.second.blocking) return err(cudaErrorStreamCaptureImplicit);
    auto it = captures.find(s);
    *status = it == captures.end()       ? cudaStreamCaptureStatusNone
            : it->second.invalidated ? cudaStreamCaptureStatusInvalidated
                                     : cudaStreamCaptureStatusActive;
    return cudaSuccess;
}
cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long flags) {
    LOCK;
    if (!exec || !graph) return err(cudaErrorInvalidValue);
    auto it = graphs.find(graph);
    if (it == graphs.end()) fail("cudaGraphInstantiate(%p): not a graph (destroyed already?)", (void *)graph);
    if (flags & ~15ull) return err(cudaErrorInvalidValue); /* the flags, none of which changes anything here */
    *exec = new_handle<cudaGraphExec_t>();
    execs[*exec] = it->second;
    return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s) {
    LOCK;
    if (!exec) return err(cudaErrorInvalidValue);
    auto it = execs.find(exec);
    if (it == execs.end()) fail("cudaGraphLaunch(%p): not an instantiated graph (destroyed already?)", (void *)exec);
    check_stream(s, "cudaGraphLaunch");
    cudaError_t e;
    if (capture *c = recording(s, "cudaGraphLaunch", &e)) {
        /* CUDA would capture it as a child graph: not modelled */
        invalidate(*c, "cudaGraphLaunch on the capturing stream");
        return err(cudaErrorStreamCaptureUnsupported);
    }
    if (e) return e;
    replay(it->second);
    return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
    LOCK;
    if (!exec) return err(cudaErrorInvalidValue);
    if (!execs.erase(exec))
        fail("cudaGraphExecDestroy(%p): not an instantiated graph (destroyed already?)", (void *)exec);
    return cudaSuccess;
}
cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
    LOCK;
    if (!graph) return err(cudaErrorInvalidValue);
    if (!graphs.erase(graph)) fail("cudaGraphDestroy(%p): not a graph (destroyed already?)", (void *)graph);
    return cudaSuccess;
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
    case cudaErrorIllegalState: return "cudaErrorIllegalState";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
    case cudaErrorStreamCaptureMerge: return "cudaErrorStreamCaptureMerge";
    case cudaErrorStreamCaptureUnmatched: return "cudaErrorStreamCaptureUnmatched";
    case cudaErrorStreamCaptureUnjoined: return "cudaErrorStreamCaptureUnjoined";
    case cudaErrorStreamCaptureIsolation: return "cudaErrorStreamCaptureIsolation";
    case cudaErrorStreamCaptureImplicit: return "cudaErrorStreamCaptureImplicit";
    case cudaErrorCapturedEvent: return "cudaErrorCapturedEvent";
    case cudaErrorStreamCaptureWrongThread: return "cudaErrorStreamCaptureWrongThread";
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
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorIllegalState: return "the operation cannot be performed in the present state";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    case cudaErrorStreamCaptureMerge: return "operation would result in a merge of separate capture sequences";
    case cudaErrorStreamCaptureUnmatched: return "capture was not ended in the same stream as it began";
    case cudaErrorStreamCaptureUnjoined: return "capturing stream has unjoined work";
    case cudaErrorStreamCaptureIsolation: return "dependency created on uncaptured work in another stream";
    case cudaErrorStreamCaptureImplicit:
        return "operation would make the legacy stream depend on a capturing blocking stream";
    case cudaErrorCapturedEvent: return "operation not permitted on an event last recorded in a capturing stream";
    case cudaErrorStreamCaptureWrongThread:
        return "attempt to terminate a thread-local capture sequence from another thread";
    case cudaErrorUnknown: return "unknown error (injected by FM_CUDA_EMU_FAIL)";
    }
    return "unknown error";
}

} // extern "C"
