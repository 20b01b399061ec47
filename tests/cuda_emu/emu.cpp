/*
 * emu.cpp — the CUDA emulator's scheduler (README.md): runs a launch on the CPU, one fiber per lane.
 *
 * Blocks run one after another; inside one, every lane (thread) is a fiber on its own stack (on x86-64 a
 * context switch of our own, as tests/metal_emu/emu.cpp; swapcontext elsewhere). A round resumes each
 * runnable lane, in the chosen order, until it returns or waits: at __syncthreads, or at a warp function
 * (__shfl*_sync, __syncwarp). Between rounds a warp whose 32 lanes all wait at a warp function is released
 * (each lane reading the value its source lane posted), and the block is released from __syncthreads once
 * all its lanes wait there. Anything else that blocks every lane is an error and ends the process: a lane
 * that returned while others wait at __syncthreads (divergent barrier) or at a warp function, lanes of one
 * warp at different warp functions, a partial mask.
 *
 * Shared memory: one exact allocation per __shared__ declaration per block (and one for the launch's
 * dynamic shared memory), filled with 0xFF bytes (NaN) first, so reading what no lane wrote shows and
 * AddressSanitizer sees an access past its end; more than 48 KiB in a block is an error, as a launch
 * without the opt-in attribute fails on the GPU. FM_CUDA_EMU_ORDER=reverse|shuffled runs blocks and
 * lanes in that order (default forward): a race on memory makes orders disagree.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "cuda_compat.h"

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FM_EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#endif

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace fm_cuda_emu {

std::recursive_mutex &big_lock(); /* cuda_runtime_emu.cpp: one runtime call or launch at a time */
/* cuda_runtime_emu.cpp: false to run a launch now; true if it is recorded in the capture of s (a copy of the
 * closure) or refused (the error left for cudaGetLastError) */
bool capture_launch(cudaStream_t s, dim3 grid, dim3 block, size_t shmem, const char *name, void (*fn)(void *),
                    void *ctx, void *(*clone)(const void *), void (*destroy)(void *));
void run_kernel(dim3 grid, dim3 block, size_t shmem, const char *name, void (*fn)(void *), void *ctx);

namespace {
#if defined(__x86_64__)
/* the callee-saved registers (System V ABI) pushed on the stack being left, its stack pointer stored, the
 * other's loaded and its registers popped: the switch a function call would make (no signal mask) */
struct fiber {
    void *sp;
};
extern "C" void fm_cuda_emu_swap(void **save_sp, void *load_sp);
asm(R"(
    .text
    .globl fm_cuda_emu_swap
    .type fm_cuda_emu_swap, @function
fm_cuda_emu_swap:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size fm_cuda_emu_swap, .-fm_cuda_emu_swap
    .section .note.GNU-stack, "", @progbits
    .text
)");
void fiber_init(fiber &f, char *stack, size_t size, void (*entry)()) {
    void **sp = (void **)((uintptr_t)(stack + size) & ~(uintptr_t)15);
    *--sp = nullptr; /* entry's return address */
    *--sp = (void *)entry;
    for (int i = 0; i < 6; i++) *--sp = nullptr;
    f.sp = sp;
}
void fiber_swap(fiber &from, fiber &to) { fm_cuda_emu_swap(&from.sp, to.sp); }
#else
struct fiber {
    ucontext_t uc;
};
void fiber_init(fiber &f, char *stack, size_t size, void (*entry)()) {
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = stack;
    f.uc.uc_stack.ss_size = size;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, entry, 0);
}
void fiber_swap(fiber &from, fiber &to) { swapcontext(&from.uc, &to.uc); }
#endif

enum state { RUNNING, AT_BARRIER, AT_WARP, DONE };
enum order { FORWARD, REVERSE, SHUFFLED };
enum { STACK = 256 << 10, MAX_LANES = 1024, WARP = 32, MAX_SHARED = 48 << 10, SYNCWARP = 100 };

