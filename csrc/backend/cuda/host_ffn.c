/*
 * host_ffn.c — routed experts' FFNs on the host with the bits of the CUDA kernels (host_ffn.h): the CUDA backend
 * hands the CPU a share of decode's VRAM misses, their weights read from host memory where they lie instead of
 * crossing PCIe first (cuda_experts.cu). The outputs must not depend on which side computed them (tokens do
 * not depend on the budget), so this replays matmul.cu's fm_mm on int8 activations operation for operation:
 *   x quantized per weight group as fm_quantize_x does (m = max|x|, q = rint(x·(127/m)), xd = m/127, xs = Σ q of
 *   each chunk of V columns: q4 32, q8 16); per (row, token) chunk c's d = Σ w·q (an exact integer) folded by lane
 *   c mod 32, chunks in column order, acc = fma(xd, fma(s, d, b·xs), acc) from +0; the 32 lanes' sums added by the
 *   xor butterfly's tree (16, 8, 4, 2, 1, the lower lane on the left); gate and up into silu(g)·u by exp_fma.h
 *   (eltwise.cuh's), h quantized by down's groups, down likewise.
 * AVX2: 8 chunks' integer dots at a time (one vector each, then summed across in one transposed tree), which are 8
 * consecutive lanes' next chunks: the fold runs on 4 vectors of 8 lanes, every lane's operations those above. The
 * file is compiled with -ffp-contract=off (CMakeLists.txt): every fma here is written out.
 */
#include "host_ffn.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../../core/exp_fma.h"
#include "../../core/util.h"
#include "../cpu/quantize_x.h"
#include "../cpu/threads.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FMH_X86 1
#endif

#define FMH_MAX_NG 1024 /* groups a row (fmh_takes): the per-row scale buffers live on the stack */
#define ROWS_GU 16      /* gate and up rows a task */
#define ROWS_DOWN 64    /* down rows a task */

/* ---- activations */

/* One token's int8 activations for a matrix: xq [cols] (q4: each chunk of 32 as its 16 even columns, then its 16
 * odd ones, the order of a packed byte's low and high nibbles), xd [ng], xs [nc]. */
typedef struct {
    int8_t *xq;
    float *xd, *xs;
} tokq;

typedef struct {
    int q4, V, cols, gs, ng, nc, cpg; /* cpg: chunks a group */
    size_t row_bytes;
} shape;

static shape shape_of(const fm_mat *w) {
    shape s;
    s.q4 = w->dtype == FM_Q4, s.V = s.q4 ? 32 : 16, s.cols = w->cols, s.gs = w->group_size;
    s.ng = w->cols / w->group_size, s.nc = w->cols / s.V, s.cpg = s.gs / s.V;
    s.row_bytes = (size_t)fm_tensor_data_bytes(w->dtype, 1, w->cols);
    return s;
}

/* The CPU's quantizer (quantize_x.h), whose roundings matmul.cu's fm_quantize_x has (a NaN product gives 0 on
 * x86 and Arm alike, as __float2int_rn); xs, Σ xq of each chunk, from its bytes (in any order: integers) */
static void quantize(const shape *s, const float *x, tokq q) {
    float group_sums[FMH_MAX_NG];
    fm_quantize_x_c(x, s->cols, s->gs, s->q4, q.xq, q.xd, group_sums);
    for (int c = 0; c < s->nc; c++) {
        int sum = 0;
        for (int i = 0; i < s->V; i++) sum += q.xq[(size_t)c * s->V + i];
        q.xs[c] = (float)sum;
    }
}

/* a stored scale or bias as a float: bfloat16, or float16 */
static float scale_value(uint16_t bits, int bf16) { return bf16 ? fm_bf16_to_f32(bits) : fm_f16_to_f32(bits); }

/* ---- one row · one token, portable: the definition */

static int chunk_dot(const shape *s, const uint8_t *w, const int8_t *xq) {
    int d = 0;
    if (s->q4)
        for (int i = 0; i < 16; i++) d += (w[i] & 15) * xq[i] + (w[i] >> 4) * xq[16 + i];
    else
        for (int i = 0; i < 16; i++) d += w[i] * xq[i];
    return d;
}

/* the butterfly's sum of A[0..32): at each level lane i (< o) adds lane i + o's value */
static float butterfly(float *A) {
    for (int o = 16; o > 0; o >>= 1)
        for (int i = 0; i < o; i++) A[i] = A[i] + A[i + o];
    return A[0];
}

