// deltanet_gates.metal — DeltaNet's gates in place over [T, Hv] (backend_cpu.c's cpu_deltanet_gates):
// b → beta = sigmoid(b), a → g = -exp(A_log)·softplus(a + dt_bias), one thread per (token, head).
// The CPU's formulas: fm_sigmoid = 1 / (1 + exp(-x)) with exp's argument clamped to [-87, 88] (as fm_exp),
// fm_softplus = x > 20 ? x : log1p(exp(x)). MSL has no log1p: it is log(u)·e / (u - 1) with u = 1 + e
// (Goldberg; the rounding of u cancels), and e itself where u rounds to 1 (e < 2^-24).
// Should fast math fold (1 + e) - 1 into e, this degrades to log(1 + e): an absolute error of ~1 ulp of
// 1 (6e-8), still inside TOL_ELEM, which test_ops measures relative to max(1, |ref|).
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

static inline float fm_log1p(float e) {
    const float u = 1.0f + e;
    return u == 1.0f ? e : log(u) * (e / (u - 1.0f));
}

kernel void fm_deltanet_gates(device float *b [[buffer(0)]],
                              device float *ga [[buffer(1)]],
                              device const float *A_log [[buffer(2)]],
                              device const float *dt_bias [[buffer(3)]],
                              constant fm_deltanet_gates_args &a [[buffer(4)]],
                              uint i [[thread_position_in_grid]]) {
    if (i >= a.n) return;
    const uint h = i % a.Hv;
    b[i] = 1.0f / (1.0f + exp(clamp(-b[i], -87.0f, 88.0f)));
    const float x = ga[i] + dt_bias[h];
    const float sp = x > 20.0f ? x : fm_log1p(exp(x));
    ga[i] = -exp(A_log[h]) * sp;
}