struct lane {
    fiber ctx;
    state st;
    uint3 tid;
    int kind, arg, width; /* the warp function it waits at */
    unsigned mask;
    uint64_t value, result;
    /* cp.async (FM_CUDA_EMU_CP=late): copies not yet made, each with its group (committed: < groups) */
    struct copy {
        void *dst;
        unsigned char bytes[16];
        size_t n;
        unsigned long long group;
    };
    std::vector<copy> copies;
    unsigned long long groups;
};

struct shared_block {
    const void *key;
    void *p;
    size_t bytes;
};

struct {
    order ord = FORWARD;
    bool ord_read = false;
    bool cp_late = false; /* FM_CUDA_EMU_CP=late: cp.async copies land at the wait that needs them */
    std::mt19937 rng{12345};
    std::vector<lane> lanes;
    char *stacks = nullptr;
    fiber sched;
    int cur = -1, n = 0;
    void (*fn)(void *) = nullptr;
    void *ctx = nullptr;
    const char *name = "";
    std::vector<shared_block> shared;
    size_t shared_bytes = 0, dyn_bytes = 0;
    void *dyn = nullptr;
    unsigned long long launches = 0;
#ifdef FM_EMU_ASAN
    const void *sched_stack = nullptr;
    size_t sched_stack_size = 0;
#endif
} S;

void switch_to(fiber *from, fiber *to, const void *stack, size_t size, bool finished = false) {
#ifdef FM_EMU_ASAN
    void *fake = nullptr;
    __sanitizer_start_switch_fiber(finished ? nullptr : &fake, stack, size);
    fiber_swap(*from, *to);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
    (void)stack, (void)size, (void)finished;
    fiber_swap(*from, *to);
#endif
}

void to_scheduler(bool finished = false) {
#ifdef FM_EMU_ASAN
    switch_to(&S.lanes[S.cur].ctx, &S.sched, S.sched_stack, S.sched_stack_size, finished);
#else
    switch_to(&S.lanes[S.cur].ctx, &S.sched, nullptr, 0, finished);
#endif
}

void lane_main() {
#ifdef FM_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &S.sched_stack, &S.sched_stack_size);
#endif
    S.fn(S.ctx);
    if (!S.lanes[S.cur].copies.empty()) {
        const uint3 t = S.lanes[S.cur].tid;
        fail("%s: thread (%u,%u,%u) returned with %zu cp.async copies never waited for", S.name, t.x, t.y, t.z,
             S.lanes[S.cur].copies.size());
    }
    S.lanes[S.cur].st = DONE;
    to_scheduler(true);
    abort(); /* never resumed */
}

std::vector<int> permutation(int n) {
    std::vector<int> p(n);
    for (int i = 0; i < n; i++) p[i] = S.ord == REVERSE ? n - 1 - i : i;
    if (S.ord == SHUFFLED) std::shuffle(p.begin(), p.end(), S.rng);
    return p;
}

const char *state_name(state s) {
    static const char *n[] = {"running", "at __syncthreads", "at a warp function", "returned"};
    return n[s];
}

int source_lane(const lane &l, int me) {
    const int w = l.width, base = me & ~(w - 1), in = me & (w - 1);
    switch (l.kind) {
    case SHFL_IDX: return base + (l.arg & (w - 1));
    case SHFL_XOR: { const int s = me ^ l.arg; return s >= base + w ? me : s; }
    case SHFL_DOWN: return in + l.arg < w ? me + l.arg : me;
    case SHFL_UP: return in - l.arg >= 0 ? me - l.arg : me;
    default: return me;
    }
}