static float row_dot_c(const shape *s, const uint8_t *row, const float *sf, const float *bf, tokq q) {
    float A[32];
    for (int l = 0; l < 32; l++) {
        float acc = 0.0f;
        for (int c = l; c < s->nc; c += 32) {
            const int g = c / s->cpg, d = chunk_dot(s, row + (size_t)c * 16, q.xq + (size_t)c * s->V);
            acc = fmaf(q.xd[g], fmaf(sf[g], (float)d, bf[g] * q.xs[c]), acc);
        }
        A[l] = acc;
    }
    return butterfly(A);
}

/* ---- AVX2 */

#ifdef FMH_X86
#define AVX2 __attribute__((target("avx2,fma,f16c")))

/* [Σ v0, ..., Σ v7]: each vector's 8 lanes summed (integers: any order) */
AVX2 static __m256i hsum8(const __m256i *v) {
    const __m256i t0 = _mm256_hadd_epi32(v[0], v[1]), t1 = _mm256_hadd_epi32(v[2], v[3]);
    const __m256i t2 = _mm256_hadd_epi32(v[4], v[5]), t3 = _mm256_hadd_epi32(v[6], v[7]);
    const __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

/* chunks c0..c0+7's integer dots */
AVX2 static __m256i dots8(const shape *s, const uint8_t *w, const int8_t *xq) {
    __m256i v[8];
    if (s->q4) {
        const __m256i lo = _mm256_set1_epi8(15);
        for (int j = 0; j < 8; j++) {
            const __m128i b = _mm_loadu_si128((const __m128i *)(w + 16 * j));
            const __m256i wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), lo); /* low | high nibbles */
            const __m256i p = _mm256_maddubs_epi16(wv, _mm256_loadu_si256((const __m256i *)(xq + 32 * j))); /* <= 3810 */
            v[j] = _mm256_madd_epi16(p, _mm256_set1_epi16(1));
        }
    } else { /* u8 · s8 pairs overflow int16 (maddubs saturates): widened first */
        for (int j = 0; j < 8; j++) {
            const __m256i wv = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(w + 16 * j)));
            const __m256i xv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(xq + 16 * j)));
            v[j] = _mm256_madd_epi16(wv, xv);
        }
    }
    return hsum8(v);
}

/* rows' dots where nc % 8 == 0; rel[b], g0[b]: block b's chunks' groups less the first's, and the first */
AVX2 static float row_dot_avx2(const shape *s, const uint8_t *row, const float *sf, const float *bf, tokq q,
                               const __m256i *rel, const int *g0) {
    __m256 A[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int b = 0; b < s->nc / 8; b++) {
        const int c0 = 8 * b;
        const __m256 d = _mm256_cvtepi32_ps(dots8(s, row + (size_t)c0 * 16, q.xq + (size_t)c0 * s->V));
        const __m256 sv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(sf + g0[b]), rel[b]);
        const __m256 bv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(bf + g0[b]), rel[b]);
        const __m256 xd = _mm256_permutevar8x32_ps(_mm256_loadu_ps(q.xd + g0[b]), rel[b]);
        const __m256 t = _mm256_fmadd_ps(sv, d, _mm256_mul_ps(bv, _mm256_loadu_ps(q.xs + c0)));
        A[b & 3] = _mm256_fmadd_ps(xd, t, A[b & 3]);
    }
    const __m256 B0 = _mm256_add_ps(A[0], A[2]), B1 = _mm256_add_ps(A[1], A[3]), C = _mm256_add_ps(B0, B1);
    const __m128 D = _mm_add_ps(_mm256_castps256_ps128(C), _mm256_extractf128_ps(C, 1));
    const __m128 E = _mm_add_ps(D, _mm_movehl_ps(D, D));
    return _mm_cvtss_f32(_mm_add_ss(E, _mm_shuffle_ps(E, E, 1)));
}

AVX2 static void scales_avx2(const uint16_t *p, int n, int bf16, float *out) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128((const __m128i *)(p + i));
        _mm256_storeu_ps(out + i, bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                                       : _mm256_cvtph_ps(h));
    }
    for (; i < n; i++) out[i] = scale_value(p[i], bf16);
}

