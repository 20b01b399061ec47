/*
 * run_ops.c — runs op cases given in a file with every CPU kernel variant this build has and writes the
 * outputs to another file, so that tests/test_cross_isa.py can compare kernels of another ISA (NEON under
 * qemu-user) with the float64 numpy references of tests/test_ops.py. Usage: run_ops CASES OUTPUTS.
 *
 * CASES: records of  char op[16] | int32 ints[8] | float floats[4] | int32 n | n × (uint64 bytes, data)
 * (tests/test_cross_isa.py's encode says what the ints of each op are).
 * OUTPUTS: for each variant (in the order of the "kernel variant NAME" lines printed on stdout), for each
 * case: int32 n | n × (uint64 bytes, data).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../csrc/backend/cpu/cpu.h"

typedef struct {
    char op[16];
    int32_t ints[8];
    float floats[4];
    int n;
    void *arr[6];
    uint64_t bytes[6];
} op_case;

static void die(const char *what) {
    fprintf(stderr, "run_ops: %s\n", what);
    exit(2);
}

static void read_exact(FILE *f, void *dst, size_t n) {
    if (n && fread(dst, 1, n, f) != n) die("truncated case file");
}

static void put_array(FILE *f, const void *data, uint64_t bytes) {
    if (fwrite(&bytes, sizeof bytes, 1, f) != 1 || (bytes && fwrite(data, 1, bytes, f) != bytes)) die("write failed");
}

static void *out_buffer(uint64_t bytes) {
    void *p = calloc(1, bytes ? bytes : 1);
    if (!p) die("out of memory");
    return p;
}

static void run_case(const op_case *c, FILE *out) {
    const int32_t *I = c->ints;
    if (strcmp(c->op, "matmul") == 0 || strcmp(c->op, "get_row") == 0) {
        const int dtype = I[0], rows = I[1], cols = I[2], gs = I[3];
        fm_mat w = {(fm_dtype)dtype, rows, cols, gs, c->arr[0], c->bytes[1] ? (const uint16_t *)c->arr[1] : NULL,
                    c->bytes[2] ? (const uint16_t *)c->arr[2] : NULL, 0, 0};
        if (strcmp(c->op, "matmul") == 0) { /* ints: dtype rows cols gs T int8_act scale_bf16 */
            const int T = I[4];
            w.int8_act = I[5];
            w.scale_bf16 = I[6];
            const uint64_t bytes = sizeof(float) * (uint64_t)T * rows;
            float *y = out_buffer(bytes);
            fm_cpu_matmul(&w, (const float *)c->arr[3], T, y);
            const int32_t n = 1;
            fwrite(&n, sizeof n, 1, out);
            put_array(out, y, bytes);
            free(y);
        } else { /* ints: dtype rows cols gs r scale_bf16 */
            float *y = out_buffer(sizeof(float) * (uint64_t)cols);
            w.scale_bf16 = I[5];
            fm_cpu_get_row(&w, I[4], y);
            const int32_t n = 1;
            fwrite(&n, sizeof n, 1, out);
            put_array(out, y, sizeof(float) * (uint64_t)cols);
            free(y);
        }
    } else if (strcmp(c->op, "silu_mul") == 0 || strcmp(c->op, "sigmoid_mul") == 0) {
        const int n = I[0];
        float *y = out_buffer(sizeof(float) * (uint64_t)n);
        if (strcmp(c->op, "silu_mul") == 0)
            fm_cpu_silu_mul(y, (const float *)c->arr[0], (const float *)c->arr[1], 1, n);
        else
            fm_cpu_sigmoid_mul(y, (const float *)c->arr[0], (const float *)c->arr[1], 1, n);
        const int32_t k = 1;
        fwrite(&k, sizeof k, 1, out);
        put_array(out, y, sizeof(float) * (uint64_t)n);
        free(y);
    } else if (strcmp(c->op, "conv1d_silu") == 0) {
        const int T = I[0], C = I[1], K = I[2];
        float *y = out_buffer(sizeof(float) * (uint64_t)T * C), *st = out_buffer(c->bytes[1]);
        memcpy(st, c->arr[1], c->bytes[1]);
        fm_cpu_conv1d_silu(y, (const float *)c->arr[0], st, (const float *)c->arr[2], T, C, K);
        const int32_t k = 2;
        fwrite(&k, sizeof k, 1, out);
        put_array(out, y, sizeof(float) * (uint64_t)T * C);
        put_array(out, st, c->bytes[1]);
        free(y), free(st);
    } else if (strcmp(c->op, "rmsnorm") == 0) {
        const int T = I[0], n = I[1];
        float *y = out_buffer(sizeof(float) * (uint64_t)T * n);
        fm_cpu_rmsnorm(y, (const float *)c->arr[0], (const float *)c->arr[1], T, n, c->floats[0], I[2]);
        const int32_t k = 1;
        fwrite(&k, sizeof k, 1, out);
        put_array(out, y, sizeof(float) * (uint64_t)T * n);
        free(y);
    } else if (strcmp(c->op, "rope") == 0) {
        const int T = I[0], heads = I[1], hd = I[2];
        float *y = out_buffer(c->bytes[0]);
        memcpy(y, c->arr[0], c->bytes[0]);
        fm_cpu_rope(y, T, heads, hd, I[3], I[4], c->floats[0]);
        const int32_t k = 1;
        fwrite(&k, sizeof k, 1, out);
        put_array(out, y, c->bytes[0]);
        free(y);
    } else {
        die("unknown op");
    }
}

int main(int argc, char **argv) {
    if (argc != 3) die("usage: run_ops CASES OUTPUTS");
    FILE *in = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
    if (!in || !out) die("cannot open the files");
    op_case *cases = NULL;
    int n_cases = 0, cap = 0;
    for (;;) {
        op_case c;
        memset(&c, 0, sizeof c);
        if (fread(c.op, 1, sizeof c.op, in) != sizeof c.op) break;
        read_exact(in, c.ints, sizeof c.ints);
        read_exact(in, c.floats, sizeof c.floats);
        read_exact(in, &c.n, sizeof c.n);
        if (c.n < 0 || c.n > 6) die("bad array count");
        for (int i = 0; i < c.n; i++) {
            read_exact(in, &c.bytes[i], sizeof c.bytes[i]);
            c.arr[i] = out_buffer(c.bytes[i]);
            read_exact(in, c.arr[i], c.bytes[i]);
        }
        if (n_cases == cap && !(cases = realloc(cases, sizeof *cases * (size_t)(cap = cap ? 2 * cap : 64))))
            die("out of memory");
        cases[n_cases++] = c;
    }
    const char *isas[] = {"scalar", "avx2", "avx512", "neon", "neondot"};
    for (int k = 0; k < 5; k++) {
        if (!fm_cpu_isa_available(isas[k])) continue;
        printf("kernel variant %s\n", isas[k]);
        fm_cpu_set_isa(isas[k]);
        for (int i = 0; i < n_cases; i++) run_case(&cases[i], out);
    }
    fm_cpu_set_isa("auto");
    if (fclose(out) != 0) die("write failed");
    printf("%d cases\n", n_cases);
    return 0;
}
