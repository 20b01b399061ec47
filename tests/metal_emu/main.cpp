/*
 * main.cpp — runs one op of ops.cpp in each lane order, for tests/test_metal_emu.py:
 *
 *     emu OP DIR INT... FLOAT...   (the op's scalars, as each branch below lists them)
 *
 * reads the op's inputs from DIR/<name>.bin (raw little-endian arrays, as numpy's tofile writes them) and
 * writes its output to DIR/out.<order>.bin for the orders forward, reverse and shuffled (an op of several
 * outputs: them one after another, in the order of the op's reference; each float32, or int32 where an output
 * is indices).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <initializer_list>
#include <string>
#include <vector>

#include "emu.h"
#include "ops.h"

static std::string dir;

template <class T> static std::vector<T> load(const char *name) {
    const std::string path = dir + "/" + name + ".bin";
    FILE *f = fopen(path.c_str(), "rb");
    if (!f) fm_emu::fail("cannot open %s", path.c_str());
    fseek(f, 0, SEEK_END);
    std::vector<T> v(ftell(f) / sizeof(T));
    fseek(f, 0, SEEK_SET);
    if (fread(v.data(), sizeof(T), v.size(), f) != v.size()) fm_emu::fail("cannot read %s", path.c_str());
    fclose(f);
    return v;
}

/* a heap copy of exactly the array's size, so that ASan sees an access past its end */
template <class T> struct exact {
    T *p;
    size_t n;
    explicit exact(const std::vector<T> &v) : p((T *)malloc(v.size() * sizeof(T) + !v.size())), n(v.size()) {
        memcpy(p, v.data(), n * sizeof(T));
    }
    explicit exact(size_t count) : p((T *)calloc(count + !count, sizeof(T))), n(count) {}
    ~exact() { free(p); }
};

static bool exists(const char *name) {
    FILE *f = fopen((dir + "/" + name + ".bin").c_str(), "rb");
    if (f) fclose(f);
    return f != nullptr;
}

/* A weight matrix from DIR/<name>.bin (its data) and, quantized, DIR/<name>_scales.bin, <name>_biases.bin */
struct matrix {
    exact<uint8_t> data;
    exact<uint16_t> *scales = nullptr, *biases = nullptr;
    fm_mat m = {};
    matrix(const std::string &name, int dtype, int rows, int cols, int gs, int scale_bf16, int int8_act)
        : data(load<uint8_t>(name.c_str())) {
        if ((dtype == FM_Q4 || dtype == FM_Q8) && exists((name + "_scales").c_str())) {
            scales = new exact<uint16_t>(load<uint16_t>((name + "_scales").c_str()));
            biases = new exact<uint16_t>(load<uint16_t>((name + "_biases").c_str()));
        }
        if (data.n != fm_tensor_data_bytes((fm_dtype)dtype, rows, cols)) fm_emu::fail("%s: wrong size", name.c_str());
        m.dtype = (fm_dtype)dtype, m.rows = rows, m.cols = cols, m.group_size = gs;
        m.data = data.p;
        m.scales = scales ? scales->p : nullptr, m.biases = biases ? biases->p : nullptr;
        m.int8_act = int8_act, m.scale_bf16 = scale_bf16;
    }
    ~matrix() { delete scales, delete biases; }
};

/* an output array: its bytes */
struct out_bytes {
    const void *p;
    size_t n;
    template <class T> out_bytes(const exact<T> *a) : p(a->p), n(a->n * sizeof(T)) {}
};

