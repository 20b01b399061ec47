/*
 * test_kernels.c — every SIMD matmul variant this build has against the portable kernels, in C, so it
 * can run on another ISA under qemu-user (tests/test_cross_isa.py builds it with a cross compiler).
 * Also batch invariance (csrc/backend/cpu/matmul.h): each variant's rows of a batch bitwise equal to its
 * tokens alone, for every T, place in the batch and thread count (tests/test_batch_invariance.py does it
 * through Python for the native variants; this is how the NEON ones get it, under qemu).
 * Prints one line per failing case and ends with "N passed, M failed"; exits 1 on any failure.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../csrc/backend/cpu/cpu.h"
#include "../../csrc/backend/cpu/threads.h"

static uint32_t rng_state = 12345;
static uint32_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return rng_state;
}
static float uniform(float lo, float hi) { return lo + (hi - lo) * (float)(rnd() >> 8) / 16777216.0f; }

static uint16_t f32_to_f16(float f) { /* normal range only, truncating: test data */
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000;
    const int exp = (int)((u >> 23) & 0xff) - 127 + 15;
    return (uint16_t)(sign | ((uint32_t)exp << 10) | ((u >> 13) & 0x3ff));
}

static uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}

/* A random rows x cols weight of dtype in groups of gs; sb: bf16 scales and biases, of both signs (as
 * MLX's quantizer makes them), else fp16 ones. free_weight frees it. */
static fm_mat random_weight(fm_dtype dtype, int rows, int cols, int gs, int int8_act, int sb) {
    const int ng = gs ? cols / gs : 0;
    const size_t data_bytes = dtype == FM_F32 ? (size_t)rows * cols * 4 : dtype == FM_BF16 ? (size_t)rows * cols * 2
                            : dtype == FM_Q8  ? (size_t)rows * cols : (size_t)rows * cols / 2;
    uint8_t *data = malloc(data_bytes);
    uint16_t *scales = malloc(sizeof(uint16_t) * (size_t)rows * (ng ? ng : 1));
    uint16_t *biases = malloc(sizeof(uint16_t) * (size_t)rows * (ng ? ng : 1));
    if (dtype == FM_F32)
        for (size_t i = 0; i < (size_t)rows * cols; i++) ((float *)data)[i] = uniform(-1, 1);
    else if (dtype == FM_BF16)
        for (size_t i = 0; i < (size_t)rows * cols; i++) ((uint16_t *)data)[i] = f32_to_bf16(uniform(-1, 1));
    else
        for (size_t i = 0; i < data_bytes; i++) data[i] = (uint8_t)rnd();
    for (int i = 0; i < rows * ng; i++) {
        if (sb) {
            scales[i] = f32_to_bf16(uniform(0.002f, 0.05f) * (rnd() & 1 ? -1.0f : 1.0f));
            biases[i] = f32_to_bf16(uniform(-0.4f, 0.4f));
        } else {
            scales[i] = f32_to_f16(uniform(0.002f, 0.05f));
            biases[i] = f32_to_f16(uniform(-0.4f, -0.01f));
        }
    }
    if (!ng) free(scales), free(biases), scales = biases = NULL;
    fm_mat w = {dtype, rows, cols, gs, data, scales, biases, int8_act, sb};
    return w;
}

static void free_weight(fm_mat *w) { free((void *)w->data), free((void *)w->scales), free((void *)w->biases); }

/* isa's matmul against the scalar one on a random weight. */
static int run_case(const char *isa, fm_dtype dtype, int rows, int cols, int gs, int T, int int8_act, int sb) {
    fm_mat w = random_weight(dtype, rows, cols, gs, int8_act, sb);
    float *x = malloc(sizeof(float) * (size_t)T * cols), *y0 = malloc(sizeof(float) * (size_t)T * rows);
    float *y1 = malloc(sizeof(float) * (size_t)T * rows);
    for (int i = 0; i < T * cols; i++) x[i] = uniform(-1, 1);
    fm_cpu_set_isa("scalar");
    fm_cpu_matmul(&w, x, T, y0);
    fm_cpu_set_isa(isa);
    fm_cpu_matmul(&w, x, T, y1);
    fm_cpu_set_isa("auto");
    double err = 0, ref = 1;
    for (int i = 0; i < T * rows; i++) {
        err = fmax(err, fabs((double)y1[i] - y0[i]));
        ref = fmax(ref, fabs((double)y0[i]));
    }
    const int ok = err / ref <= 1e-5; /* fp32 dots summed in other orders: ~1e-6 */
    if (!ok)
        printf("FAIL %s dtype %d %dx%d g%d T%d int8 %d %s scales: normalised error %.3g\n", isa, dtype, rows,
               cols, gs, T, int8_act, sb ? "bf16" : "fp16", err / ref);
    free_weight(&w), free(x), free(y0), free(y1);
    return ok;
}

/* Batch invariance of isa on one weight: y of batches x[s, s + T) at 1 and 2 threads against each token
 * alone (1 thread), bitwise. */
