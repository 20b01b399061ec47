/*
 * emu.cpp — the grid emulator's scheduler (README.md).
 *
 * Threadgroups run one after another; inside one, every lane is a fiber on its own stack (on x86-64 a
 * context switch of our own; swapcontext elsewhere, which costs a system call per switch).
 * A round resumes each runnable lane, in the chosen order, until it returns or waits: at
 * threadgroup_barrier, or at a simdgroup function (fm_emu_simd_exchange). Between rounds, a simdgroup
 * whose lanes all wait at a simdgroup function is released, and the threadgroup is released from a
 * barrier once all its lanes wait there. Anything else that blocks every lane is reported: a lane that
 * returned while others wait at a barrier (divergent barrier), lanes of one simdgroup at different ops.
 *
 * Threadgroup memory: one allocation per [[threadgroup(i)]] per threadgroup, of exactly the length the
 * host set, shared by the lanes and filled with 0xFF (NaN as float) first, so reading what no lane wrote
 * shows, and ASan sees an access past its end. Lanes run forward, reversed or shuffled (and the
 * threadgroups with them): a race on memory makes the orders disagree.
 */
#include "emu.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <random>
#include <string>
#include <vector>

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FM_EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#endif

namespace fm_emu {

namespace {
#if defined(__x86_64__)
/* swapcontext saves and restores the signal mask, a system call per switch, which was most of the
 * emulator's time. This saves the callee-saved registers (System V ABI) on the stack being left, stores
 * its stack pointer, loads the other's and pops its registers: the switch a function call would make. */
struct fiber {
    void *sp;
};
extern "C" void fm_emu_swap(void **save_sp, void *load_sp);
asm(R"(
    .text
    .globl fm_emu_swap
    .type fm_emu_swap, @function
fm_emu_swap:
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
    .size fm_emu_swap, .-fm_emu_swap
    .section .note.GNU-stack, "", @progbits
    .text
)");
/* A fiber that starts in entry (which never returns) on [stack, stack + size): fm_emu_swap's pops take
 * six zero registers, its ret jumps to entry with the stack as a call would leave it (rsp = 8 mod 16). */
void fiber_init(fiber &f, char *stack, size_t size, void (*entry)()) {
    void **sp = (void **)((uintptr_t)(stack + size) & ~(uintptr_t)15);
    *--sp = nullptr; /* entry's return address */
    *--sp = (void *)entry;
    for (int i = 0; i < 6; i++) *--sp = nullptr;
    f.sp = sp;
}
void fiber_swap(fiber &from, fiber &to) { fm_emu_swap(&from.sp, to.sp); }
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

enum state { RUNNING, AT_BARRIER, AT_SIMD, DONE };
enum { STACK = 64 << 10, MAX_LANES = 1024, SIMD = FM_METAL_SIMD, MAX_VALUE = 64 };

struct lane {
    fiber ctx;
    state st;
    unsigned simd_ops;        /* simdgroup functions passed: its parity picks the exchange buffer */
    int op;                   /* the simdgroup op it waits at */
    unsigned bytes;
    lane_ctx c;
};

struct {
    order ord = order::forward;
    std::mt19937 rng{12345};
    std::vector<lane> lanes;
    char *stacks = nullptr;
    fiber sched;
    int cur = -1;
    launcher fn = nullptr;
    /* exchange buffers: [parity][simdgroup][lane][MAX_VALUE bytes] */
    std::vector<unsigned char> exchange;
#ifdef FM_EMU_ASAN
    const void *sched_stack = nullptr;
    size_t sched_stack_size = 0;
#endif
} S;

std::map<std::string, launcher> &kernels() {
    static std::map<std::string, launcher> k;
    return k;
}

/* Switch between the scheduler and a lane, telling ASan which stack is live (else it reports false
 * stack errors after a switch). A lane that finished passes no fake-stack slot: its frames are gone. */
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
    lane &l = S.lanes[S.cur];
    S.fn(l.c);
    l.st = DONE;
    to_scheduler(true);
    abort(); /* never resumed */
}

std::vector<int> permutation(int n) {
    std::vector<int> p(n);
    for (int i = 0; i < n; i++) p[i] = S.ord == order::reverse ? n - 1 - i : i;
    if (S.ord == order::shuffled) std::shuffle(p.begin(), p.end(), S.rng);
    return p;
}

const char *state_name(state s) {
    static const char *n[] = {"running", "at threadgroup_barrier", "at a simdgroup function", "returned"};
    return n[s];
}

/* Release what can go on after a round; false when nothing can (then it is an error). */
bool release(int n, const u3 &tg) {
    bool any = false;
    for (int s0 = 0; s0 < n; s0 += SIMD) {
        const int s1 = std::min(n, s0 + SIMD);
        int waiting = 0, done = 0;
        for (int i = s0; i < s1; i++) waiting += S.lanes[i].st == AT_SIMD, done += S.lanes[i].st == DONE;
        if (waiting == s1 - s0) {
            for (int i = s0; i < s1; i++) {
                if (S.lanes[i].op != S.lanes[s0].op || S.lanes[i].bytes != S.lanes[s0].bytes)
                    fail("threadgroup (%u,%u,%u), simdgroup %d: lane %d and lane %d are at different simdgroup "
                         "functions (op %d/%u bytes vs op %d/%u bytes)", tg.x, tg.y, tg.z, s0 / SIMD, s0, i,
                         S.lanes[s0].op, S.lanes[s0].bytes, S.lanes[i].op, S.lanes[i].bytes);
                S.lanes[i].st = RUNNING;
            }
            any = true;
        } else if (waiting && done) {
            fail("threadgroup (%u,%u,%u), simdgroup %d: divergent simdgroup function: %d lanes returned while %d "
                 "wait at it", tg.x, tg.y, tg.z, s0 / SIMD, done, waiting);
        }
    }
    if (any) return true;
    int at_barrier = 0, done = 0;
    for (int i = 0; i < n; i++) at_barrier += S.lanes[i].st == AT_BARRIER, done += S.lanes[i].st == DONE;
    if (at_barrier == n) {
        for (int i = 0; i < n; i++) S.lanes[i].st = RUNNING;
        return true;
    }
    if (at_barrier && done)
        fail("threadgroup (%u,%u,%u): divergent barrier: %d lanes returned while %d wait at threadgroup_barrier "
             "(e.g. an early return before a barrier)", tg.x, tg.y, tg.z, done, at_barrier);
    std::string states;
    for (int i = 0; i < n; i++) states += std::string(i ? ", " : "") + state_name(S.lanes[i].st);
    fail("threadgroup (%u,%u,%u): deadlock; lanes: %s", tg.x, tg.y, tg.z, states.c_str());
}

void run_threadgroup(const u3 &tg, const lane_ctx &base, int n, uint32_t simdgroups) {
    for (int i = 0; i < n; i++) {
        lane &l = S.lanes[i];
        l.st = RUNNING, l.simd_ops = 0;
        l.c = base;
        const u3 tpt = base.threads_per_threadgroup;
        l.c.thread_position_in_threadgroup = u3{i % tpt.x, i / tpt.x % tpt.y, i / (tpt.x * tpt.y)};
        l.c.thread_position_in_grid = tg * tpt + l.c.thread_position_in_threadgroup;
        l.c.threadgroup_position_in_grid = tg;
        l.c.thread_index_in_threadgroup = i;
        l.c.simdgroup_index_in_threadgroup = i / SIMD;
        l.c.thread_index_in_simdgroup = i % SIMD;
        l.c.threads_per_simdgroup = SIMD;
        l.c.simdgroups_per_threadgroup = simdgroups;
#ifdef FM_EMU_ASAN
        /* the frames a lane left when it returned to the scheduler for good still have poisoned redzones
         * (nothing unwound them): clear them, or the next lane on this stack trips on them. (Without ASan's
         * fake stacks, detect_stack_use_after_return=0, which the tests set: with them every lane start
         * maps and every lane end unmaps a fake stack, most of the emulator's time.) */
        __asan_unpoison_memory_region(S.stacks + (size_t)i * STACK, STACK);
#endif
        fiber_init(l.ctx, S.stacks + (size_t)i * STACK, STACK, lane_main);
    }
    for (;;) {
        for (int i : permutation(n)) {
            if (S.lanes[i].st != RUNNING) continue;
            S.cur = i;
            switch_to(&S.sched, &S.lanes[i].ctx, S.stacks + (size_t)i * STACK, STACK);
        }
        S.cur = -1;
        bool all_done = true;
        for (int i = 0; i < n; i++) all_done &= S.lanes[i].st == DONE;
        if (all_done) return;
        release(n, tg);
    }
}
} // namespace

