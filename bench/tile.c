/*
 * tile.c — the AVX2 int8 prefill tile (matmul_avx2.c, int8_tile) alone: one row pair × one tile of four
 * tokens, q4, groups of 64, on streams small enough to stay in L1, so the number is the loop's own speed
 * (cycles per group at the clock given, and GFLOP/s on one core), not the memory's. bench/matmul.c gives
 * the whole kernel; this is for working on the loop itself (bench/RESULTS.md, session 7: 15.7 cycles a
 * group on Zen 3 against 13 for its 52 vector operations at 4 a cycle).
 *
 *   cc -O3 -std=gnu11 -fno-math-errno -fno-trapping-math -mavx2 -mfma -mf16c -Icsrc/include \
 *      bench/tile.c csrc/core/util.c -o tile && ./tile [groups] [GHz]
 */
#include "../csrc/backend/cpu/matmul_avx2.c"

#include <stdio.h>
#include <stdlib.h>

enum { MAX_GROUPS = 64, GS = 64 };
static uint8_t W[(MAX_GROUPS + 1) * (2 * GS + 32)] __attribute__((aligned(64)));
static uint8_t X[(MAX_GROUPS + 1) * (4 * GS + 64)] __attribute__((aligned(64)));

static __attribute__((noinline)) void run(long reps, int ng, float out[2][4]) {
    for (long r = 0; r < reps; r++) {
        int8_tile(W, X, ng, out, 2, 1, 2);
        __asm__ volatile("" ::: "memory"); /* every repetition really runs */
    }
}

int main(int argc, char **argv) {
    const int ng = argc > 1 ? atoi(argv[1]) : 32;
    const double ghz = argc > 2 ? atof(argv[2]) : 3.19; /* this dev machine's clock under load */
    if (ng < 1 || ng > MAX_GROUPS) {
        fprintf(stderr, "groups: 1..%d\n", MAX_GROUPS);
        return 1;
    }
    for (size_t i = 0; i < sizeof W; i++) W[i] = (uint8_t)(i * 7 % 16); /* q4 nibbles as bytes */
    for (size_t i = 0; i < sizeof X; i++) X[i] = (uint8_t)(i * 13 % 255);
    for (int g = 0; g < ng; g++) { /* plausible scales, biases and activation steps in place of the floats */
        float *rs = (float *)(W + g * row_pair_stride(GS) + 2 * GS), *de = (float *)(X + g * tile_stride(GS) + 4 * GS);
        for (int k = 0; k < 8; k++) rs[k] = 1e-3f * (float)(k + 1);
        for (int k = 0; k < 16; k++) de[k] = 1e-3f * (float)(k % 5 + 1);
    }
    const long reps = 96000000L / ng;
    float out[2][4];
    double best = 1e30;
    for (int k = 0; k < 5; k++) {
        const double t0 = fm_now();
        run(reps, ng, out);
        const double dt = fm_now() - t0;
        best = dt < best ? dt : best;
    }
    const double groups = (double)reps * ng, flops = groups * 2.0 * 2 * 4 * GS; /* 2 rows × 4 tokens × 64 */
    printf("%d groups of %d: %.2f cycles a group at %.2f GHz, %.1f GFLOP/s on one core (best of 5; out %g)\n",
           ng, GS, best * ghz * 1e9 / groups, ghz, flops / best / 1e9, (double)out[1][3]);
    return 0;
}
