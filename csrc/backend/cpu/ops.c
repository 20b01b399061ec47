/*
 * CPU reference kernels (portable C11). These are the correctness reference for every other backend
 * and the fallback on any CPU. Quantized matmul dequantizes one weight row into fp32 and dots it with
 * every token of the chunk, so the dequantization cost is paid once per row per chunk. Accumulation
 * is fp32 throughout.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"
#include "threads.h"
#include "../../core/util.h"
#include "matmul.h"
#include "quantize_x.h"

/* ---------------------------------------------------------------- matmul */

static float dot_f32(const float *a, const float *b, int n) {
    float acc[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Row r's scales and biases as fp32, s[ng] and b[ng] (ng = cols / group_size): fp16, or bf16 bits when
 * w->scale_bf16. */
static void row_scales(const fm_mat *w, int r, int ng, float *s, float *b) {
    const uint16_t *sc = w->scales + (size_t)r * ng, *bi = w->biases + (size_t)r * ng;
    if (w->scale_bf16)
        for (int g = 0; g < ng; g++) s[g] = fm_bf16_to_f32(sc[g]), b[g] = fm_bf16_to_f32(bi[g]);
    else
        for (int g = 0; g < ng; g++) s[g] = fm_f16_to_f32(sc[g]), b[g] = fm_f16_to_f32(bi[g]);
}

void fm_cpu_get_row(const fm_mat *w, int r, float *out) {
    const int n = w->cols;
    switch (w->dtype) {
    case FM_F32:
        memcpy(out, (const float *)w->data + (size_t)r * n, (size_t)n * sizeof(float));
        return;
    case FM_BF16: {
        const uint16_t *src = (const uint16_t *)w->data + (size_t)r * n;
        for (int i = 0; i < n; i++) out[i] = fm_bf16_to_f32(src[i]);
        return;
    }
    case FM_Q8:
    case FM_Q4: {
        const int gs = w->group_size, ng = n / gs;
        float sc[ng], bi[ng];
        row_scales(w, r, ng, sc, bi);
        if (w->dtype == FM_Q8) {
            const uint8_t *q = (const uint8_t *)w->data + (size_t)r * n;
            for (int g = 0; g < ng; g++) {
                const float s = sc[g], b = bi[g];
                for (int i = g * gs; i < (g + 1) * gs; i++) out[i] = s * (float)q[i] + b;
            }
        } else {
            const uint8_t *q = (const uint8_t *)w->data + (size_t)r * (n / 2);
            for (int g = 0; g < ng; g++) {
                const float s = sc[g], b = bi[g];
                for (int i = g * gs; i < (g + 1) * gs; i += 2) {
                    const uint8_t byte = q[i / 2];
                    out[i] = s * (float)(byte & 15) + b;
                    out[i + 1] = s * (float)(byte >> 4) + b;
                }
            }
        }
        return;
    }
    }
}

/* Row r against int8 activations (cpu.h): Σ_g d_g·(scale_g·Σ q·xq + bias_g·Σ xq), x in natural order. */
static float int8_row_dot(const fm_mat *w, int r, const int8_t *xq, const float *xd, const float *xqs) {
    const int n = w->cols, gs = w->group_size, ng = n / gs;
    const uint8_t *q = (const uint8_t *)w->data + (size_t)r * (w->dtype == FM_Q4 ? n / 2 : n);
    float sc[ng], bi[ng];
    row_scales(w, r, ng, sc, bi);
    float acc = 0.0f;
    for (int g = 0; g < ng; g++) {
        int32_t dot = 0;
        for (int i = g * gs; i < (g + 1) * gs; i++)
            dot += (w->dtype == FM_Q4 ? (q[i / 2] >> ((i & 1) * 4)) & 15 : q[i]) * xq[i];
        acc += xd[g] * (sc[g] * (float)dot + bi[g] * xqs[g]);
    }
    return acc;
}

void fm_matmul_rows_scalar(const fm_matmul_args *a, int r0, int r1, float *rowbuf) {
    const fm_mat *w = a->w;
    const int n = w->cols, m = w->rows;
    if (a->xq) {
        const int ng = n / w->group_size;
        for (int r = r0; r < r1; r++)
            for (int t = 0; t < a->T; t++)
                a->y[(size_t)t * m + r] = int8_row_dot(w, r, a->xq + (size_t)t * n, a->xd + (size_t)t * ng,
                                                       a->xqs + (size_t)t * ng);
        return;
    }
    for (int r = r0; r < r1; r++) {
        const float *wr = (const float *)w->data + (size_t)r * n;
        if (w->dtype != FM_F32) {
            fm_cpu_get_row(w, r, rowbuf);
            wr = rowbuf;
        }
        for (int t = 0; t < a->T; t++) a->y[(size_t)t * m + r] = dot_f32(wr, a->x + (size_t)t * n, n);
    }
}

typedef void (*rows_fn)(const fm_matmul_args *, int, int, float *);

#ifdef FM_HAVE_NEON_KERNELS /* the Armv8.2 dot-product instructions, asked of the OS */
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
static int cpu_has_dotprod(void) { return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0; }
#elif defined(__APPLE__)
#include <sys/sysctl.h>
static int cpu_has_dotprod(void) {
    int v = 0;
    size_t n = sizeof v;
    return sysctlbyname("hw.optional.arm.FEAT_DotProd", &v, &n, NULL, 0) == 0 && v;
}
#else
static int cpu_has_dotprod(void) { return 0; }
#endif
#endif

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_NEON = 2, ISA_AVX512 = 3, ISA_NEON_DOT = 4 };
static int g_forced_isa = -1; /* -1: the best available */

int fm_cpu_isa_available(const char *name) {
    if (strcmp(name, "scalar") == 0 || strcmp(name, "auto") == 0) return 1;
#ifdef FM_HAVE_AVX2_KERNELS
    if (strcmp(name, "avx2") == 0) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    if (strcmp(name, "avx512") == 0) { /* AVX-512 VNNI for the int8 kernels, AVX2 for the rest */
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512vnni");
    }
#endif
#ifdef FM_HAVE_NEON_KERNELS
    if (strcmp(name, "neon") == 0) return 1; /* part of every AArch64 CPU */
    if (strcmp(name, "neondot") == 0) return cpu_has_dotprod();
#endif
    return 0;
}

int fm_cpu_set_isa(const char *name) {
    if (!fm_cpu_isa_available(name)) return -1;
    g_forced_isa = strcmp(name, "auto") == 0     ? -1
                   : strcmp(name, "scalar") == 0 ? ISA_SCALAR
                   : strcmp(name, "neon") == 0   ? ISA_NEON
                   : strcmp(name, "avx512") == 0 ? ISA_AVX512
                   : strcmp(name, "neondot") == 0 ? ISA_NEON_DOT
                                                 : ISA_AVX2;
    return 0;
}

static int selected_isa(void) {
    static int best = -1;
    if (best < 0)
        best = getenv("FLASHMOE_NO_SIMD")           ? ISA_SCALAR
               : fm_cpu_isa_available("avx512") ? ISA_AVX512
               : fm_cpu_isa_available("avx2") ? ISA_AVX2
               : fm_cpu_isa_available("neondot") ? ISA_NEON_DOT
               : fm_cpu_isa_available("neon") ? ISA_NEON
                                              : ISA_SCALAR;
    return g_forced_isa >= 0 ? g_forced_isa : best;
}

int fm_cpu_use_avx2(void) { return selected_isa() == ISA_AVX2 || selected_isa() == ISA_AVX512; }

static rows_fn pick_kernel(const fm_mat *w) {
#ifdef FM_HAVE_AVX2_KERNELS
    if (selected_isa() == ISA_AVX512 && fm_matmul_avx2_supports(w))
        return w->int8_act && fm_matmul_avx512_supports_int8(w) ? fm_matmul_rows_avx512 : fm_matmul_rows_avx2;
    if (selected_isa() == ISA_AVX2 && fm_matmul_avx2_supports(w)) return fm_matmul_rows_avx2;
#endif
#ifdef FM_HAVE_NEON_KERNELS
    if (selected_isa() == ISA_NEON && fm_matmul_neon_supports(w)) return fm_matmul_rows_neon;
    if (selected_isa() == ISA_NEON_DOT && fm_matmul_neon_supports(w))
        return w->int8_act ? fm_matmul_rows_neon_dot : fm_matmul_rows_neon;
#endif
    (void)w;
    return fm_matmul_rows_scalar;
}

typedef struct {
    fm_matmul_args a;
    rows_fn fn;
} matmul_job;

static void matmul_task(void *ctx, int i) {
    const matmul_job *j = (const matmul_job *)ctx;
    const int r0 = i * j->a.rows_per_task, r1 = r0 + j->a.rows_per_task < j->a.w->rows ? r0 + j->a.rows_per_task
                                                                                       : j->a.w->rows;
    float row[4 * j->a.w->cols + 8]; /* up to 4 dequantized rows; cols is bounded by the model's widths */
    j->fn(&j->a, r0, r1, row);
}

/* A per-thread buffer that only grows: the per-call copies of x would otherwise be fresh pages from
 * mmap (faulted and zeroed) on every call. */
static float *thread_buffer(size_t n) {
    static _Thread_local void *buf;
    static _Thread_local size_t cap;
    return (float *)fm_grow(&buf, &cap, n * sizeof(float), (n + n / 2) * sizeof(float));
}

typedef struct {
    const float *x;
    int n, gs, simd, permute; /* simd: an x86 SIMD kernel runs (AVX2 quantizer); permute: q4 there or NEON */
    int8_t *xq;
    float *xd, *xqs;
} quantize_job;

static void quantize_task(void *ctx, int t) {
    const quantize_job *q = (const quantize_job *)ctx;
    const int ng = q->n / q->gs;
#ifdef FM_HAVE_AVX2_KERNELS
    if (q->simd) {
        fm_quantize_x_avx2(q->x + (size_t)t * q->n, q->n, q->gs, q->permute, q->xq + (size_t)t * q->n,
                           q->xd + (size_t)t * ng, q->xqs + (size_t)t * ng);
        return;
    }
#endif
    fm_quantize_x_c(q->x + (size_t)t * q->n, q->n, q->gs, q->permute, q->xq + (size_t)t * q->n,
                    q->xd + (size_t)t * ng, q->xqs + (size_t)t * ng);
}

void fm_cpu_matmul(const fm_mat *w, const float *x, int T, float *y) {
    const int n = w->cols, m = w->rows;
    matmul_job j = {{w, x, NULL, NULL, NULL, NULL, y, T, m}, pick_kernel(w)};
    const int quant = w->dtype == FM_Q4 || w->dtype == FM_Q8;
    const int gs = w->group_size, ng = quant ? n / gs : 0, simd = j.fn != fm_matmul_rows_scalar;
    /* Quantized weights on int8 activations when asked (the same function on every variant, cpu.h).
     * Nothing here depends on T but the sizes: each token's copies of x are made alone (batch invariance,
     * matmul.h). */
    const int int8 = quant && w->int8_act && gs % 32 == 0 && gs <= 256;
    const int need_xp = simd && w->dtype == FM_Q4 && !int8;
    const size_t n_xp = need_xp ? (size_t)T * n : 0;
    const size_t n_i8 = int8 ? 2 * (size_t)T * ng + ((size_t)T * n + 3) / 4 : 0; /* xd, xqs, then xq */
    float *buf = thread_buffer(n_xp + n_i8 + 16);
    if (!buf) { /* out of memory for the copies of x: the portable fp32 kernel needs none */
        j.fn = fm_matmul_rows_scalar;
    } else {
        if (need_xp) { /* permute x per 32-element block */
            float *xp = buf;
            for (int t = 0; t < T; t++)
                for (int b = 0; b < n; b += 32)
                    for (int i = 0; i < 16; i++) {
                        xp[(size_t)t * n + b + i] = x[(size_t)t * n + b + 2 * i];
                        xp[(size_t)t * n + b + 16 + i] = x[(size_t)t * n + b + 2 * i + 1];
                    }
            j.a.xp = xp;
        }
        if (int8) {
            float *xd = buf + n_xp, *xqs = xd + (size_t)T * ng;
            int8_t *xq = (int8_t *)(xqs + (size_t)T * ng);
            quantize_job q = {x, n, gs, simd, simd && w->dtype == FM_Q4, xq, xd, xqs};
            if (T >= 16) fm_parallel_for(T, quantize_task, &q); /* a prefill chunk: ~T·n/3 ns serial */
            else
                for (int t = 0; t < T; t++) quantize_task(&q, t);
            j.a.xq = xq, j.a.xd = xd, j.a.xqs = xqs;
        }
    }
    /* Split rows over the pool when there is enough work to pay for waking it (~50 µs). */
    const double work = (double)m * n * T;
    const int threads = work < 2e5 ? 1 : fm_threads_get();
    const int tasks = threads == 1 ? 1 : threads * 4;
    j.a.rows_per_task = (m + tasks - 1) / tasks;
    j.a.rows_per_task = (j.a.rows_per_task + 3) & ~3; /* whole 4-row tiles per task */
    fm_parallel_for((m + j.a.rows_per_task - 1) / j.a.rows_per_task, matmul_task, &j);
}

/* ---------------------------------------------------------------- elementwise and norms */

void fm_cpu_rmsnorm(float *out, const float *x, const float *w, int T, int n, float eps, int zero_centered) {
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * n;
        float *ot = out + (size_t)t * n;
        double ss = 0.0;
        for (int i = 0; i < n; i++) ss += (double)xt[i] * xt[i];
        const float inv = 1.0f / sqrtf((float)(ss / n) + eps);
        for (int i = 0; i < n; i++) ot[i] = xt[i] * inv * (zero_centered ? 1.0f + w[i] : w[i]);
    }
}