void set_order(order o) {
    S.ord = o;
    S.rng.seed(12345);
}

const char *order_name(order o) { return o == order::forward ? "forward" : o == order::reverse ? "reverse" : "shuffled"; }

void fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "metal-emu: error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, " [%s order]\n", order_name(S.ord));
    va_end(ap);
    fflush(stderr);
    _exit(3); /* possibly on a lane's stack: no unwinding */
}

bool has_kernel(const char *name) { return kernels().count(name) != 0; }

kernel_reg::kernel_reg(const char *name, launcher fn) {
    if (!kernels().emplace(name, fn).second) fail("kernel %s defined twice", name);
}

void encoder::set_buffer(const void *p, int index) {
    if (index < 0 || index >= MAX_BUFFERS) fail("buffer index %d out of range", index);
    if (bytes_len[index]) free(buffers[index]), bytes_len[index] = 0;
    buffers[index] = (void *)p;
}

void encoder::set_bytes(const void *p, size_t len, int index) {
    set_buffer(nullptr, index);
    buffers[index] = malloc(len); /* exactly len: a read past the struct is an ASan error */
    memcpy(buffers[index], p, len);
    bytes_len[index] = len;
}

void encoder::set_threadgroup_memory_length(uint32_t len, int index) {
    if (index < 0 || index >= MAX_TG) fail("threadgroup memory index %d out of range", index);
    if (len % 16) fail("threadgroup memory length %u at %d is not a multiple of 16 (Metal requires it)", len, index);
    tg_len[index] = len;
}

