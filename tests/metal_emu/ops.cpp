/*
 * ops.cpp — the backend's ops on the emulated GPU: what the Objective-C host will do for each (argument
 * struct, fm_metal_grid.h, buffer indices as in the shader), with the emulator's encoder in place of
 * MTLComputeCommandEncoder. Signatures as in backend.h / cpu.h.
 */
#include "ops.h"

#include "emu.h"
#include "fm_metal_args.h"
#include "fm_metal_grid.h"

void fm_emu_add(float *x, const float *y, size_t n) {
    const fm_add_args a = {(uint32_t)n};
    fm_emu::encoder enc;
    enc.set_buffer(x, 0);
    enc.set_buffer(y, 1);
    enc.set_bytes(&a, sizeof a, 2);
    enc.dispatch("fm_add", fm_metal_grid_add(a.n));
}

void fm_emu_rmsnorm(float *out, const float *x, const float *w, int T, int n, float eps, int zero_centered) {
    const fm_rmsnorm_args a = {(uint32_t)n, eps, (uint32_t)(zero_centered != 0)};
    const fm_metal_grid g = fm_metal_grid_rmsnorm((uint32_t)T, a.n);
    fm_emu::encoder enc;
    enc.set_buffer(out, 0);
    enc.set_buffer(x, 1);
    enc.set_buffer(w, 2);
    enc.set_bytes(&a, sizeof a, 3);
    enc.set_threadgroup_memory_length(g.tg_bytes[0], 0);
    enc.dispatch("fm_rmsnorm", g);
}

void fm_emu_matmul_q(int bits, const uint8_t *q, const uint16_t *scales, const uint16_t *biases, int rows,
                     int cols, int group_size, int scale_bf16, const float *x, int T, float *y) {
    if (bits != 4 && bits != 8) fm_emu::fail("matmul: no kernel for %d-bit weights", bits);
    if (cols % FM_QMV_VALUES_PER_LANE || group_size % FM_QMV_VALUES_PER_LANE || cols % group_size)
        fm_emu::fail("qmv_q%d: cols %d and group_size %d must be multiples of %d, cols of group_size", bits, cols,
                     group_size, FM_QMV_VALUES_PER_LANE);
    const fm_qmv_args a = {(uint32_t)rows, (uint32_t)cols, (uint32_t)group_size, (uint32_t)(scale_bf16 != 0)};
    fm_emu::encoder enc;
    enc.set_buffer(q, 0);
    enc.set_buffer(scales, 1);
    enc.set_buffer(biases, 2);
    enc.set_buffer(x, 3);
    enc.set_buffer(y, 4);
    enc.set_bytes(&a, sizeof a, 5);
    enc.dispatch(bits == 4 ? "fm_qmv_q4" : "fm_qmv_q8", fm_metal_grid_qmv((uint32_t)T, a.rows));
}

static void eltwise(const char *kernel, float *out, const float *gate, const float *b, int T, int n) {
    const fm_eltwise_args a = {(uint32_t)T * (uint32_t)n};
    fm_emu::encoder enc;
    enc.set_buffer(out, 0);
    enc.set_buffer(gate, 1);
    enc.set_buffer(b, 2);
    enc.set_bytes(&a, sizeof a, 3);
    enc.dispatch(kernel, fm_metal_grid_eltwise(a.n));
}

void fm_emu_silu_mul(float *out, const float *gate, const float *up, int T, int n) {
    eltwise("fm_silu_mul", out, gate, up, T, n);
}

void fm_emu_sigmoid_mul(float *out, const float *gate, const float *x, int T, int n) {
    eltwise("fm_sigmoid_mul", out, gate, x, T, n);
}

void fm_emu_l2norm(float *x, int T, int n, float eps, float scale) {
    const fm_l2norm_args a = {(uint32_t)n, eps, scale};
    const fm_metal_grid g = fm_metal_grid_l2norm((uint32_t)T, a.n);
    fm_emu::encoder enc;
    enc.set_buffer(x, 0);
    enc.set_bytes(&a, sizeof a, 1);
    enc.set_threadgroup_memory_length(g.tg_bytes[0], 0);
    enc.dispatch("fm_l2norm", g);
}