void fm_cpu_l2norm(float *x, int T, int n, float eps, float scale) {
    for (int t = 0; t < T; t++) {
        float *xt = x + (size_t)t * n;
        double ss = 0.0;
        for (int i = 0; i < n; i++) ss += (double)xt[i] * xt[i];
        const float inv = scale / sqrtf((float)ss + eps);
        for (int i = 0; i < n; i++) xt[i] *= inv;
    }
}

void fm_cpu_rope(float *x, int T, int heads, int head_dim, int rot_dim, int pos0, float theta) {
    const int half = rot_dim / 2;
    for (int t = 0; t < T; t++) {
        const double pos = (double)(pos0 + t);
        for (int i = 0; i < half; i++) {
            /* HF: inv_freq = 1 / theta^(2i / rot_dim), computed in fp32 */
            const float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)rot_dim);
            const double ang = pos * (double)inv_freq;
            const float c = (float)cos(ang), s = (float)sin(ang);
            for (int h = 0; h < heads; h++) {
                float *xh = x + ((size_t)t * heads + h) * head_dim;
                const float x1 = xh[i], x2 = xh[i + half];
                xh[i] = x1 * c - x2 * s;
                xh[i + half] = x2 * c + x1 * s;
            }
        }
    }
}

FM_INLINE void silu_mul(float *out, const float *gate, const float *up, size_t total) {
    for (size_t i = 0; i < total; i++) out[i] = fm_silu(gate[i]) * up[i];
}
FM_INLINE void sigmoid_mul(float *out, const float *gate, const float *x, size_t total) {
    for (size_t i = 0; i < total; i++) out[i] = x[i] * fm_sigmoid(gate[i]);
}
static void silu_mul_plain(float *out, const float *gate, const float *up, size_t total) {
    silu_mul(out, gate, up, total);
}
static void sigmoid_mul_plain(float *out, const float *gate, const float *x, size_t total) {
    sigmoid_mul(out, gate, x, total);
}
#ifdef FM_HAVE_AVX2_COPY
FM_AVX2_COPY static void silu_mul_avx2(float *out, const float *gate, const float *up, size_t total) {
    silu_mul(out, gate, up, total);
}
FM_AVX2_COPY static void sigmoid_mul_avx2(float *out, const float *gate, const float *x, size_t total) {
    sigmoid_mul(out, gate, x, total);
}
#endif