static void save(fm_emu::order o, std::initializer_list<out_bytes> outs) {
    const std::string path = dir + "/out." + fm_emu::order_name(o) + ".bin";
    FILE *f = fopen(path.c_str(), "wb");
    bool ok = f != nullptr;
    for (const out_bytes &a : outs) ok = ok && fwrite(a.p, 1, a.n, f) == a.n;
    if (!ok || fclose(f)) fm_emu::fail("cannot write %s", path.c_str());
}
static void save(fm_emu::order o, const exact<float> &a) { save(o, {&a}); }

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: emu OP DIR ARGS...\n");
        return 2;
    }
    const std::string op = argv[1];
    dir = argv[2];
    auto I = [&](int i) { return atoi(argv[3 + i]); };
    auto F = [&](int i) { return (float)atof(argv[3 + i]); };
    for (fm_emu::order o : {fm_emu::order::forward, fm_emu::order::reverse, fm_emu::order::shuffled}) {
        fm_emu::set_order(o);
        if (op == "add") {
            exact<float> x(load<float>("x")), y(load<float>("y"));
            fm_emu_add(x.p, y.p, x.n);
            save(o, x);
        } else if (op == "rmsnorm") { /* T n eps zero_centered */
            exact<float> x(load<float>("x")), w(load<float>("w")), out((size_t)I(0) * I(1));
            fm_emu_rmsnorm(out.p, x.p, w.p, I(0), I(1), F(2), I(3));
            save(o, out);
        } else if (op == "matmul") { /* dtype rows cols group_size T scale_bf16 int8_act; files w, scales, biases, x */
            matrix m("w", I(0), I(1), I(2), I(3), I(5), I(6));
            exact<float> x(load<float>("x")), y((size_t)I(4) * I(1));
            fm_emu_matmul(&m.m, x.p, I(4), y.p);
            save(o, y);
        } else if (op == "quantize_x") { /* T cols gs: out = xq (as floats), then xd, then xqs */
            const size_t n = (size_t)I(0) * I(1), ng = n / I(2);
            exact<float> x(load<float>("x")), out(n + 2 * ng);
            exact<int8_t> xq(n);
            fm_emu_quantize_x(x.p, I(0), I(1), I(2), xq.p, out.p + n, out.p + n + ng);
            for (size_t i = 0; i < n; i++) out.p[i] = xq.p[i];
            save(o, out);
        } else if (op == "experts") { /* H I n_work scale_bf16, then per expert: n and per matrix (gate, up,
                                       * down) dtype group_size int8_act; files x, e<j>_tok, e<j>_<g|u|d>_w ... */
            const int H = I(0), In = I(1), n_work = I(2), bf16 = I(3);
            std::vector<matrix *> mats;
            std::vector<exact<int32_t> *> toks;
            std::vector<fm_expert_work> work((size_t)n_work);
            int rows = 0;
            for (int j = 0, at = 4; j < n_work; j++, at += 10) {
                const std::string e = "e" + std::to_string(j) + "_";
                const fm_mat *gud[3];
                for (int k = 0; k < 3; k++) {
                    const int r = k < 2 ? In : H, c = k < 2 ? H : In;
                    mats.push_back(new matrix(e + "gud"[k] + "_w", I(at + 1 + 3 * k), r, c, I(at + 2 + 3 * k), bf16,
                                              I(at + 3 + 3 * k)));
                    gud[k] = &mats.back()->m;
                }
                toks.push_back(new exact<int32_t>(load<int32_t>((e + "tok").c_str())));
                work[j] = {gud[0], gud[1], gud[2], toks.back()->p, I(at), rows};
                rows += I(at);
            }
            exact<float> x(load<float>("x")), ye((size_t)rows * H);
            fm_emu_experts(work.data(), n_work, x.p, ye.p, H);
            save(o, ye);
            for (matrix *m : mats) delete m;
            for (exact<int32_t> *t : toks) delete t;
        } else if (op == "silu_mul" || op == "sigmoid_mul") { /* T n */
            exact<float> g(load<float>("gate")), b(load<float>("b")), out((size_t)I(0) * I(1));
            (op == "silu_mul" ? fm_emu_silu_mul : fm_emu_sigmoid_mul)(out.p, g.p, b.p, I(0), I(1));
            save(o, out);
        } else if (op == "l2norm") { /* rows n eps scale */
            exact<float> x(load<float>("x"));
            fm_emu_l2norm(x.p, I(0), I(1), F(2), F(3));
            save(o, x);
        } else if (op == "rope") { /* T heads head_dim rot_dim pos0 theta */
            exact<float> x(load<float>("x"));
            fm_emu_rope(x.p, I(0), I(1), I(2), I(3), I(4), F(5));
            save(o, x);
        } else if (op == "split_q_gate") { /* T nh hd */
            exact<float> q2(load<float>("q2")), q((size_t)I(0) * I(1) * I(2)), g(q.n);
            fm_emu_split_q_gate(q.p, g.p, q2.p, I(0), I(1), I(2));
            save(o, {&q, &g});
        } else if (op == "kv_write") { /* pos0 T row */
            exact<float> cache(load<float>("cache")), src(load<float>("src"));
            fm_emu_kv_write(cache.p, src.p, I(0), I(1), I(2));
            save(o, cache);
        } else if (op == "gate_rows") { /* T n */
            exact<float> x(load<float>("x")), g(load<float>("g"));
            fm_emu_gate_rows(x.p, g.p, I(0), I(1));
            save(o, x);
        } else if (op == "deltanet_gates") { /* T Hv */
            exact<float> b(load<float>("b")), a(load<float>("a")), A(load<float>("A_log")), dt(load<float>("dt_bias"));
            fm_emu_deltanet_gates(b.p, a.p, A.p, dt.p, I(0), I(1));
            save(o, {&b, &a});
        } else if (op == "deltanet_split") { /* T kd vd */
            exact<float> conv(load<float>("conv")), q((size_t)I(0) * I(1)), k(q.n), v((size_t)I(0) * I(2));
            fm_emu_deltanet_split(q.p, k.p, v.p, conv.p, I(0), I(1), I(2));
            save(o, {&q, &k, &v});
        } else if (op == "conv1d_silu") { /* T C K */
            exact<float> x(load<float>("x")), state(load<float>("state")), w(load<float>("w")), out((size_t)I(0) * I(1));
            fm_emu_conv1d_silu(out.p, x.p, state.p, w.p, I(0), I(1), I(2));
            save(o, {&out, &state});
        } else if (op == "moe_combine") { /* T k h */
            exact<float> out(load<float>("out")), ye(load<float>("ye")), w(load<float>("w"));
            exact<int32_t> row(load<int32_t>("row"));
            fm_emu_moe_combine(out.p, ye.p, row.p, w.p, I(0), I(1), I(2));
            save(o, out);
        } else if (op == "embed") { /* bits rows cols group_size scale_bf16 (scales, biases: q4 and q8 only) */
            const bool quant = I(0) == 4 || I(0) == 8;
            exact<uint8_t> w(load<uint8_t>("w"));
            exact<uint16_t> s(quant ? load<uint16_t>("scales") : std::vector<uint16_t>()),
                b(quant ? load<uint16_t>("biases") : std::vector<uint16_t>());
            exact<int32_t> ids(load<int32_t>("ids"));
            exact<float> out(ids.n * (size_t)I(2));
            fm_emu_embed(I(0), w.p, s.p, b.p, I(1), I(2), I(3), I(4), ids.p, (int)ids.n, out.p);
            save(o, out);
        } else if (op == "route") { /* T E k norm; out: idx (int32) then weights */
            exact<float> logits(load<float>("logits")), wt((size_t)I(0) * I(2));
            exact<int32_t> idx((size_t)I(0) * I(2));
            fm_emu_route(logits.p, I(0), I(1), I(2), I(3), idx.p, wt.p);
            save(o, {&idx, &wt});
        } else if (op == "attention") { /* T pos0 nh nkv hd scale split (-1: the host's choice) */
            exact<float> q(load<float>("q")), kc(load<float>("k_cache")), vc(load<float>("v_cache"));
            exact<float> out((size_t)I(0) * I(2) * I(4));
            fm_emu_attention(out.p, q.p, kc.p, vc.p, I(0), I(1), I(2), I(3), I(4), F(5), I(6));
            save(o, out);
        } else if (op == "gated_delta") { /* T pos0 Hk Hv dk dv */
            exact<float> q(load<float>("q")), k(load<float>("k")), v(load<float>("v")), g(load<float>("g"));
            exact<float> beta(load<float>("beta")), S(load<float>("S")), out((size_t)I(0) * I(3) * I(5));
            fm_emu_gated_delta(out.p, S.p, q.p, k.p, v.p, g.p, beta.p, I(0), I(1), I(2), I(3), I(4), I(5));
            save(o, {&out, &S});
        } else {
            fm_emu::fail("unknown op %s", op.c_str());
        }
    }
    return 0;
}
