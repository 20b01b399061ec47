/* ops.h — the emulated Metal backend's ops (ops.cpp). */
#ifndef FM_EMU_OPS_H
#define FM_EMU_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h" /* fm_mat, fm_expert_work (csrc/backend/) */

void fm_emu_add(float *x, const float *y, size_t n);
void fm_emu_rmsnorm(float *out, const float *x, const float *w, int T, int n, float eps, int zero_centered);
/* y[T, rows] = x[T, cols] · Wᵀ (backend.h's matmul): f32, bf16, q4 or q8 W (fm_metal_args.h's layout), q4/q8
 * on int8 activations where w->int8_act and the group size allows (cpu.h) */
/* the int8 activations of x[T, cols] per group of gs (cpu.h): xq [T, cols], xd, xqs [T, cols / gs] */
void fm_emu_quantize_x(const float *x, int T, int cols, int gs, int8_t *xq, float *xd, float *xqs);
void fm_emu_matmul(const fm_mat *w, const float *x, int T, float *y);
/* backend.h's experts: each work's tokens gathered, then down(silu(gate·x) ⊙ up·x) into its rows of ye */
void fm_emu_experts(const fm_expert_work *work, int n_work, const float *xn, float *ye, int h);
void fm_emu_silu_mul(float *out, const float *gate, const float *up, int T, int n);
void fm_emu_sigmoid_mul(float *out, const float *gate, const float *x, int T, int n);
void fm_emu_l2norm(float *x, int T, int n, float eps, float scale);
void fm_emu_rope(float *x, int T, int heads, int head_dim, int rot_dim, int pos0, float theta);
void fm_emu_split_q_gate(float *q, float *gate, const float *q2, int T, int nh, int hd);
void fm_emu_kv_write(float *cache, const float *src, int pos0, int T, int row);
void fm_emu_gate_rows(float *out, const float *g, int T, int n);
void fm_emu_deltanet_gates(float *b, float *a, const float *A_log, const float *dt_bias, int T, int Hv);
void fm_emu_deltanet_split(float *q, float *k, float *v, const float *conv, int T, int kd, int vd);
void fm_emu_conv1d_silu(float *out, const float *x, float *state, const float *w, int T, int C, int K);
/* row and w: [T, k], on the device (the host copies them there) */
void fm_emu_moe_combine(float *out, const float *ye, const int32_t *row, const float *w, int T, int k, int h);
/* out[T, cols] = rows ids[t] of W dequantized (cpu.h's fm_cpu_get_row): bits 32 (f32), 16 (bf16), 8 or 4 (with
 * fp16 or, scale_bf16, bfloat16 scales and biases); ids on the device (the host copies them there) */
void fm_emu_embed(int bits, const void *data, const uint16_t *scales, const uint16_t *biases, int rows, int cols,
                  int group_size, int scale_bf16, const int32_t *ids, int T, float *out);
/* backend.h's route: idx and weights [T, k] on the device (the host copies them back) */
void fm_emu_route(const float *logits, int T, int E, int k, int norm, int32_t *idx, float *weights);
/* cpu.h's fm_cpu_attention; split: the flash-decoding split (1), the one-pass kernel (0), or the host's
 * choice, fm_metal_attention_split (-1): the same bits whichever */
void fm_emu_attention(float *out, const float *q, const float *k_cache, const float *v_cache, int T, int pos0, int nh,
                      int nkv, int hd, float scale, int split);
/* backend.h's gated_delta: out [T, Hv, dv], S [Hv, dk, dv] updated (the recurrent form for every T, so
 * pos0 only documents where the tokens are) */
void fm_emu_gated_delta(float *out, float *S, const float *q, const float *k, const float *v, const float *g,
                        const float *beta, int T, int pos0, int Hk, int Hv, int dk, int dv);

#endif