encoder::~encoder() {
    for (int i = 0; i < MAX_BUFFERS; i++) set_buffer(nullptr, i);
}

void encoder::dispatch(const char *kernel, const fm_metal_grid &grid) {
    auto it = kernels().find(kernel);
    if (it == kernels().end()) fail("no kernel named %s in this build", kernel);
    const u3 groups = {grid.groups[0], grid.groups[1], grid.groups[2]};
    const u3 tpt = {grid.threads[0], grid.threads[1], grid.threads[2]};
    const int n = (int)(tpt.x * tpt.y * tpt.z);
    if (n < 1 || n > MAX_LANES) fail("%d threads per threadgroup (1..%d)", n, MAX_LANES);
    if (!S.stacks) {
        S.stacks = (char *)mmap(nullptr, (size_t)MAX_LANES * STACK, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (S.stacks == MAP_FAILED) fail("cannot map the lanes' stacks");
        S.lanes.resize(MAX_LANES);
        S.exchange.resize((size_t)2 * MAX_LANES * MAX_VALUE);
    }
    S.fn = it->second;
    const uint32_t simdgroups = (n + SIMD - 1) / SIMD;
    lane_ctx base = {};
    base.buffers = buffers;
    base.threads_per_threadgroup = tpt;
    base.threadgroups_per_grid = groups;
    base.threads_per_grid = groups * tpt;

    const int ngroups = (int)(groups.x * groups.y * groups.z);
    for (int g : permutation(ngroups)) {
        void *tg_mem[MAX_TG] = {};
        for (int i = 0; i < MAX_TG; i++)
            if (tg_len[i]) memset(tg_mem[i] = malloc(tg_len[i]), 0xFF, tg_len[i]); /* poison: NaN */
        base.tg_memory = tg_mem;
        const u3 tg = {g % groups.x, g / groups.x % groups.y, g / (groups.x * groups.y)};
        run_threadgroup(tg, base, n, simdgroups);
        for (int i = 0; i < MAX_TG; i++) free(tg_mem[i]);
    }
}

} // namespace fm_emu

using namespace fm_emu;

extern "C" void fm_emu_threadgroup_barrier(void) {
    if (S.cur < 0) fail("threadgroup_barrier outside a kernel");
    S.lanes[S.cur].st = AT_BARRIER;
    to_scheduler();
}

extern "C" const void *fm_emu_simd_exchange(const void *value, unsigned bytes, int op, unsigned *lanes,
                                            unsigned *self) {
    if (S.cur < 0) fail("simdgroup function outside a kernel");
    if (bytes > MAX_VALUE) fail("simdgroup function on a %u-byte value", bytes);
    lane &l = S.lanes[S.cur];
    const unsigned sg = S.cur / SIMD, me = S.cur % SIMD, parity = l.simd_ops++ & 1;
    /* two buffers by parity: no lane can leave op k+1 before every lane has read op k's values */
    unsigned char *buf = &S.exchange[((size_t)parity * MAX_LANES + (size_t)sg * SIMD) * MAX_VALUE];
    if (bytes) memcpy(buf + (size_t)me * bytes, value, bytes);
    l.op = op, l.bytes = bytes, l.st = AT_SIMD;
    to_scheduler();
    const unsigned n = std::min<unsigned>(SIMD, l.c.threads_per_threadgroup.x * l.c.threads_per_threadgroup.y *
                                                    l.c.threads_per_threadgroup.z - sg * SIMD);
    if (lanes) *lanes = n;
    if (self) *self = me;
    return buf;
}