void fm_cpu_silu_mul(float *out, const float *gate, const float *up, int T, int n) {
#ifdef FM_HAVE_AVX2_COPY
    if (fm_cpu_use_avx2()) {
        silu_mul_avx2(out, gate, up, (size_t)T * n);
        return;
    }
#endif
    silu_mul_plain(out, gate, up, (size_t)T * n);
}

void fm_cpu_sigmoid_mul(float *out, const float *gate, const float *x, int T, int n) {
#ifdef FM_HAVE_AVX2_COPY
    if (fm_cpu_use_avx2()) {
        sigmoid_mul_avx2(out, gate, x, (size_t)T * n);
        return;
    }
#endif
    sigmoid_mul_plain(out, gate, x, (size_t)T * n);
}

/* ---------------------------------------------------------------- attention */

typedef struct {
    float *out;
    const float *q, *k_cache, *v_cache;
    int T, pos0, nh, nkv, hd;
    float scale;
} attention_job;

/* A task takes ATT_TOKENS tokens' query heads that share one KV head and walks their causal keys in
 * blocks of ATT_KEYS: a block's K and V rows (16 KiB at head_dim 256) come from the cache once for all
 * of those rows and stay in L1 while the rows go over them, two at a time. (One token per task streamed
 * the whole cache once per token: at 8K positions the loads of K were most of attention's time.) */