/* Release what can go on after a round; else fail saying why nothing can. */
void release() {
    const uint3 b = blockIdx;
    bool any = false;
    for (int w0 = 0; w0 < S.n; w0 += WARP) {
        const int w1 = std::min(S.n, w0 + WARP);
        int waiting = 0, done = 0;
        for (int i = w0; i < w1; i++) waiting += S.lanes[i].st == AT_WARP, done += S.lanes[i].st == DONE;
        if (!waiting) continue;
        if (done)
            fail("%s: block (%u,%u,%u), warp %d: %d lanes returned while %d wait at a warp function (a full-mask "
                 "shuffle or __syncwarp with exited lanes)", S.name, b.x, b.y, b.z, w0 / WARP, done, waiting);
        if (waiting < w1 - w0) continue; /* the rest still run, or wait at __syncthreads (checked below) */
        if (w1 - w0 < WARP)
            fail("%s: block (%u,%u,%u): a warp function in a partial warp of %d lanes (%d threads a block)", S.name,
                 b.x, b.y, b.z, w1 - w0, S.n);
        for (int i = w0; i < w1; i++) {
            const lane &l = S.lanes[i], &f = S.lanes[w0];
            if (l.kind != f.kind || l.mask != f.mask || l.width != f.width)
                fail("%s: block (%u,%u,%u), warp %d: lanes %d and %d are at different warp functions (kind %d/%d, "
                     "mask %#x/%#x, width %d/%d)", S.name, b.x, b.y, b.z, w0 / WARP, w0, i, f.kind, l.kind, f.mask,
                     l.mask, f.width, l.width);
        }
        for (int i = w0; i < w1; i++) {
            lane &l = S.lanes[i];
            if (l.kind != SYNCWARP) l.result = S.lanes[w0 + source_lane(l, i - w0)].value;
            l.st = RUNNING;
        }
        any = true;
    }
    if (any) return;
    int at_barrier = 0, done = 0;
    for (int i = 0; i < S.n; i++) at_barrier += S.lanes[i].st == AT_BARRIER, done += S.lanes[i].st == DONE;
    if (at_barrier == S.n) {
        for (int i = 0; i < S.n; i++) S.lanes[i].st = RUNNING;
        return;
    }
    if (at_barrier && done)
        fail("%s: block (%u,%u,%u): divergent __syncthreads: %d lanes returned while %d wait at it (e.g. an early "
             "return before a barrier)", S.name, b.x, b.y, b.z, done, at_barrier);
    std::string states;
    for (int i = 0; i < S.n; i++) states += std::string(i ? ", " : "") + state_name(S.lanes[i].st);
    fail("%s: block (%u,%u,%u): deadlock (a warp function not reached by all 32 lanes?); lanes: %s", S.name, b.x,
         b.y, b.z, states.c_str());
}

void free_shared() {
    for (auto &s : S.shared) free(s.p);
    S.shared.clear();
    free(S.dyn);
    S.dyn = nullptr;
    S.shared_bytes = 0;
}

void run_block(const dim3 &block) {
    for (int i = 0; i < S.n; i++) {
        lane &l = S.lanes[i];
        l.st = RUNNING;
        l.tid = uint3{i % block.x, i / block.x % block.y, i / (block.x * block.y)};
        l.copies.clear(), l.groups = 0;
#ifdef FM_EMU_ASAN
        /* the frames a lane left when it returned for good still have poisoned redzones: clear them */
        __asan_unpoison_memory_region(S.stacks + (size_t)i * STACK, STACK);
#endif
        fiber_init(l.ctx, S.stacks + (size_t)i * STACK, STACK, lane_main);
    }
    if (S.dyn_bytes) {
        if (posix_memalign(&S.dyn, 16, S.dyn_bytes)) fail("out of memory");
        memset(S.dyn, 0xFF, S.dyn_bytes); /* poison: NaN */
    }
    const std::vector<int> order = permutation(S.n);
    for (;;) {
        for (int i : order) {
            if (S.lanes[i].st != RUNNING) continue;
            S.cur = i;
            threadIdx = S.lanes[i].tid;
            switch_to(&S.sched, &S.lanes[i].ctx, S.stacks + (size_t)i * STACK, STACK);
        }
        S.cur = -1;
        bool all_done = true;
        for (int i = 0; i < S.n; i++) all_done &= S.lanes[i].st == DONE;
        if (all_done) break;
        release();
    }
    free_shared();
}

