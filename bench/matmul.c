/*
 * matmul.c — prefill matmul speed of every CPU kernel variant, in C (for machines without the Python
 * build): q4 and q8 weights (group 64) of the engine's shapes against T tokens (1: decode from cache), fp32 and int8
 * activations, GFLOP/s (2·rows·cols·T per call), median of 9 runs after a warm-up. Weights are small
 * enough to stay in cache between runs: this measures the arithmetic, not DRAM.
 *
 *   cc -O3 -std=gnu11 -Icsrc/include bench/matmul.c csrc/backend/cpu/ops.c csrc/backend/cpu/threads.c \
 *      csrc/core/util.c csrc/backend/cpu/matmul_avx2.c csrc/backend/cpu/matmul_avx512.c -lm -lpthread
 *   (compile matmul_avx2.c and matmul_avx512.c with their flags, as bench/matvec.c says)
 *   ./a.out [threads]
 */
#include <stdio.h>
#include <stdlib.h>

#include "../csrc/backend/cpu/cpu.h"
#include "../csrc/backend/cpu/threads.h"
#include "../csrc/core/util.h" /* fm_now */

static int cmp(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc > 1) fm_threads_set(atoi(argv[1]));
    /* an expert's gate/up and down of the 35B shape, and a DeltaNet input projection */
    const struct { int rows, cols; const char *what; } S[] = {
        {512, 2048, "expert gate/up"}, {2048, 512, "expert down"}, {12288, 2048, "deltanet in_proj"}};
    const int Ts[] = {1, 2, 4, 16, 512}, gs = 64, reps = 9, maxT = 512, maxr = 12288, maxc = 2048;
    uint8_t *q = malloc((size_t)maxr * maxc);
    uint16_t *s = malloc(sizeof(uint16_t) * maxr * (maxc / gs)), *b = malloc(sizeof(uint16_t) * maxr * (maxc / gs));
    float *x = malloc(sizeof(float) * maxT * maxc), *y = malloc(sizeof(float) * maxT * maxr);
    for (size_t i = 0; i < (size_t)maxr * maxc; i++) q[i] = (uint8_t)(i * 2654435761u >> 13);
    for (int i = 0; i < maxr * (maxc / gs); i++) s[i] = 0x1c00 + (i & 255), b[i] = 0x9c00 + (i & 255);
    for (int i = 0; i < maxT * maxc; i++) x[i] = (float)((i * 37) % 101 - 50) / 50.0f;
    printf("threads %d; GFLOP/s, median of %d\n", fm_threads_get(), reps);

    const char *isas[] = {"scalar", "avx2", "avx512", "neon", "neondot"};
    for (size_t k = 0; k < sizeof S / sizeof S[0]; k++)
        for (int d = 0; d < 2; d++)
            for (int ti = 0; ti < (int)(sizeof Ts / sizeof Ts[0]); ti++) {
                const int T = Ts[ti];
                printf("%-16s %5d x %4d %s T=%-3d", S[k].what, S[k].rows, S[k].cols, d ? "q8" : "q4", T);
                for (int v = 0; v < 5; v++) {
                    if (!fm_cpu_isa_available(isas[v]) || v == 0) continue; /* scalar: too slow to matter */
                    fm_cpu_set_isa(isas[v]);
                    for (int int8 = 0; int8 <= 1; int8++) {
                        fm_mat w = {d ? FM_Q8 : FM_Q4, S[k].rows, S[k].cols, gs, q, s, b, int8};
                        double t[reps];
                        fm_cpu_matmul(&w, x, T, y);
                        for (int r = 0; r < reps; r++) {
                            const double t0 = fm_now();
                            fm_cpu_matmul(&w, x, T, y);
                            t[r] = fm_now() - t0;
                        }
                        qsort(t, reps, sizeof t[0], cmp);
                        printf("  %s %s %6.1f", isas[v], int8 ? "int8" : "fp32",
                               2.0 * S[k].rows * S[k].cols * T / t[reps / 2] / 1e9);
                    }
                }
                printf("\n");
            }
    return 0;
}
