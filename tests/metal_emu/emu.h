/*
 * emu.h — the grid emulator's runtime: runs a kernel over a dispatchThreadgroups grid on the CPU, one
 * fiber per lane (README.md). The host side (device_emu.cpp) binds buffers as a Metal compute encoder does;
 * generated launchers (gen_launcher.py) map each kernel's [[buffer(n)]] / [[threadgroup(n)]] /
 * attribute parameters to a lane_ctx.
 */
#ifndef FM_EMU_H
#define FM_EMU_H

#include <stddef.h>
#include <stdint.h>

#include <type_traits>

#include "fm_metal_grid.h"

namespace fm_emu {

enum class order { forward, reverse, shuffled };
void set_order(order o);
const char *order_name(order o);

typedef unsigned int u3 __attribute__((ext_vector_type(3)));

/* What one lane sees: the encoder's bindings and its position, one field per Metal attribute name (the
 * launcher reads c.<attribute>, so an attribute the emulator lacks fails to compile). */
struct lane_ctx {
    void *const *buffers;   /* [[buffer(i)]] */
    void *const *tg_memory; /* [[threadgroup(i)]] */
    u3 thread_position_in_grid, threadgroup_position_in_grid, thread_position_in_threadgroup;
    u3 threads_per_threadgroup, threadgroups_per_grid, threads_per_grid;
    uint32_t thread_index_in_threadgroup, simdgroup_index_in_threadgroup, thread_index_in_simdgroup;
    uint32_t threads_per_simdgroup, simdgroups_per_threadgroup;
};

typedef void (*launcher)(const lane_ctx &c);
struct kernel_reg { /* a static one per kernel, in the generated launcher file */
    kernel_reg(const char *name, launcher fn);
};

enum { MAX_BUFFERS = 31, MAX_TG = 4 };

/* A compute command encoder's state, as the Objective-C host will set it. */
struct encoder {
    void *buffers[MAX_BUFFERS] = {};
    size_t bytes_len[MAX_BUFFERS] = {}; /* set_bytes copies, as setBytes:length:atIndex: does */
    uint32_t tg_len[MAX_TG] = {};
    void set_buffer(const void *p, int index);
    void set_bytes(const void *p, size_t len, int index);
    void set_threadgroup_memory_length(uint32_t len, int index);
    void dispatch(const char *kernel, const fm_metal_grid &grid); /* dispatchThreadgroups, run to the end */
    ~encoder();
};

bool has_kernel(const char *name); /* a kernel of that name is in this build */

[[noreturn]] void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Launcher helpers: a [[buffer(i)]] as the parameter's pointer or reference type; an attribute as uint,
 * uint2 or uint3 (or ushort). */
template <class T> inline T buffer_arg(const lane_ctx &c, int i) {
    if (!c.buffers[i]) fail("buffer(%d) is not bound", i);
    if constexpr (__is_reference(T)) return *(__remove_reference_t(T) *)c.buffers[i];
    else return (T)c.buffers[i];
}
template <class T> inline T tg_arg(const lane_ctx &c, int i) {
    if (!c.tg_memory[i]) fail("threadgroup(%d) has no memory length set", i);
    return (T)c.tg_memory[i];
}
template <class T> inline T attr(u3 v) {
    if constexpr (std::is_arithmetic_v<T>) return (T)v.x;
    else if constexpr (sizeof(T) == sizeof(v)) return v;
    else return v.xy;
}
template <class T> inline T attr(uint32_t v) { return (T)v; }

} // namespace fm_emu

#endif /* FM_EMU_H */