enum { ATT_TOKENS = 4, ATT_KEYS = 8 };

/* 8 floats as one value (GCC and Clang vector extensions): 8 lanes of AVX2 in the AVX2 build of the
 * attention loops, two SSE or NEON registers elsewhere. Explicit, because the loops below have too many
 * pointers for the auto-vectoriser's alias checks. */
typedef float fv8 __attribute__((vector_size(32)));
/* An unaligned load, as a macro: a function returning fv8 makes GCC warn (-Wpsabi) that the ABI of an
 * AVX-sized return differs without AVX, static and inlined as it is. */
typedef float fv8_unaligned __attribute__((vector_size(32), aligned(4), may_alias));
#define load8(p) (*(const fv8_unaligned *)(p))

/* s[r][k] = q_r · kr[k] · scale for two query rows and the block's keys, 4 keys at a time: each K load
 * feeds both rows (two loads were one FMA in a dot at a time, and loads bound it), and each (row, key)
 * keeps 8 lanes of partial sums, added once at the end. */
static inline __attribute__((always_inline)) void block_scores(const float *const q[2], const float *const kr[ATT_KEYS],
                                                               int hd, float scale, float s[2][ATT_KEYS]) {
    for (int k0 = 0; k0 < ATT_KEYS; k0 += 4) {
        fv8 a[2][4];
        for (int k = 0; k < 4; k++) a[0][k] = a[1][k] = (fv8){0}; /* not "= {0}": GCC zeroes that in memory */
        int d = 0;
        for (; d + 8 <= hd; d += 8) {
            const fv8 q0 = load8(q[0] + d), q1 = load8(q[1] + d);
            for (int k = 0; k < 4; k++) {
                const fv8 kv = load8(kr[k0 + k] + d);
                a[0][k] += q0 * kv;
                a[1][k] += q1 * kv;
            }
        }
        for (int r = 0; r < 2; r++)
            for (int k = 0; k < 4; k++) {
                const fv8 v = a[r][k];
                float t = ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
                for (int e = d; e < hd; e++) t += q[r][e] * kr[k0 + k][e];
                s[r][k0 + k] = t * scale;
            }
    }
}

