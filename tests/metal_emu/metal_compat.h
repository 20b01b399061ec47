/*
 * metal_compat.h — what turns a .metal file into clang C++ (see README.md). Force-included
 * (-include) before the shader; <metal_stdlib> resolves to include/metal_stdlib, which is empty.
 *
 * Two modes:
 * - the emulator (default): address spaces vanish. Shaders take threadgroup memory as
 *   `threadgroup T *p [[threadgroup(i)]]`, sized by the host (fm_metal_grid.h), which the emulator
 *   allocates once per threadgroup, shared by its lanes and poisoned. A kernel-scope `threadgroup float
 *   a[N];` would become an array private to each lane here, silently wrong, so it is refused: by the
 *   launcher generator (gen_launcher.py) and by the address-space pass, where it is a __local variable
 *   outside an OpenCL kernel. Barriers and simdgroup functions call the emulator (emu.cpp): they are the
 *   points at which lanes switch.
 * - FM_METAL_AS_PASS (with clang -x clcpp -cl-std=clc++2021 -fsyntax-only): the address spaces become
 *   OpenCL's, which C++ lacks, so a threadgroup pointer passed where a device one is expected is an error.
 *   Only declarations are needed there.
 */
#ifndef FM_METAL_COMPAT_H
#define FM_METAL_COMPAT_H

#ifdef FM_METAL_AS_PASS
#pragma OPENCL EXTENSION cl_khr_fp16 : enable
#define device __global
#define constant __constant
#define threadgroup __local
#define thread __private
#define kernel /* a plain function: OpenCL's kernel-parameter rules are not Metal's */
#else
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <type_traits>
#define device
#define constant const
#define threadgroup register /* a keyword, so [[threadgroup(0)]] stays an (ignored) attribute */
#define thread
#define kernel
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef _Float16 half;
#endif

/* Vector types: clang's ext_vector_type (OpenCL's, which Metal's resemble: .xyzw, swizzles, splat).
 * Metal's constructors float4(a, b, c, d) are not valid for them: a function-like macro per type makes
 * the call fm_vec<float4>(...), which splats one scalar, converts one vector, or concatenates. */
#ifdef FM_METAL_AS_PASS
#define FM_VEC(T, N) /* OpenCL has them; constructors become its vector literals (V)(...) */
#else
template <class T> struct fm_vec_info { static constexpr int n = 1; using elem = T; };
#define FM_VEC(T, N)                                                                              \
    typedef T T##N __attribute__((ext_vector_type(N)));                                           \
    template <> struct fm_vec_info<T##N> { static constexpr int n = N; using elem = T; };
#endif
#define FM_VECS(T) FM_VEC(T, 2) FM_VEC(T, 3) FM_VEC(T, 4)
FM_VECS(float) FM_VECS(half) FM_VECS(int) FM_VECS(uint) FM_VECS(short) FM_VECS(ushort) FM_VECS(char)
FM_VECS(uchar)
#undef FM_VECS
#undef FM_VEC

#ifdef FM_METAL_AS_PASS
#define FM_VEC_CALL(V, ...) ((V)(__VA_ARGS__))
#else
template <class V, class A> inline void fm_vec_put(V &r, int &i, A a) {
    using E = typename fm_vec_info<V>::elem;
    if constexpr (fm_vec_info<A>::n == 1) r[i++] = (E)a;
    else for (int j = 0; j < fm_vec_info<A>::n; j++) r[i++] = (E)a[j];
}
template <class V, class... A> inline V fm_vec(A... a) {
    using E = typename fm_vec_info<V>::elem;
    V r;
    if constexpr (sizeof...(A) == 1 && ((fm_vec_info<A>::n == 1) && ...)) {
        r = (E)(a, ...); /* splat */
    } else {
        static_assert((fm_vec_info<A>::n + ...) == fm_vec_info<V>::n, "wrong number of vector components");
        int i = 0;
        (fm_vec_put(r, i, a), ...);
    }
    return r;
}
#define FM_VEC_CALL(V, ...) fm_vec<V>(__VA_ARGS__)
#endif
#define float2(...) FM_VEC_CALL(float2, __VA_ARGS__)
#define float3(...) FM_VEC_CALL(float3, __VA_ARGS__)
#define float4(...) FM_VEC_CALL(float4, __VA_ARGS__)
#define half2(...) FM_VEC_CALL(half2, __VA_ARGS__)
#define half3(...) FM_VEC_CALL(half3, __VA_ARGS__)
#define half4(...) FM_VEC_CALL(half4, __VA_ARGS__)
#define int2(...) FM_VEC_CALL(int2, __VA_ARGS__)
#define int4(...) FM_VEC_CALL(int4, __VA_ARGS__)
#define uint2(...) FM_VEC_CALL(uint2, __VA_ARGS__)
#define uint3(...) FM_VEC_CALL(uint3, __VA_ARGS__)
#define uint4(...) FM_VEC_CALL(uint4, __VA_ARGS__)
#define uchar4(...) FM_VEC_CALL(uchar4, __VA_ARGS__)

/* The emulator's side (emu.cpp): a barrier, and the exchange under every simdgroup function: the lane
 * leaves `bytes` of its value, waits until every lane of its simdgroup has arrived at the same op, and gets
 * the simdgroup's values (lane i's at i·bytes), their count and its own lane index. */