static int have_avx2(void) { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"); }
#endif

/* ---- a matrix's rows over a job's tokens */

/* What a shape's AVX2 rows need, made once a call for each shape (gate and up have one): per block of 8 chunks its
 * first chunk's group and the others' offsets from it */
typedef struct {
    shape s;
    int isa; /* AVX2 on this matrix (nc % 8 == 0) */
#ifdef FMH_X86
    __m256i *rel;
    int *g0;
#endif
} mat_plan;

static int plan(mat_plan *p, const fm_mat *w, int isa) {
    p->s = shape_of(w);
#ifdef FMH_X86
    if (isa && p->s.nc % 8 == 0) {
        const int nb = p->s.nc / 8;
        p->rel = (__m256i *)aligned_alloc(32, sizeof(__m256i) * (size_t)nb);
        p->g0 = (int *)malloc(sizeof(int) * (size_t)nb);
        if (!p->rel || !p->g0) return 0;
        for (int b = 0; b < nb; b++) {
            int r[8];
            p->g0[b] = 8 * b / p->s.cpg;
            for (int j = 0; j < 8; j++) r[j] = (8 * b + j) / p->s.cpg - p->g0[b];
            memcpy(&p->rel[b], r, sizeof r);
        }
        p->isa = 1;
    }
#else
    (void)isa;
#endif
    return 1;
}

static void plan_free(mat_plan *p) {
#ifdef FMH_X86
    free(p->rel), free(p->g0);
#endif
    (void)p;
}

/* out[t · stride + r] = row r of w · token t (t < n), rows [r0, r1) */
static void rows_dot(const mat_plan *p, const fm_mat *w, const tokq *q, int n, int r0, int r1, float *out, size_t stride) {
    const shape *s = &p->s;
    float sf[FMH_MAX_NG + 8], bf[FMH_MAX_NG + 8];
    memset(sf + s->ng, 0, 8 * sizeof(float)), memset(bf + s->ng, 0, 8 * sizeof(float));
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)r * s->row_bytes;
        const uint16_t *sc = w->scales + (size_t)r * s->ng, *bi = w->biases + (size_t)r * s->ng;
#ifdef FMH_X86
        if (p->isa) {
            scales_avx2(sc, s->ng, w->scale_bf16, sf), scales_avx2(bi, s->ng, w->scale_bf16, bf);
            for (int t = 0; t < n; t++) out[t * stride + r] = row_dot_avx2(s, row, sf, bf, q[t], p->rel, p->g0);
            continue;
        }
#endif
        for (int g = 0; g < s->ng; g++) sf[g] = scale_value(sc[g], w->scale_bf16), bf[g] = scale_value(bi[g], w->scale_bf16);
        for (int t = 0; t < n; t++) out[t * stride + r] = row_dot_c(s, row, sf, bf, q[t]);
    }
}

/* ---- the jobs */

typedef struct {
    const fmh_job *job;
    const mat_plan *gu, *down; /* gate's and up's (one shape), down's */
    tokq *qx, *qh; /* [n] each token's activations for gate/up, and of its h for down */
    float *g, *u;  /* [n, I] gate · x, up · x, then h = silu(g)·u in g */
} job_state;

typedef struct {
    job_state *js;
    int n_jobs, *first; /* first[j]: job j's first task */
    int phase;          /* 0: gate and up; 1: down */
    const float *xn;
    int h;
} run_ctx;

static void task(void *vctx, int i) {
    run_ctx *c = (run_ctx *)vctx;
    int j = 0;
    while (j + 1 < c->n_jobs && c->first[j + 1] <= i) j++;
    job_state *s = &c->js[j];
    const fmh_job *b = s->job;
    const int k = i - c->first[j], n = b->n, I = b->gate->rows;
    if (c->phase == 0) {
        const int r0 = k * ROWS_GU, r1 = r0 + ROWS_GU < I ? r0 + ROWS_GU : I;
        rows_dot(s->gu, b->gate, s->qx, n, r0, r1, s->g, (size_t)I);
        rows_dot(s->gu, b->up, s->qx, n, r0, r1, s->u, (size_t)I);
        for (int t = 0; t < n; t++)
            for (int r = r0; r < r1; r++) s->g[(size_t)t * I + r] = fm_silu_mul_fma(s->g[(size_t)t * I + r], s->u[(size_t)t * I + r]);
    } else {
        const int r0 = k * ROWS_DOWN, r1 = r0 + ROWS_DOWN < c->h ? r0 + ROWS_DOWN : c->h;
        rows_dot(s->down, b->down, s->qh, n, r0, r1, b->out, (size_t)c->h);
    }
}

int fmh_takes(const fm_mat *gate, const fm_mat *up, const fm_mat *down) {
    const fm_mat *m[3] = {gate, up, down};
    for (int i = 0; i < 3; i++) {
        const fm_mat *w = m[i];
        if ((w->dtype != FM_Q4 && w->dtype != FM_Q8) || !w->int8_act || w->group_size <= 0 || w->group_size % 32 ||
            w->group_size > 256 || w->cols % w->group_size || w->cols / 32 > FMH_MAX_NG)
            return 0;
    }
    return gate->dtype == up->dtype && gate->rows == up->rows && gate->cols == up->cols &&
           gate->group_size == up->group_size && gate->scale_bf16 == up->scale_bf16 && down->cols == gate->rows &&
           down->rows == gate->cols;
}

