/*
 * sample.c — the token sampler: penalties, temperature, top_k, top_p, min_p and a seeded draw
 * (semantics in flashmoe.h). Built for a 248k vocabulary: the probabilities come from one vectorisable
 * pass (a polynomial exp), top_k from a bounded heap, top_p from a bucket histogram of the tokens that
 * can matter, so only the few candidates at the top_p boundary are ever sorted.
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

enum { BLOCK = 1024 }; /* tokens per block of exp sums */

typedef struct {
    float e;
    int32_t id;
} cand;

struct fm_sampler {
    fm_sampling p;
    int V;
    int32_t *count;   /* [V] times each id was accepted */
    int32_t *touched; /* [V] ids with count > 0, in first-seen order */
    int n_touched;
    uint64_t rng[4];  /* xoshiro256** */
    float *e;         /* [V] exp((l - max) / T) of the candidates */
    int32_t *ids;     /* [V] candidate ids (parallel to e) */
    float *e2;        /* [V] kept after top_p / min_p */
    int32_t *ids2;    /* [V] */
    double *hist;     /* [NB] top_p bucket masses */
    cand *tmp;        /* [2V] the top_p boundary bucket, then the candidates above tau */
    double *blk;      /* [V / BLOCK + 1] sums of blocks of e */
};

/* ---------------------------------------------------------------- random numbers */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void rng_seed(uint64_t s[4], uint64_t seed) {
    uint64_t x = seed ? seed : 0x5EED5EED5EED5EEDull;
    for (int i = 0; i < 4; i++) s[i] = splitmix64(&x);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t rng_next(uint64_t s[4]) { /* xoshiro256** */
    const uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
}

static double rng_uniform(uint64_t s[4]) { return (double)(rng_next(s) >> 11) * (1.0 / 9007199254740992.0); }

/* ---------------------------------------------------------------- params and lifetime */

fm_sampling fm_sampling_default(void) {
    fm_sampling p;
    memset(&p, 0, sizeof p);
    p.temperature = 0.0f;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.0f;
    p.repetition_penalty = 1.0f;
    return p;
}

static fm_status check_params(const fm_sampling *p) {
    if (!(p->temperature >= 0.0f) || isinf(p->temperature))
        return fm_fail(FM_ERR_INVALID, "sampling: temperature must be a finite number >= 0, got %g", p->temperature);
    if (p->top_k < 0) return fm_fail(FM_ERR_INVALID, "sampling: top_k must be >= 0 (0 = off), got %d", p->top_k);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return fm_fail(FM_ERR_INVALID, "sampling: top_p must be in (0, 1] (1 = off), got %g", p->top_p);
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f))
        return fm_fail(FM_ERR_INVALID, "sampling: min_p must be in [0, 1] (0 = off), got %g", p->min_p);
    if (!(p->repetition_penalty > 0.0f) || isinf(p->repetition_penalty))
        return fm_fail(FM_ERR_INVALID, "sampling: repetition_penalty must be a finite number > 0 (1 = off), got %g",
                       p->repetition_penalty);
    if (!isfinite(p->presence_penalty))
        return fm_fail(FM_ERR_INVALID, "sampling: presence_penalty must be a finite number, got %g", p->presence_penalty);
    if (!isfinite(p->frequency_penalty))
        return fm_fail(FM_ERR_INVALID, "sampling: frequency_penalty must be a finite number, got %g", p->frequency_penalty);
    return FM_OK;
}

/* Histogram buckets over e in (0, 1]: the float's exponent and top 7 mantissa bits (128 per octave). */
#define BUCKET_SHIFT 16
#define NB ((0x3F800000u >> BUCKET_SHIFT) + 1)