/* Two query rows (q, o, running max mx and sum) over keys [j0, j0 + nb[r]) of one KV head (kb, vb: the
 * block's first K and V rows, stride floats apart; the rows' blocks may differ in length at the causal
 * edge, keys past a row's own are read but weigh 0): softmax online per block (o is rescaled when a
 * block raises the max), so no buffer of scores beyond a block's, and each pass over o adds a whole
 * block of value rows. */
static inline __attribute__((always_inline)) void attend_rows(const float *const q[2], float *const o[2], float *mx,
                                                              float *sum, const float *kb, const float *vb,
                                                              size_t stride, const int nb[2], int hd, float scale) {
    const int n = nb[0] > nb[1] ? nb[0] : nb[1];
    const float *kr[ATT_KEYS], *vr[ATT_KEYS];
    for (int k = 0; k < ATT_KEYS; k++) { /* a short block: the first row again, weight 0 */
        kr[k] = kb + (k < n ? k : 0) * stride;
        vr[k] = vb + (k < n ? k : 0) * stride;
    }
    float s[2][ATT_KEYS];
    block_scores(q, kr, hd, scale, s);
    for (int r = 0; r < 2; r++) {
        float m = mx[r];
        for (int k = 0; k < nb[r]; k++) m = s[r][k] > m ? s[r][k] : m;
        if (m > mx[r]) { /* rescale what was summed under the old max */
            const float c = fm_exp(mx[r] - m);
            sum[r] *= c;
            for (int e = 0; e < hd; e++) o[r][e] *= c;
            mx[r] = m;
        }
        for (int k = 0; k < ATT_KEYS; k++) s[r][k] = fm_exp(s[r][k] - m);
        for (int k = nb[r]; k < ATT_KEYS; k++) s[r][k] = 0.0f;
        for (int k = 0; k < ATT_KEYS; k++) sum[r] += s[r][k];
    }
    int e = 0;
    for (; e + 8 <= hd; e += 8) {
        fv8 a0 = load8(o[0] + e), a1 = load8(o[1] + e);
        for (int k = 0; k < ATT_KEYS; k++) {
            const fv8 v = load8(vr[k] + e);
            a0 += s[0][k] * v;
            a1 += s[1][k] * v;
        }
        memcpy(o[0] + e, &a0, sizeof a0);
        memcpy(o[1] + e, &a1, sizeof a1);
    }
    for (; e < hd; e++)
        for (int k = 0; k < ATT_KEYS; k++) o[0][e] += s[0][k] * vr[k][e], o[1][e] += s[1][k] * vr[k][e];
}

