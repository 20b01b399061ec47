/*
 * bench/host_ffn.c — the host's replay of the CUDA experts (csrc/backend/cuda/host_ffn.c) against memory bandwidth:
 * a decode layer's worth of routed experts (Qwen3.5-122B-A10B's shapes by default: H 3072, I 1024, q4, groups of
 * 64), one token each, from buffers far larger than the caches (each call's experts are new ones), on 1 thread and
 * on all. Prints GB/s of expert weights read (and the ratio to 1 thread). Build and run:
 *   cc -O2 -ffp-contract=off -Icsrc -Icsrc/include -o /tmp/host_ffn bench/host_ffn.c \
 *      csrc/backend/cuda/host_ffn.c csrc/backend/cpu/threads.c -lm -lpthread && /tmp/host_ffn [experts a call]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/cpu/threads.h"
#include "backend/cuda/host_ffn.h"

#define H 3072
#define I 1024
#define GS 64
#define POOL 64 /* experts in the pool: 64 · 4.9 MB, past any cache */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static fm_mat make(int rows, int cols) {
    fm_mat m = {0};
    m.dtype = FM_Q4, m.rows = rows, m.cols = cols, m.group_size = GS, m.int8_act = 1;
    uint8_t *d = malloc((size_t)rows * cols / 2);
    uint16_t *s = malloc(sizeof(uint16_t) * (size_t)rows * (cols / GS)), *b = malloc(sizeof(uint16_t) * (size_t)rows * (cols / GS));
    for (size_t i = 0; i < (size_t)rows * cols / 2; i++) d[i] = (uint8_t)rand();
    for (size_t i = 0; i < (size_t)rows * (cols / GS); i++) s[i] = 0x2000 + (rand() & 0x3FF), b[i] = 0xA000 + (rand() & 0x3FF);
    m.data = d, m.scales = s, m.biases = b;
    return m;
}

static double run(const fm_mat *mats, int k, const float *xn, float *out, int threads, int reps, double bytes) {
    fm_threads_set(threads);
    fmh_job jobs[64];
    int32_t tok = 0;
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        for (int j = 0; j < k; j++) {
            const fm_mat *m = &mats[3 * ((r * k + j) % POOL)];
            jobs[j] = (fmh_job){&m[0], &m[1], &m[2], &tok, 1, out + (size_t)j * H};
        }
        const double t0 = now();
        if (fmh_experts(jobs, k, xn, H, 1)) return 0;
        const double t = now() - t0;
        if (t < best) best = t;
    }
    return bytes * k / best / 1e9;
}

int main(int argc, char **argv) {
    const int k = argc > 1 ? atoi(argv[1]) : 8;
    if (k < 1 || k > 64) return 1;
    fm_mat *mats = malloc(sizeof(fm_mat) * 3 * POOL);
    for (int e = 0; e < POOL; e++) mats[3 * e] = make(I, H), mats[3 * e + 1] = make(I, H), mats[3 * e + 2] = make(H, I);
    float *xn = malloc(sizeof(float) * H), *out = malloc(sizeof(float) * (size_t)H * k);
    for (int i = 0; i < H; i++) xn[i] = (float)rand() / RAND_MAX - 0.5f;
    const double bytes = 3.0 * ((double)I * H / 2 + 2.0 * 2 * I * (H / GS)); /* weights, scales, biases */
    const int all = fm_threads_get();
    const double one = run(mats, k, xn, out, 1, 20, bytes), many = run(mats, k, xn, out, all, 40, bytes);
    printf("host_ffn: %d experts of %.2f MB (q4, H %d, I %d, groups of %d), one token each, best of 20/40 calls\n", k,
           bytes / 1e6, H, I, GS);
    printf("  1 thread: %.1f GB/s; %d threads: %.1f GB/s (x%.1f)\n", one, all, many, many / one);
    return 0;
}