static size_t tokq_bytes(const shape *s) { return (size_t)s->cols + sizeof(float) * (size_t)(s->ng + s->nc + 8); }
static tokq tokq_at(const shape *s, uint8_t *p) {
    tokq q;
    q.xd = (float *)p, q.xs = q.xd + s->ng + 8, q.xq = (int8_t *)(q.xs + s->nc);
    memset(q.xd + s->ng, 0, 8 * sizeof(float)); /* read past ng by the AVX2 permutes (never used) */
    return q;
}

/* the plan of w's shape among plans[0..*n), made there if new; NULL when out of memory */
static const mat_plan *plan_of(mat_plan *plans, int *n, const fm_mat *w, int isa) {
    for (int i = 0; i < *n; i++)
        if (plans[i].s.q4 == (w->dtype == FM_Q4) && plans[i].s.cols == w->cols && plans[i].s.gs == w->group_size)
            return &plans[i];
    mat_plan *p = &plans[(*n)++]; /* counted even if it fails: plan_free frees what it got */
    return plan(p, w, isa) ? p : NULL;
}

int fmh_experts(const fmh_job *jobs, int n_jobs, const float *xn, int h, int isa) {
    if (n_jobs <= 0) return 0;
#ifdef FMH_X86
    isa = isa && have_avx2();
#else
    isa = 0;
#endif
    job_state *js = (job_state *)calloc((size_t)n_jobs, sizeof(job_state));
    mat_plan *plans = (mat_plan *)calloc(2 * (size_t)n_jobs, sizeof(mat_plan)); /* 2 shapes a job at most */
    int *first = (int *)malloc(sizeof(int) * ((size_t)n_jobs + 1)), n_plans = 0;
    size_t bytes = 0;
    for (int j = 0; j < n_jobs && js; j++) {
        const shape sx = shape_of(jobs[j].gate), sh = shape_of(jobs[j].down);
        const size_t n = (size_t)jobs[j].n, I = (size_t)jobs[j].gate->rows;
        bytes += n * (sizeof(tokq) * 2 + tokq_bytes(&sx) + tokq_bytes(&sh) + 2 * I * sizeof(float)) + 64 * 4;
    }
    uint8_t *mem = js && plans && first ? (uint8_t *)malloc(bytes) : NULL;
    int ok = mem != NULL;
    uint8_t *p = mem;
    for (int j = 0; j < n_jobs && ok; j++) {
        job_state *s = &js[j];
        const fmh_job *b = &jobs[j];
        s->job = b;
        s->gu = plan_of(plans, &n_plans, b->gate, isa), s->down = plan_of(plans, &n_plans, b->down, isa);
        if (!(ok = s->gu && s->down)) break;
        const size_t n = (size_t)b->n, I = (size_t)b->gate->rows;
        p = (uint8_t *)(((uintptr_t)p + 63) & ~(uintptr_t)63);
        s->qx = (tokq *)p, p += n * sizeof(tokq);
        s->qh = (tokq *)p, p += n * sizeof(tokq);
        s->g = (float *)p, p += n * I * sizeof(float);
        s->u = (float *)p, p += n * I * sizeof(float);
        for (size_t t = 0; t < n; t++) {
            s->qx[t] = tokq_at(&s->gu->s, p), p += tokq_bytes(&s->gu->s);
            s->qh[t] = tokq_at(&s->down->s, p), p += tokq_bytes(&s->down->s);
            quantize(&s->gu->s, xn + (size_t)b->tok[t] * (size_t)h, s->qx[t]);
        }
    }
    if (ok) {
        run_ctx c = {js, n_jobs, first, 0, xn, h};
        first[0] = 0;
        for (int j = 0; j < n_jobs; j++) first[j + 1] = first[j] + (jobs[j].gate->rows + ROWS_GU - 1) / ROWS_GU;
        fm_parallel_for(first[n_jobs], task, &c);
        for (int j = 0; j < n_jobs; j++) /* h quantized by down's groups */
            for (int t = 0; t < jobs[j].n; t++)
                quantize(&js[j].down->s, js[j].g + (size_t)t * (size_t)jobs[j].gate->rows, js[j].qh[t]);
        c.phase = 1;
        for (int j = 0; j < n_jobs; j++) first[j + 1] = first[j] + (h + ROWS_DOWN - 1) / ROWS_DOWN;
        fm_parallel_for(first[n_jobs], task, &c);
    }
    for (int i = 0; i < n_plans; i++) plan_free(&plans[i]);
    free(mem), free(first), free(plans), free(js);
    return ok ? 0 : FM_ERR_NOMEM;
}
