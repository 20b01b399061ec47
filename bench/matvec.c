/*
 * matvec.c — decode matvec speed of every CPU kernel variant, in C (for machines without the Python
 * build): q4/q8 weights of rows (default 65536) × 2048, group 64, from DRAM, fp32 and int8 activations, GB/s of
 * weight bytes, median of 15 runs, next to a streaming read of 1 GiB with the same threads.
 *
 *   cc -O3 -std=gnu11 -Icsrc/include bench/matvec.c csrc/backend/cpu/ops.c csrc/backend/cpu/threads.c \
 *      csrc/core/util.c csrc/backend/cpu/matmul_avx2.c csrc/backend/cpu/matmul_avx512.c -lm -lpthread
 *   (compile matmul_avx2.c with -mavx2 -mfma -mf16c and matmul_avx512.c with those and -mavx512f
 *   -mavx512bw -mavx512dq -mavx512vl -mavx512vnni, as CMakeLists.txt does)
 *   ./a.out [threads] [rows]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../csrc/backend/cpu/cpu.h"
#include "../csrc/backend/cpu/threads.h"
#include "../csrc/core/util.h" /* fm_now */

static int cmp(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct {
    const double *src;
    size_t n;
    double sum[64];
} read_job;

static void read_task(void *ctx, int i) {
    read_job *j = ctx;
    double s[8] = {0}; /* independent sums: bandwidth-bound, not add-latency-bound */
    const size_t per = j->n / 64;
    for (size_t k = (size_t)i * per; k < (size_t)(i + 1) * per; k += 8)
        for (int u = 0; u < 8; u++) s[u] += j->src[k + u];
    j->sum[i] = s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
}

int main(int argc, char **argv) {
    if (argc > 1) fm_threads_set(atoi(argv[1]));
    const int rows = argc > 2 ? atoi(argv[2]) : 65536, cols = 2048, gs = 64, ng = cols / gs, reps = 15;
    uint8_t *q = malloc((size_t)rows * cols);
    uint16_t *s = malloc(sizeof(uint16_t) * rows * ng), *b = malloc(sizeof(uint16_t) * rows * ng);
    float *x = malloc(sizeof(float) * cols), *y = malloc(sizeof(float) * rows);
    for (size_t i = 0; i < (size_t)rows * cols; i++) q[i] = (uint8_t)(i * 2654435761u >> 13);
    for (int i = 0; i < rows * ng; i++) s[i] = 0x1c00 + (i & 255), b[i] = 0x9c00 + (i & 255); /* small fp16 */
    for (int i = 0; i < cols; i++) x[i] = (float)((i * 37) % 101 - 50) / 50.0f;

    const size_t n = (1u << 30) / sizeof(double);
    double *big = malloc(n * sizeof(double)), t[reps];
    for (size_t i = 0; i < n; i++) big[i] = 1.0;
    read_job rj = {big, n, {0}};
    for (int r = 0; r < reps; r++) {
        const double t0 = fm_now();
        fm_parallel_for(64, read_task, &rj);
        t[r] = fm_now() - t0;
    }
    qsort(t, reps, sizeof t[0], cmp);
    printf("threads %d, streaming read %.1f GB/s\n", fm_threads_get(), (double)n * 8 / t[reps / 2] / 1e9);
    free(big);

    const char *isas[] = {"scalar", "avx2", "avx512", "neon"};
    for (int d = 0; d < 2; d++) {
        const fm_dtype dt = d ? FM_Q8 : FM_Q4;
        const double bytes = (double)rows * (dt == FM_Q4 ? cols / 2 : cols) + 4.0 * rows * ng;
        for (int int8 = 0; int8 <= 1; int8++)
            for (int k = 0; k < 4; k++) {
                if (!fm_cpu_isa_available(isas[k])) continue;
                fm_cpu_set_isa(isas[k]);
                fm_mat w = {dt, rows, cols, gs, q, s, b, int8};
                fm_cpu_matmul(&w, x, 1, y);
                for (int r = 0; r < reps; r++) {
                    const double t0 = fm_now();
                    fm_cpu_matmul(&w, x, 1, y);
                    t[r] = fm_now() - t0;
                }
                qsort(t, reps, sizeof t[0], cmp);
                printf("%s x %s %-7s %7.2f GB/s\n", dt == FM_Q4 ? "q4" : "q8", int8 ? "int8" : "fp32", isas[k],
                       bytes / t[reps / 2] / 1e9);
            }
    }
    return 0;
}