fm_status fm_sampler_new(const fm_sampling *p, int vocab_size, fm_sampler **out) {
    *out = NULL;
    if (!p) return fm_fail(FM_ERR_INVALID, "sampling: no parameters given");
    if (vocab_size <= 0) return fm_fail(FM_ERR_INVALID, "sampling: vocab_size must be positive, got %d", vocab_size);
    fm_status st = check_params(p);
    if (st != FM_OK) return st;
    fm_sampler *s = (fm_sampler *)calloc(1, sizeof *s);
    if (!s) return fm_fail(FM_ERR_NOMEM, "sampling: out of memory");
    const size_t V = (size_t)vocab_size;
    s->p = *p;
    s->V = vocab_size;
    /* calloc, not fm_alloc (which zeroes by writing): ~10 MB for a 248k vocabulary come as untouched zero
     * pages, so a greedy or short generation does not pay for buffers it never uses. */
    s->count = (int32_t *)calloc(V, sizeof(int32_t));
    s->touched = (int32_t *)calloc(V, sizeof(int32_t));
    s->e = (float *)calloc(V, sizeof(float));
    s->ids = (int32_t *)calloc(V, sizeof(int32_t));
    s->e2 = (float *)calloc(V, sizeof(float));
    s->ids2 = (int32_t *)calloc(V, sizeof(int32_t));
    s->hist = (double *)calloc(NB, sizeof(double));
    s->tmp = (cand *)calloc(2 * V, sizeof(cand));
    s->blk = (double *)calloc(V / BLOCK + 1, sizeof(double));
    if (!s->count || !s->touched || !s->e || !s->ids || !s->e2 || !s->ids2 || !s->hist || !s->tmp || !s->blk) {
        fm_sampler_free(s);
        return fm_fail(FM_ERR_NOMEM, "sampling: cannot allocate buffers for a vocabulary of %d", vocab_size);
    }
    rng_seed(s->rng, p->seed);
    *out = s;
    return FM_OK;
}

void fm_sampler_free(fm_sampler *s) {
    if (!s) return;
    free(s->count);
    free(s->touched);
    free(s->e);
    free(s->ids);
    free(s->e2);
    free(s->ids2);
    free(s->hist);
    free(s->tmp);
    free(s->blk);
    free(s);
}

int fm_sampler_vocab_size(const fm_sampler *s) { return s->V; }

void fm_sampler_accept(fm_sampler *s, const int32_t *tokens, int n) {
    for (int i = 0; i < n; i++) {
        const int32_t t = tokens[i];
        if (t < 0 || t >= s->V) continue;
        if (s->count[t]++ == 0) s->touched[s->n_touched++] = t;
    }
}

void fm_sampler_reset(fm_sampler *s) {
    for (int i = 0; i < s->n_touched; i++) s->count[s->touched[i]] = 0;
    s->n_touched = 0;
    rng_seed(s->rng, s->p.seed);
}

/* ---------------------------------------------------------------- the pipeline */

/* 1 when p's penalties leave the logits as they are */
static int penalties_off(const fm_sampling *p) {
    return p->repetition_penalty == 1.0f && p->presence_penalty == 0.0f && p->frequency_penalty == 0.0f;
}

void fm_sampler_apply_penalties(const fm_sampler *s, float *logits) {
    const float r = s->p.repetition_penalty, pp = s->p.presence_penalty, fp = s->p.frequency_penalty;
    if (penalties_off(&s->p)) return;
    for (int i = 0; i < s->n_touched; i++) {
        const int32_t t = s->touched[i];
        float l = logits[t];
        if (r != 1.0f) l = l > 0.0f ? l / r : l * r;
        l -= (float)s->count[t] * fp + pp;
        logits[t] = l;
    }
}

/* e[i] = exp((l[i] - mx) * inv_t) for i < n; blk[b] = the sum of block b of BLOCK entries (float lanes,
 * then double); returns the total. */
FM_INLINE double exp_all_body(const float *restrict l, float *restrict e, double *restrict blk, int n, float mx,
                             float inv_t) {
    for (int i = 0; i < n; i++) e[i] = fm_exp((l[i] - mx) * inv_t);
    double sum = 0.0;
    enum { LANES = 16 };
    for (int b = 0; b < n; b += BLOCK) {
        const int end = b + BLOCK < n ? b + BLOCK : n;
        float acc[LANES] = {0};
        int i = b;
        for (; i + LANES <= end; i += LANES)
            for (int j = 0; j < LANES; j++) acc[j] += e[i + j];
        double bs = 0.0;
        for (; i < end; i++) bs += e[i];
        for (int j = 0; j < LANES; j++) bs += acc[j];
        blk[b / BLOCK] = bs;
        sum += bs;
    }
    return sum;
}

static double exp_all_plain(const float *restrict l, float *restrict e, double *restrict blk, int n, float mx,
                            float inv_t) {
    return exp_all_body(l, e, blk, n, mx, inv_t);
}
#ifdef FM_HAVE_AVX2_COPY
FM_AVX2_COPY static double exp_all_avx2(const float *restrict l, float *restrict e, double *restrict blk, int n,
                                        float mx, float inv_t) {
    return exp_all_body(l, e, blk, n, mx, inv_t);
}
#endif
static double exp_all(const float *restrict l, float *restrict e, double *restrict blk, int n, float mx, float inv_t) {
#ifdef FM_HAVE_AVX2_COPY
    if (fm_cpu_use_avx2()) return exp_all_avx2(l, e, blk, n, mx, inv_t);
#endif
    return exp_all_plain(l, e, blk, n, mx, inv_t);
}


