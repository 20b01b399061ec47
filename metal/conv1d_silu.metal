// conv1d_silu.metal — DeltaNet's depthwise causal conv1d then SiLU (cpu.h's fm_cpu_conv1d_silu): x [T, C],
// taps w [C, K], state [K-1, C] the last K-1 inputs before x, oldest first;
// out[t, c] = silu(Σ_j w[c, j]·in[t - (K-1) + j, c]) over [state | x], the taps summed from 0 in j order as
// the CPU does, silu(a) = a / (1 + exp(-a)) with exp's argument clamped as fm_exp's. Then the state becomes
// the last K-1 inputs of [state | x].
// One thread per channel, through every token: a channel's outputs read only its own column of the state,
// so each thread updates its column after its last read, with no barrier and no second dispatch.
#include <metal_stdlib>
#include "fm_metal_args.h"
using namespace metal;

kernel void fm_conv1d_silu(device float *out [[buffer(0)]],
                           device const float *x [[buffer(1)]],
                           device float *state [[buffer(2)]],
                           device const float *w [[buffer(3)]],
                           constant fm_conv1d_args &a [[buffer(4)]],
                           uint c [[thread_position_in_grid]]) {
    if (c >= a.C) return;
    const int S = (int)a.K - 1, T = (int)a.T;
    const ulong C = a.C;
    device const float *wc = w + c * (ulong)a.K;
    for (int t = 0; t < T; t++) {
        float acc = 0.0f;
        for (int j = 0; j <= S; j++) {
            const int src = t - S + j; // < 0: from the state
            const float v = src >= 0 ? x[(ulong)src * C + c] : state[(ulong)(S + src) * C + c];
            acc += wc[j] * v;
        }
        out[(ulong)t * C + c] = acc / (1.0f + exp(clamp(-acc, -87.0f, 88.0f)));
    }
    // the new state: the last S inputs of [state | x]
    if (T >= S) {
        for (int s = 0; s < S; s++) state[(ulong)s * C + c] = x[(ulong)(T - S + s) * C + c];
    } else {
        for (int s = 0; s < S - T; s++) state[(ulong)s * C + c] = state[(ulong)(s + T) * C + c]; // upwards: reads ahead of writes
        for (int t = 0; t < T; t++) state[(ulong)(S - T + t) * C + c] = x[(ulong)t * C + c];
    }
}