/* Task i: tokens t0 .. t0 + nt (at most ATT_TOKENS) × the G query heads of KV head g; token t attends
 * to positions [0, pos0 + t]. Row r = tt·G + h; an odd row out is paired with a copy of itself whose
 * output goes to a spare buffer. */
static inline __attribute__((always_inline)) void attention_body(const attention_job *a, int i) {
    const int nkv = a->nkv, hd = a->hd, G = a->nh / nkv, g = i % nkv, t0 = (i / nkv) * ATT_TOKENS;
    const int nt = a->T - t0 < ATT_TOKENS ? a->T - t0 : ATT_TOKENS;
    const size_t stride = (size_t)nkv * hd; /* from one position's row of this KV head to the next */
    const size_t tok = (size_t)a->nh * hd;  /* from one token's query (and output) rows to the next */
    const size_t first = (size_t)t0 * tok + (size_t)g * G * hd; /* token t0's row of head g·G */
    const int rows = nt * G;
    float mx[ATT_TOKENS * G + 1], sum[ATT_TOKENS * G + 1], spare[hd];
    for (int r = 0; r <= rows; r++) mx[r] = -INFINITY, sum[r] = 0.0f;
    for (int tt = 0; tt < nt; tt++) memset(a->out + first + tt * tok, 0, (size_t)G * hd * sizeof(float));
    memset(spare, 0, sizeof spare);
    for (int j0 = 0; j0 < a->pos0 + t0 + nt; j0 += ATT_KEYS) {
        const float *kb = a->k_cache + ((size_t)j0 * nkv + g) * hd, *vb = a->v_cache + ((size_t)j0 * nkv + g) * hd;
        for (int r = 0; r < rows; r += 2) {
            const float *q[2];
            float *o[2];
            int nb[2];
            for (int p = 0; p < 2; p++) {
                const int rr = r + p < rows ? r + p : r, tt = rr / G, h = rr % G;
                const int left = a->pos0 + t0 + tt + 1 - j0; /* keys of this row from j0 on */
                q[p] = a->q + first + tt * tok + (size_t)h * hd;
                o[p] = r + p < rows ? a->out + first + tt * tok + (size_t)h * hd : spare;
                nb[p] = left < 0 ? 0 : (left < ATT_KEYS ? left : ATT_KEYS);
            }
            if (nb[0] == 0 && nb[1] == 0) continue;
            attend_rows(q, o, &mx[r], &sum[r], kb, vb, stride, nb, hd, a->scale); /* mx[rows]: the spare's */
        }
    }
    for (int tt = 0; tt < nt; tt++)
        for (int h = 0; h < G; h++) {
            float *oh = a->out + first + tt * tok + (size_t)h * hd;
            for (int e = 0; e < hd; e++) oh[e] /= sum[tt * G + h];
        }
}