/* Blocks of SKIP tokens are tested with one vectorised comparison before the scalar code looks at them:
 * most of a 248k vocabulary is far below any threshold that matters. */
enum { SKIP = 32 };
static inline int block_any_ge(const float *x, float thr) {
    int any = 0;
    for (int j = 0; j < SKIP; j++) any |= x[j] >= thr;
    return any;
}
static inline int block_any_gt(const float *x, float thr) {
    int any = 0;
    for (int j = 0; j < SKIP; j++) any |= x[j] > thr;
    return any;
}

/* a ranks above b: larger value, then lower id. */
static inline int above(float va, int32_t ia, float vb, int32_t ib) { return va > vb || (va == vb && ia < ib); }

/* The k best (logit, lower id first) of l[0..V) into ids[0..k), unordered: a min-heap of the k best so
 * far; most tokens fail one comparison with its root. */
static void top_k_select(const float *l, int V, int k, int32_t *ids) {
    int n = 0;
    for (int32_t i = 0; i < V; i++) {
        if (n == k && (i % SKIP) == 0 && i + SKIP <= V && !block_any_gt(l + i, l[ids[0]])) {
            i += SKIP - 1;
            continue;
        }
        if (n == k) {
            if (!above(l[i], i, l[ids[0]], ids[0])) continue;
            /* replace the root, sift down */
            int pos = 0;
            for (;;) {
                int c = 2 * pos + 1;
                if (c >= k) break;
                if (c + 1 < k && above(l[ids[c]], ids[c], l[ids[c + 1]], ids[c + 1])) c++;
                if (!above(l[i], i, l[ids[c]], ids[c])) break;
                ids[pos] = ids[c];
                pos = c;
            }
            ids[pos] = i;
        } else { /* sift up */
            int pos = n++;
            while (pos > 0) {
                const int par = (pos - 1) / 2;
                if (!above(l[ids[par]], ids[par], l[i], i)) break;
                ids[pos] = ids[par];
                pos = par;
            }
            ids[pos] = i;
        }
    }
}