void fm_emu_rope(float *x, int T, int heads, int head_dim, int rot_dim, int pos0, float theta) {
    if (rot_dim % 2 || rot_dim > head_dim) fm_emu::fail("rope: rot_dim %d must be even and <= head_dim %d", rot_dim, head_dim);
    const fm_rope_args a = {(uint32_t)heads, (uint32_t)head_dim, (uint32_t)rot_dim, pos0, theta};
    fm_emu::encoder enc;
    enc.set_buffer(x, 0);
    enc.set_bytes(&a, sizeof a, 1);
    enc.dispatch("fm_rope", fm_metal_grid_rope((uint32_t)T, a.heads, a.rot_dim));
}

void fm_emu_split_q_gate(float *q, float *gate, const float *q2, int T, int nh, int hd) {
    const fm_split_q_gate_args a = {(uint32_t)T * (uint32_t)nh * (uint32_t)hd, (uint32_t)hd};
    fm_emu::encoder enc;
    enc.set_buffer(q, 0);
    enc.set_buffer(gate, 1);
    enc.set_buffer(q2, 2);
    enc.set_bytes(&a, sizeof a, 3);
    enc.dispatch("fm_split_q_gate", fm_metal_grid_eltwise(a.n));
}

void fm_emu_kv_write(float *cache, const float *src, int pos0, int T, int row) {
    const fm_kv_write_args a = {(uint32_t)T * (uint32_t)row, (uint32_t)row, (uint32_t)pos0};
    fm_emu::encoder enc;
    enc.set_buffer(cache, 0);
    enc.set_buffer(src, 1);
    enc.set_bytes(&a, sizeof a, 2);
    enc.dispatch("fm_kv_write", fm_metal_grid_eltwise(a.n));
}

void fm_emu_gate_rows(float *out, const float *g, int T, int n) {
    const fm_gate_rows_args a = {(uint32_t)T * (uint32_t)n, (uint32_t)n};
    fm_emu::encoder enc;
    enc.set_buffer(out, 0);
    enc.set_buffer(g, 1);
    enc.set_bytes(&a, sizeof a, 2);
    enc.dispatch("fm_gate_rows", fm_metal_grid_eltwise(a.total));
}

void fm_emu_deltanet_gates(float *b, float *ga, const float *A_log, const float *dt_bias, int T, int Hv) {
    const fm_deltanet_gates_args a = {(uint32_t)T * (uint32_t)Hv, (uint32_t)Hv};
    fm_emu::encoder enc;
    enc.set_buffer(b, 0);
    enc.set_buffer(ga, 1);
    enc.set_buffer(A_log, 2);
    enc.set_buffer(dt_bias, 3);
    enc.set_bytes(&a, sizeof a, 4);
    enc.dispatch("fm_deltanet_gates", fm_metal_grid_eltwise(a.n));
}

void fm_emu_deltanet_split(float *q, float *k, float *v, const float *conv, int T, int kd, int vd) {
    const fm_deltanet_split_args a = {(uint32_t)T * (2 * (uint32_t)kd + (uint32_t)vd), (uint32_t)kd, (uint32_t)vd};
    fm_emu::encoder enc;
    enc.set_buffer(q, 0);
    enc.set_buffer(k, 1);
    enc.set_buffer(v, 2);
    enc.set_buffer(conv, 3);
    enc.set_bytes(&a, sizeof a, 4);
    enc.dispatch("fm_deltanet_split", fm_metal_grid_eltwise(a.n));
}

void fm_emu_conv1d_silu(float *out, const float *x, float *state, const float *w, int T, int C, int K) {
    if (K < 1) fm_emu::fail("conv1d_silu: K %d must be >= 1", K);
    const fm_conv1d_args a = {(uint32_t)T, (uint32_t)C, (uint32_t)K};
    fm_emu::encoder enc;
    enc.set_buffer(out, 0);
    enc.set_buffer(x, 1);
    enc.set_buffer(state, 2);
    enc.set_buffer(w, 3);
    enc.set_bytes(&a, sizeof a, 4);
    enc.dispatch("fm_conv1d_silu", fm_metal_grid_conv1d(a.C));
}

void fm_emu_moe_combine(float *out, const float *ye, const int32_t *row, const float *w, int T, int k, int h) {
    const fm_moe_combine_args a = {(uint32_t)T * (uint32_t)h, (uint32_t)h, (uint32_t)k};
    fm_emu::encoder enc;
    enc.set_buffer(out, 0);
    enc.set_buffer(ye, 1);
    enc.set_buffer(row, 2);
    enc.set_buffer(w, 3);
    enc.set_bytes(&a, sizeof a, 4);
    enc.dispatch("fm_moe_combine", fm_metal_grid_eltwise(a.n));
}