static void attention_task(void *ctx, int i) { attention_body((const attention_job *)ctx, i); }
#ifdef FM_HAVE_AVX2_KERNELS /* the same loops compiled for AVX2 + FMA, taken when the AVX2 kernels are */
__attribute__((target("avx2,fma"))) static void attention_task_avx2(void *ctx, int i) {
    attention_body((const attention_job *)ctx, i);
}
#endif

void fm_cpu_attention(float *out, const float *q, const float *k_cache, const float *v_cache, int T, int pos0,
                     int nh, int nkv, int hd, float scale) {
    attention_job a = {out, q, k_cache, v_cache, T, pos0, nh, nkv, hd, scale};
    fm_task_fn fn = attention_task;
#ifdef FM_HAVE_AVX2_KERNELS
    if (fm_cpu_use_avx2()) fn = attention_task_avx2;
#endif
    fm_parallel_for((T + ATT_TOKENS - 1) / ATT_TOKENS * nkv, fn, &a); /* (token block, KV head): independent */
}

typedef struct {
    float *out;
    const float *x, *state, *w;
    int T, C, K, per_task;
} conv_job;

/* Channels [c0, c0 + per_task) for every token (each channel is its own filter), CONV_BLOCK channels at
 * a time with their taps transposed to [K][CONV_BLOCK], so the loops over channels vectorise. */
enum { CONV_BLOCK = 64 };
FM_INLINE void conv_channels(const conv_job *a, int i) {
    const int K = a->K, S = K - 1, C = a->C, c0 = i * a->per_task, c1 = c0 + a->per_task < C ? c0 + a->per_task : C;
    for (int cb = c0; cb < c1; cb += CONV_BLOCK) {
        const int nb = c1 - cb < CONV_BLOCK ? c1 - cb : CONV_BLOCK;
        float wt[K][CONV_BLOCK], acc[CONV_BLOCK];
        for (int j = 0; j < K; j++)
            for (int c = 0; c < nb; c++) wt[j][c] = a->w[(size_t)(cb + c) * K + j];
        for (int t = 0; t < a->T; t++) {
            for (int c = 0; c < nb; c++) acc[c] = 0.0f;
            for (int j = 0; j < K; j++) {
                const int src = t - S + j; /* < 0: from the state */
                const float *v = (src >= 0 ? a->x + (size_t)src * C : a->state + (size_t)(S + src) * C) + cb;
                for (int c = 0; c < nb; c++) acc[c] += wt[j][c] * v[c];
            }
            float *o = a->out + (size_t)t * C + cb;
            for (int c = 0; c < nb; c++) o[c] = fm_silu(acc[c]);
        }
    }
}