static int cand_cmp(const void *a, const void *b) {
    const cand *x = (const cand *)a, *y = (const cand *)b;
    if (x->e != y->e) return x->e > y->e ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

static inline uint32_t bucket_of(float e) {
    uint32_t u;
    memcpy(&u, &e, 4);
    return u >> BUCKET_SHIFT;
}

/* top_p over candidates (e[i], id ids ? ids[i] : i), i < n, with total mass Z: the smallest set of
 * most probable tokens with mass >= top_p·Z, written to (oe, oid); returns its size. Tokens below
 * tau = Z·(1 - top_p)/n cannot be needed (all of them together weigh < Z·(1 - top_p)), so only the rest
 * are bucketed by value; buckets above the boundary bucket are kept whole and only the boundary
 * bucket is sorted. */
static int top_p_select(fm_sampler *s, const float *e, const int32_t *ids, int n, double Z, double top_p, float *oe,
                        int32_t *oid) {
    const double target = top_p * Z;
    const float tau = (float)(Z * (1.0 - top_p) / n);
    double *hist = s->hist; /* all zero between calls */
    cand *c = s->tmp + n;   /* the tokens >= tau (s->tmp holds 2 * V) */
    int nc = 0;
    for (int i = 0; i < n; i++) {
        if ((i % SKIP) == 0 && i + SKIP <= n && !block_any_ge(e + i, tau)) {
            i += SKIP - 1;
            continue;
        }
        if (!(e[i] >= tau) || e[i] <= 0.0f) continue;
        c[nc].e = e[i];
        c[nc++].id = ids ? ids[i] : i;
    }
    uint32_t lo = NB, hi = 0;
    for (int i = 0; i < nc; i++) {
        const uint32_t b = bucket_of(c[i].e);
        hist[b] += c[i].e;
        lo = b < lo ? b : lo;
        hi = b > hi ? b : hi;
    }
    if (lo > hi) return 0;
    double acc = 0.0;
    uint32_t boundary = lo;
    for (uint32_t b = hi + 1; b-- > lo;) {
        if (acc + hist[b] >= target) {
            boundary = b;
            break;
        }
        acc += hist[b];
    }
    memset(hist + lo, 0, (hi - lo + 1) * sizeof(double));
    /* keep buckets above the boundary; gather the boundary bucket for sorting */
    int k = 0, nb = 0;
    cand *tmp = s->tmp;
    for (int i = 0; i < nc; i++) {
        const uint32_t b = bucket_of(c[i].e);
        if (b > boundary) {
            oe[k] = c[i].e;
            oid[k++] = c[i].id;
        } else if (b == boundary) {
            tmp[nb++] = c[i];
        }
    }
    qsort(tmp, (size_t)nb, sizeof(cand), cand_cmp);
    for (int j = 0; j < nb; j++) {
        oe[k] = tmp[j].e;
        oid[k++] = tmp[j].id;
        acc += tmp[j].e;
        if (acc >= target) break;
    }
    return k;
}

/* Draw from (e[i], id ids ? ids[i] : i), i < n, proportionally to e. */
static int32_t draw(fm_sampler *s, const float *e, const int32_t *ids, int n) {
    double total = 0.0;
    for (int i = 0; i < n; i++) total += e[i];
    const double u = rng_uniform(s->rng) * total;
    double acc = 0.0;
    int last = -1;
    for (int i = 0; i < n; i++) {
        if (e[i] <= 0.0f) continue;
        acc += e[i];
        last = i;
        if (u < acc) return ids ? ids[i] : i;
    }
    return last >= 0 ? (ids ? ids[last] : last) : (ids ? ids[0] : 0);
}

/* draw over the whole vocabulary e[0..n) with the block sums of exp_all (total Z): find the block, then
 * the token in it. */
static int32_t draw_blocks(fm_sampler *s, const float *e, int n, double Z) {
    double u = rng_uniform(s->rng) * Z;
    const int nblk = (n + BLOCK - 1) / BLOCK;
    int b = 0;
    for (; b < nblk - 1; b++) {
        if (u < s->blk[b]) break;
        u -= s->blk[b];
    }
    const int end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
    double acc = 0.0;
    int last = -1;
    for (int i = b * BLOCK; i < end; i++) {
        if (e[i] <= 0.0f) continue;
        acc += e[i];
        last = i;
        if (u < acc) return i;
    }
    if (last >= 0) return last;
    for (int i = n - 1; i >= 0; i--) /* rounding left an empty block: the last token that can be drawn */
        if (e[i] > 0.0f) return i;
    return 0;
}

int fm_sampler_greedy(const fm_sampler *s) {
    return s->p.temperature <= 0.0f && penalties_off(&s->p);
}

int32_t fm_sampler_sample(fm_sampler *s, float *logits) {
    const fm_sampling *p = &s->p;
    const int V = s->V;
    fm_sampler_apply_penalties(s, logits);
    if (p->temperature <= 0.0f) return fm_argmax_f32(logits, V);
    const float inv_t = 1.0f / p->temperature;

    /* candidates: (e, ids) with ids == NULL meaning the whole vocabulary in id order */
    float *e = s->e;
    int32_t *ids = NULL;
    int n = V;
    double Z;
    if (p->top_k > 0 && p->top_k < V) {
        ids = s->ids;
        n = p->top_k;
        top_k_select(logits, V, n, ids);
        float mx = -INFINITY;
        for (int i = 0; i < n; i++) mx = logits[ids[i]] > mx ? logits[ids[i]] : mx;
        if (!(mx > -INFINITY)) return fm_argmax_f32(logits, V);
        Z = 0.0;
        for (int i = 0; i < n; i++) {
            e[i] = fm_exp((logits[ids[i]] - mx) * inv_t);
            Z += e[i];
        }
    } else {
        const float mx = fm_max_f32(logits, V);
        if (!(mx > -INFINITY) || isinf(mx)) return fm_argmax_f32(logits, V);
        Z = exp_all(logits, e, s->blk, V, mx, inv_t);
    }
    if (!(Z > 0.0) || !isfinite(Z)) return fm_argmax_f32(logits, V); /* NaN logits */

    /* top_p, then min_p: both keep a top set, so the result is their intersection */
    if (p->top_p < 1.0f) {
        n = top_p_select(s, e, ids, n, Z, (double)p->top_p, s->e2, s->ids2);
        e = s->e2;
        ids = s->ids2;
    }
    if (p->min_p > 0.0f) { /* the most probable token has e == 1 exactly */
        const float emax = fm_max_f32(e, n);
        const float thr = p->min_p * emax;
        int k = 0;
        for (int i = 0; i < n; i++) {
            if ((i % SKIP) == 0 && i + SKIP <= n && !block_any_ge(e + i, thr)) {
                i += SKIP - 1;
                continue;
            }
            if (e[i] >= thr) {
                s->e2[k] = e[i]; /* in place when e == e2 (k <= i) */
                s->ids2[k++] = ids ? ids[i] : i;
            }
        }
        e = s->e2;
        ids = s->ids2;
        n = k;
    }
    if (n == 0) return fm_argmax_f32(logits, V);
    if (!ids) return draw_blocks(s, e, n, Z); /* nothing cut */
    return draw(s, e, ids, n);
}