lane &current(const char *what) {
    if (S.cur < 0) fail("%s outside a kernel", what);
    return S.lanes[S.cur];
}
} // namespace

void fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "cuda-emu: error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    fflush(stderr);
    _exit(3); /* possibly on a lane's stack: no unwinding */
}

void launch_impl(dim3 grid, dim3 block, size_t shmem, cudaStream_t s, const char *name, void (*fn)(void *),
                 void *ctx, void *(*clone)(const void *), void (*destroy)(void *)) {
    std::lock_guard<std::recursive_mutex> lock(big_lock());
    if (S.cur >= 0) fail("%s launched from inside a kernel", name);
    const unsigned long long n = (unsigned long long)block.x * block.y * block.z;
    if (!n || n > MAX_LANES || block.z > 64)
        fail("%s: block (%u,%u,%u): %llu threads (a launch error on the GPU: 1..1024)", name, block.x, block.y,
             block.z, n);
    if (!grid.x || !grid.y || !grid.z || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
        fail("%s: grid (%u,%u,%u) (a launch error on the GPU)", name, grid.x, grid.y, grid.z);
    if (shmem > MAX_SHARED)
        fail("%s: %zu bytes of dynamic shared memory (over 48 KiB needs cudaFuncSetAttribute)", name, shmem);
    /* checked as the GPU checks a launch, then recorded instead of run if s captures */
    if (capture_launch(s, grid, block, shmem, name, fn, ctx, clone, destroy)) return;
    run_kernel(grid, block, shmem, name, fn, ctx);
}

void run_kernel(dim3 grid, dim3 block, size_t shmem, const char *name, void (*fn)(void *), void *ctx) {
    std::lock_guard<std::recursive_mutex> lock(big_lock());
    const unsigned long long n = (unsigned long long)block.x * block.y * block.z;
    if (!S.ord_read) {
        const char *o = getenv("FM_CUDA_EMU_ORDER");
        S.ord = !o || !*o || !strcmp(o, "forward") ? FORWARD : !strcmp(o, "reverse") ? REVERSE
              : !strcmp(o, "shuffled")                 ? SHUFFLED
                                                       : (fail("FM_CUDA_EMU_ORDER=%s: forward, reverse or shuffled", o), FORWARD);
        S.ord_read = true;
        const char *cp = getenv("FM_CUDA_EMU_CP");
        S.cp_late = cp && !strcmp(cp, "late");
        if (cp && *cp && !S.cp_late && strcmp(cp, "now")) fail("FM_CUDA_EMU_CP=%s: now or late", cp);
    }
    if (!S.stacks) {
        S.stacks = (char *)mmap(nullptr, (size_t)MAX_LANES * STACK, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (S.stacks == MAP_FAILED) fail("cannot map the lanes' stacks");
        S.lanes.resize(MAX_LANES);
    }
    S.launches++;
    /* FM_CUDA_EMU_TRACE=file: each kernel run appends its name (as the launch wrote it) to that file (tests: which
     * kernel a call reached) */
    static const char *trace = getenv("FM_CUDA_EMU_TRACE");
    if (trace && *trace) {
        if (FILE *f = fopen(trace, "a")) {
            fprintf(f, "%s\n", name);
            fclose(f);
        }
    }
    S.fn = fn, S.ctx = ctx, S.name = name, S.n = (int)n, S.dyn_bytes = shmem;
    gridDim = grid, blockDim = block;
    const unsigned long long nb = (unsigned long long)grid.x * grid.y * grid.z;
    if (S.ord == FORWARD) {
        for (unsigned long long g = 0; g < nb; g++) {
            blockIdx = uint3{(unsigned)(g % grid.x), (unsigned)(g / grid.x % grid.y), (unsigned)(g / ((unsigned long long)grid.x * grid.y))};
            run_block(block);
        }
    } else {
        if (nb > (1u << 30)) fail("%s: %llu blocks", name, nb);
        for (int g : permutation((int)nb)) {
            blockIdx = uint3{(unsigned)(g % grid.x), (unsigned)(g / grid.x % grid.y), (unsigned)(g / ((unsigned long long)grid.x * grid.y))};
            run_block(block);
        }
    }
    S.fn = nullptr, S.ctx = nullptr;
}

void *shared_alloc(const void *key, size_t bytes, size_t align) {
    current("__shared__");
    for (auto &s : S.shared)
        if (s.key == key) return s.p;
    if (align < 16) align = 16;
    shared_block b = {key, nullptr, bytes};
    if (posix_memalign(&b.p, align, bytes)) fail("out of memory");
    memset(b.p, 0xFF, bytes); /* poison: NaN */
    S.shared_bytes += bytes;
    if (S.shared_bytes + S.dyn_bytes > MAX_SHARED)
        fail("%s: %zu bytes of static and %zu of dynamic shared memory in a block (48 KiB at most)", S.name,
             S.shared_bytes, S.dyn_bytes);
    S.shared.push_back(b);
    return b.p;
}

void *dynamic_shared(void) {
    current("extern __shared__");
    if (!S.dyn) fail("%s: extern __shared__ memory, but the launch asked for none", S.name);
    return S.dyn;
}

void syncthreads(void) {
    current("__syncthreads").st = AT_BARRIER;
    to_scheduler();
    threadIdx = S.lanes[S.cur].tid;
}

static uint64_t warp_op(int kind, unsigned mask, uint64_t v, int arg, int width, const char *what) {
    lane &l = current(what);
    if (mask != 0xffffffffu)
        fail("%s: %s with mask %#x (only full-warp masks are modelled)", S.name, what, mask);
    if (width < 1 || width > WARP || (width & (width - 1)))
        fail("%s: %s with width %d (a power of 2 up to 32)", S.name, what, width);
    l.kind = kind, l.mask = mask, l.value = v, l.arg = arg, l.width = width;
    l.st = AT_WARP;
    to_scheduler();
    threadIdx = S.lanes[S.cur].tid;
    return S.lanes[S.cur].result;
}

/* cp.async: copied at once (FM_CUDA_EMU_CP=now, the default), or (late) the source read now and the destination
 * written only at the wait that requires the copy's group: a read of the destination before that wait (by this
 * lane, or by another before a barrier after it) sees the old bytes, so a missing wait shows in the results. */
void cp_async(void *dst, const void *src, size_t n) {
    lane &l = current("cp.async");
    if (n != 4 && n != 8 && n != 16) fail("%s: cp.async of %zu bytes (4, 8 or 16)", S.name, n);
    if (((uintptr_t)dst | (uintptr_t)src) & (n - 1)) fail("%s: cp.async of %zu bytes, misaligned", S.name, n);
    if (!S.cp_late) {
        memcpy(dst, src, n);
        return;
    }
    lane::copy c = {dst, {}, n, l.groups};
    memcpy(c.bytes, src, n);
    l.copies.push_back(c);
}
void cp_commit(void) {
    current("cp.async.commit_group").groups++;
}
void cp_wait(int n) {
    lane &l = current("cp.async.wait_group");
    size_t keep = 0;
    for (const lane::copy &c : l.copies) {
        if (c.group + (unsigned long long)n < l.groups) memcpy(c.dst, c.bytes, c.n);
        else l.copies[keep++] = c;
    }
    l.copies.resize(keep);
}

void syncwarp(unsigned mask) { warp_op(SYNCWARP, mask, 0, 0, WARP, "__syncwarp"); }

uint64_t shfl(unsigned mask, uint64_t v, int kind, int arg, int width) {
    return warp_op(kind, mask, v, arg, width, "a warp shuffle");
}

} // namespace fm_cuda_emu