extern "C" void fm_emu_threadgroup_barrier(void);
extern "C" const void *fm_emu_simd_exchange(const void *value, unsigned bytes, int op, unsigned *lanes,
                                            unsigned *self);

namespace metal {
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return (mem_flags)((int)a | (int)b); }
inline void threadgroup_barrier(mem_flags) { fm_emu_threadgroup_barrier(); }
inline void simdgroup_barrier(mem_flags) { fm_emu_simd_exchange(0, 0, 0, 0, 0); }

#ifndef FM_METAL_AS_PASS /* (OpenCL has these built in, with Metal's names) */
using ::sqrt;
using ::exp;
using ::log;
using ::fabs;
using ::fma;
using ::tanh;
using ::pow;
using ::sin;
using ::cos;
using ::rint;
/* (<math.h> under C++ brings the float overloads of these) */
inline float rsqrt(float x) { return 1.0f / sqrtf(x); }
inline float abs(float x) { return fabsf(x); }
template <class T> inline T min(T a, T b) { return b < a ? b : a; }
template <class T> inline T max(T a, T b) { return a < b ? b : a; }
template <class T> inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
inline float divide(float x, float y) { return x / y; }
namespace fast { using metal::rsqrt; using metal::sqrt; using metal::exp; using metal::pow; using metal::sin; using metal::cos; using metal::divide; }
namespace precise { using metal::rsqrt; using metal::sqrt; using metal::exp; using metal::pow; using metal::sin; using metal::cos; using metal::divide; }
#else /* OpenCL's built-ins are overloaded functions, not names to bring in with using */
namespace precise {
inline float divide(float x, float y) { return x / y; }
inline float pow(float x, float y) { return ::pow(x, y); }
inline float exp(float x) { return ::exp(x); }
inline float sin(float x) { return ::sin(x); }
inline float cos(float x) { return ::cos(x); }
}
#endif
/* as_type<T>(v): the same bits as another type of the same size */
template <class T, class U> inline T as_type(U v) {
    static_assert(sizeof(T) == sizeof(U), "as_type: sizes differ");
    return __builtin_bit_cast(T, v);
}

/* Simdgroup functions. The values come back in lane order, so every lane reduces them in one order. */
enum { FM_SIMD_BARRIER, FM_SIMD_SUM, FM_SIMD_MAX, FM_SIMD_MIN, FM_SIMD_SHUFFLE, FM_SIMD_SHUFFLE_XOR,
       FM_SIMD_SHUFFLE_DOWN, FM_SIMD_SHUFFLE_UP, FM_SIMD_PREFIX };
template <class T> inline const T *fm_simd(T v, int op, unsigned *n, unsigned *self) {
    return (const T *)fm_emu_simd_exchange(&v, sizeof v, op, n, self);
}
/* a simdgroup's values folded with f in lane order */
template <class T, class F> inline T fm_simd_fold(T v, int op, F f) {
    unsigned n, self;
    const T *a = fm_simd(v, op, &n, &self);
    T s = a[0];
    for (unsigned i = 1; i < n; i++) s = f(s, a[i]);
    return s;
}
template <class T> inline T simd_sum(T v) { return fm_simd_fold(v, FM_SIMD_SUM, [](T a, T b) { return a + b; }); }
template <class T> inline T simd_max(T v) { return fm_simd_fold(v, FM_SIMD_MAX, [](T a, T b) { return max(a, b); }); }
template <class T> inline T simd_min(T v) { return fm_simd_fold(v, FM_SIMD_MIN, [](T a, T b) { return min(a, b); }); }
template <class T> inline T simd_prefix_exclusive_sum(T v) {
    unsigned n, self;
    const T *a = fm_simd(v, FM_SIMD_PREFIX, &n, &self);
    T s = 0;
    for (unsigned i = 0; i < self; i++) s += a[i];
    return s;
}
template <class T> inline T simd_shuffle(T v, ushort lane) {
    unsigned n, self;
    const T *a = fm_simd(v, FM_SIMD_SHUFFLE, &n, &self);
    return lane < n ? a[lane] : v;
}
template <class T> inline T simd_broadcast(T v, ushort lane) { return simd_shuffle(v, lane); }
template <class T> inline T simd_shuffle_xor(T v, ushort mask) {
    unsigned n, self;
    const T *a = fm_simd(v, FM_SIMD_SHUFFLE_XOR, &n, &self);
    return (self ^ mask) < n ? a[self ^ mask] : v;
}
template <class T> inline T simd_shuffle_down(T v, ushort delta) { /* the top delta lanes keep theirs */
    unsigned n, self;
    const T *a = fm_simd(v, FM_SIMD_SHUFFLE_DOWN, &n, &self);
    return self + delta < n ? a[self + delta] : v;
}
template <class T> inline T simd_shuffle_up(T v, ushort delta) {
    unsigned n, self;
    const T *a = fm_simd(v, FM_SIMD_SHUFFLE_UP, &n, &self);
    return self >= delta ? a[self - delta] : v;
}
} // namespace metal

#endif /* FM_METAL_COMPAT_H */