static void conv_task(void *ctx, int i) { conv_channels((const conv_job *)ctx, i); }
#ifdef FM_HAVE_AVX2_COPY
FM_AVX2_COPY static void conv_task_avx2(void *ctx, int i) { conv_channels((const conv_job *)ctx, i); }
#endif

void fm_cpu_conv1d_silu(float *out, const float *x, float *state, const float *w, int T, int C, int K) {
    /* HF: F.conv1d(pad K-1 left, groups=C)[:T]; out[t] = sum_j w[j] * in[t - (K-1) + j] */
    const int S = K - 1;
    conv_job a = {out, x, state, w, T, C, K, C};
    if ((double)T * C * K >= 2e5) a.per_task = (C + 4 * fm_threads_get() - 1) / (4 * fm_threads_get());
    fm_task_fn task = conv_task;
#ifdef FM_HAVE_AVX2_COPY
    if (fm_cpu_use_avx2()) task = conv_task_avx2;
#endif
    fm_parallel_for((C + a.per_task - 1) / a.per_task, task, &a);
    /* The new state is the last S inputs of [state | x]. */
    if (T >= S) {
        memcpy(state, x + (size_t)(T - S) * C, (size_t)S * C * sizeof(float));
    } else {
        memmove(state, state + (size_t)T * C, (size_t)(S - T) * C * sizeof(float));
        memcpy(state + (size_t)(S - T) * C, x, (size_t)T * C * sizeof(float));
    }
}

/* ---------------------------------------------------------------- router */

/* whether logit a ranks above b: greater, or b NaN and a not (NaN after every number) */
static inline int route_above(float a, float b) { return a > b || (isnan(b) && !isnan(a)); }

/* the softmax term of logit l, mx the max of the numbers: 1 at the max itself (an inf or all -inf max: no
 * inf - inf), NaN for NaN */
static inline double route_e(float l, float mx) { return l == mx ? 1.0 : exp((double)(l - mx)); }

/* Non-finite logits (the contract the GPU routers follow, cuda/route.cu's header): NaN ranks after every
 * number, so the choices are always k distinct indices in [0, n); a NaN anywhere makes the sum, so every
 * weight, NaN; +inf maxima share the weight equally (the others 0), all -inf gives 1/n each. */
void fm_cpu_topk_softmax(const float *logits, int n, int k, int norm, int32_t *idx, float *weights) {
    float mx = -INFINITY;
    for (int i = 0; i < n; i++)
        if (logits[i] > mx) mx = logits[i];
    double sum = 0.0;
    for (int i = 0; i < n; i++) sum += route_e(logits[i], mx);
    /* Selection by logit equals selection by probability (softmax is monotonic); ties go to the
     * lower index, as torch.topk does on CPU for distinct values. */
    for (int j = 0; j < k; j++) idx[j] = -1;
    for (int i = 0; i < n; i++) {
        int pos = k;
        while (pos > 0 && (idx[pos - 1] < 0 || route_above(logits[i], logits[idx[pos - 1]]))) pos--;
        if (pos >= k) continue;
        for (int j = k - 1; j > pos; j--) idx[j] = idx[j - 1];
        idx[pos] = i;
    }
    float wsum = 0.0f;
    for (int j = 0; j < k; j++) {
        weights[j] = (float)(route_e(logits[idx[j]], mx) / sum);
        wsum += weights[j];
    }
    if (norm)
        for (int j = 0; j < k; j++) weights[j] /= wsum;
}