static int batch_case(const char *isa, fm_dtype dtype, int rows, int cols, int gs, int int8_act, int sb) {
    enum { NX = 48 };
    fm_mat w = random_weight(dtype, rows, cols, gs, int8_act, sb);
    float *x = malloc(sizeof(float) * (size_t)NX * cols), *one = malloc(sizeof(float) * (size_t)NX * rows);
    float *y = malloc(sizeof(float) * (size_t)NX * rows);
    for (int i = 0; i < NX * cols; i++) x[i] = uniform(-1, 1);
    const int before = fm_threads_get();
    fm_cpu_set_isa(isa);
    fm_threads_set(1);
    for (int t = 0; t < NX; t++) fm_cpu_matmul(&w, x + (size_t)t * cols, 1, one + (size_t)t * rows);
    int ok = 1;
    const int Ts[] = {2, 3, 4, 5, 7, 8, 9, 13, 17, 33, NX};
    for (int threads = 1; threads <= 2 && ok; threads++) {
        fm_threads_set(threads);
        for (size_t k = 0; k < sizeof Ts / sizeof Ts[0] && ok; k++) {
            const int T = Ts[k], s = (3 * T) % (NX - T + 1);
            fm_cpu_matmul(&w, x + (size_t)s * cols, T, y);
            if (memcmp(y, one + (size_t)s * rows, sizeof(float) * (size_t)T * rows) != 0) {
                printf("FAIL batch %s dtype %d %dx%d g%d int8 %d %s scales: T=%d threads %d differs from the "
                       "tokens alone\n", isa, dtype, rows, cols, gs, int8_act, sb ? "bf16" : "fp16", T, threads);
                ok = 0;
            }
        }
    }
    fm_threads_set(before);
    fm_cpu_set_isa("auto");
    free_weight(&w), free(x), free(one), free(y);
    return ok;
}

int main(void) {
    const char *isas[] = {"avx2", "avx512", "neon", "neondot"};
    int passed = 0, failed = 0;
    for (int k = 0; k < 4; k++) {
        if (!fm_cpu_isa_available(isas[k])) continue;
        printf("kernel variant %s\n", isas[k]);
        const struct { fm_dtype d; int gs; } W[] = {{FM_F32, 0}, {FM_BF16, 0}, {FM_Q8, 16}, {FM_Q8, 64},
                                                    {FM_Q4, 32}, {FM_Q4, 64}, {FM_Q4, 16},
                                                    {FM_Q4, 128}, {FM_Q8, 128}};
        const int Ts[] = {1, 2, 3, 11, 37};
        for (size_t i = 0; i < sizeof W / sizeof W[0]; i++)
            for (int t = 0; t < 5; t++)
                for (int rows = 37; rows <= 301; rows += 264)
                    for (int int8 = 0; int8 <= (W[i].gs % 32 == 0); int8++)    /* int8 activations: ops.h */
                        for (int sb = 0; sb <= (W[i].gs > 0); sb++) { /* scale dtype of q4/q8 */
                            if (run_case(isas[k], W[i].d, rows, 256, W[i].gs, Ts[t], int8, sb)) passed++;
                            else failed++;
                        }
        /* wide rows (over 512 groups); and more tokens than the AVX2 int8 tiles' block (48 tokens at
         * 4096 columns): several blocks, the last with a full tile, three tokens or two */
        for (int d = 0; d < 2; d++) {
            for (int T = 3; T <= 6; T += 3) {
                if (run_case(isas[k], d ? FM_Q8 : FM_Q4, 5, 513 * 32, 32, T, 1, T == 6)) passed++;
                else failed++;
            }
            for (int T = 98; T <= 100; T++) {
                if (run_case(isas[k], d ? FM_Q8 : FM_Q4, 7, 4096, 64 >> (T & 1), T, 1, T == 99)) passed++;
                else failed++;
            }
        }
    }
    const char *all[] = {"scalar", "avx2", "avx512", "neon", "neondot"};
    for (int k = 0; k < 5; k++) {
        if (!fm_cpu_isa_available(all[k])) continue;
        printf("batch invariance %s\n", all[k]);
        const struct { fm_dtype d; int gs, cols; } W[] = {{FM_F32, 0, 130}, {FM_BF16, 0, 130}, {FM_Q8, 16, 80},
                                                          {FM_Q8, 32, 96},  {FM_Q8, 64, 1024}, {FM_Q8, 128, 384},
                                                          {FM_Q4, 32, 1024}, {FM_Q4, 64, 192}, {FM_Q4, 128, 384}};
        for (size_t i = 0; i < sizeof W / sizeof W[0]; i++)
            for (int int8 = 0; int8 <= (W[i].gs % 32 == 0 && W[i].gs > 0); int8++)
                for (int sb = 0; sb <= (W[i].gs > 0); sb++) {
                    /* 257 rows x 1024: split over 2 threads; 13 rows: not a multiple of the 4-row tiles */
                    if (batch_case(all[k], W[i].d, W[i].cols == 1024 ? 257 : 13, W[i].cols, W[i].gs, int8, sb)) passed++;
                    else failed++;
                }
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
