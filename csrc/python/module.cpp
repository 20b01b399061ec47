// module.cpp — flashmoe._core: a thin pybind11 binding. No logic: it converts the load spec built by
// python/flashmoe/model.py into fm_load_spec, releases the GIL around compute, and turns fm_status
// into the Python exceptions of flashmoe.errors in one place (raise_status).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

extern "C" {
#include "../backend/cpu/cpu.h"
#include "../backend/cpu/threads.h"
#include "flashmoe.h"
uint32_t fm_crc32(uint32_t crc, const void *data, size_t n); /* core/util.h */
uint32_t fm_crc32_portable(uint32_t crc, const void *data, size_t n);
}

namespace py = pybind11;

[[noreturn]] static void raise_status(fm_status st) {
    py::module_ errors = py::module_::import("flashmoe.errors");
    const char *cls = "FlashMoEError";
    switch (st) {
    case FM_ERR_FORMAT: cls = "FormatError"; break;
    case FM_ERR_CONTEXT: cls = "ContextLengthError"; break;
    case FM_ERR_IO: cls = "ReadError"; break;
    case FM_ERR_BUDGET: cls = "MemoryBudgetError"; break;
    default: break;
    }
    PyErr_SetString(errors.attr(cls).ptr(), fm_last_error());
    throw py::error_already_set();
}

static void check(fm_status st) {
    if (st != FM_OK) raise_status(st);
}

static fm_tensor_desc to_desc(const py::dict &d) {
    fm_tensor_desc t;
    std::memset(&t, 0, sizeof t);
    std::string name = d["name"].cast<std::string>();
    if (name.size() >= sizeof t.name) throw py::value_error("tensor name too long: " + name);
    std::memcpy(t.name, name.c_str(), name.size() + 1);
    t.dtype = (fm_dtype)d["dtype"].cast<int>();
    auto shape = d["shape"].cast<std::vector<int64_t>>();
    if (shape.empty() || shape.size() > 2) throw py::value_error("tensor " + name + ": only 1-D and 2-D tensors");
    t.ndim = (int)shape.size();
    for (size_t i = 0; i < shape.size(); i++) t.shape[i] = shape[i];
    t.group_size = d.contains("group_size") ? d["group_size"].cast<int>() : 0;
    t.scale_bf16 = d.contains("scale_bf16") && d["scale_bf16"].cast<bool>() ? 1 : 0; // else fp16 scales
    t.offset = d["offset"].cast<uint64_t>();
    t.nbytes = d["nbytes"].cast<uint64_t>();
    t.scales_offset = d.contains("scales_offset") ? d["scales_offset"].cast<uint64_t>() : 0;
    t.biases_offset = d.contains("biases_offset") ? d["biases_offset"].cast<uint64_t>() : 0;
    return t;
}

// A load spec converted from the dict python/flashmoe/model.py builds, with the storage its pointers use.
struct SpecHolder {
    fm_load_spec s;
    std::string dense_path;
    std::string backend;
    std::vector<fm_tensor_desc> dense;
    std::vector<std::string> expert_path_strs;
    std::vector<const char *> expert_paths;
    std::vector<uint64_t> expert_sizes;
    std::vector<uint32_t> checksums;
    SpecHolder() { std::memset(&s, 0, sizeof s); }
    SpecHolder(const SpecHolder &) = delete;
};

static void to_spec(const py::dict &spec, SpecHolder &h) {
    fm_config &c = h.s.config;
    py::dict cfg = spec["config"].cast<py::dict>();
    auto geti = [&](const char *k) { return cfg[k].cast<int>(); };
    c.arch = (fm_arch)spec["arch"].cast<int>();
    c.vocab_size = geti("vocab_size");
    c.hidden_size = geti("hidden_size");
    c.num_hidden_layers = geti("num_hidden_layers");
    c.num_attention_heads = geti("num_attention_heads");
    c.num_key_value_heads = geti("num_key_value_heads");
    c.head_dim = geti("head_dim");
    c.linear_conv_kernel_dim = geti("linear_conv_kernel_dim");
    c.linear_key_head_dim = geti("linear_key_head_dim");
    c.linear_value_head_dim = geti("linear_value_head_dim");
    c.linear_num_key_heads = geti("linear_num_key_heads");
    c.linear_num_value_heads = geti("linear_num_value_heads");
    c.num_experts = geti("num_experts");
    c.num_experts_per_tok = geti("num_experts_per_tok");
    c.moe_intermediate_size = geti("moe_intermediate_size");
    c.shared_expert_intermediate_size = geti("shared_expert_intermediate_size");
    c.intermediate_size = geti("intermediate_size");
    c.norm_topk_prob = geti("norm_topk_prob");
    c.tie_word_embeddings = geti("tie_word_embeddings");
    c.rms_norm_eps = cfg["rms_norm_eps"].cast<float>();
    c.rope_theta = cfg["rope_theta"].cast<float>();
    c.partial_rotary_factor = cfg["partial_rotary_factor"].cast<double>();
    auto full = spec["layer_is_full_attention"].cast<std::vector<int>>();
    auto moe = spec["layer_is_moe"].cast<std::vector<int>>();
    if ((int)full.size() != c.num_hidden_layers || (int)moe.size() != c.num_hidden_layers ||
        c.num_hidden_layers > FM_MAX_LAYERS)
        throw py::value_error("layer kinds do not match num_hidden_layers");
    for (int l = 0; l < c.num_hidden_layers; l++) {
        c.layer_is_full_attention[l] = (uint8_t)full[l];
        c.layer_is_moe[l] = (uint8_t)moe[l];
    }

    h.dense_path = spec["dense_path"].cast<std::string>();
    h.s.dense_path = h.dense_path.c_str();
    h.s.dense_size = spec["dense_size"].cast<uint64_t>();
    h.s.has_dense_checksum = spec.contains("has_dense_checksum") && spec["has_dense_checksum"].cast<bool>() ? 1 : 0;
    h.s.dense_checksum = h.s.has_dense_checksum ? spec["dense_checksum"].cast<uint32_t>() : 0;
    for (auto item : spec["dense"].cast<py::list>()) h.dense.push_back(to_desc(item.cast<py::dict>()));
    h.s.dense = h.dense.data();
    h.s.n_dense = (int)h.dense.size();

    for (auto item : spec["expert_paths"].cast<py::list>())
        h.expert_path_strs.push_back(item.is_none() ? std::string() : item.cast<std::string>());
    for (auto &p : h.expert_path_strs) h.expert_paths.push_back(p.empty() ? nullptr : p.c_str());
    h.expert_sizes = spec["expert_file_sizes"].cast<std::vector<uint64_t>>();
    h.checksums = spec["expert_checksums"].cast<std::vector<uint32_t>>();
    if (!h.expert_paths.empty()) {
        if ((int)h.expert_paths.size() != c.num_hidden_layers || h.expert_sizes.size() != h.expert_paths.size() ||
            h.checksums.size() != (size_t)c.num_hidden_layers * (size_t)(c.num_experts > 0 ? c.num_experts : 0))
            throw py::value_error("expert file list does not match the layers");
        h.s.expert_paths = h.expert_paths.data();
        h.s.expert_file_sizes = h.expert_sizes.data();
        h.s.expert_checksums = h.checksums.data();
        h.s.expert_blob_size = spec["expert_blob_size"].cast<uint64_t>();
        h.s.expert_stride = spec["expert_stride"].cast<uint64_t>();
        auto ex = spec["expert_tensors"].cast<py::list>();
        h.s.expert_gate = to_desc(ex[0].cast<py::dict>());
        h.s.expert_up = to_desc(ex[1].cast<py::dict>());
        h.s.expert_down = to_desc(ex[2].cast<py::dict>());
    }
    h.s.context_length = spec["context_length"].cast<int>();
    h.s.prefill_chunk = spec["prefill_chunk"].cast<int>();
    h.s.expert_cache_slots = spec["expert_cache_slots"].cast<int>();
    h.s.memory_budget = spec["memory_budget"].cast<uint64_t>();
    h.s.cache_policy = (fm_cache_policy)spec["cache_policy"].cast<int>();
    h.s.io_threads = spec["io_threads"].cast<int>();
    h.s.prefetch = spec["prefetch"].cast<bool>() ? 1 : 0;
    h.s.verify_checksums = spec["verify_checksums"].cast<bool>() ? 1 : 0;
    h.s.int8_activations = spec.contains("int8_activations") && spec["int8_activations"].cast<bool>() ? 1 : 0;
    if (spec.contains("backend") && !spec["backend"].is_none()) {
        h.backend = spec["backend"].cast<std::string>();
        h.s.backend = h.backend.c_str();
    }

}

static py::dict memory_dict(const fm_memory &mem) {
    py::dict d;
    d["minimum"] = mem.minimum;
    d["budget"] = mem.budget;
    d["dense_bytes"] = mem.dense;
    d["kv_bytes"] = mem.kv_cache;
    d["state_bytes"] = mem.state;
    d["scratch_bytes"] = mem.scratch;
    d["expert_cache_bytes"] = mem.expert_cache;
    d["expert_slots"] = mem.expert_slots;
    d["experts_total"] = mem.experts_total;
    return d;
}

// ---------------------------------------------------------------- sampling and snapshots

static fm_sampling to_sampling(const py::dict &d) {
    fm_sampling p = fm_sampling_default();
    for (auto item : d) {
        const std::string k = item.first.cast<std::string>();
        py::handle v = item.second;
        if (k == "temperature") p.temperature = v.cast<float>();
        else if (k == "top_k") p.top_k = v.cast<int>();
        else if (k == "top_p") p.top_p = v.cast<float>();
        else if (k == "min_p") p.min_p = v.cast<float>();
        else if (k == "repetition_penalty") p.repetition_penalty = v.cast<float>();
        else if (k == "presence_penalty") p.presence_penalty = v.cast<float>();
        else if (k == "frequency_penalty") p.frequency_penalty = v.cast<float>();
        else if (k == "seed") p.seed = v.is_none() ? 0 : v.cast<uint64_t>();
        else throw py::value_error("unknown sampling parameter: " + k);
    }
    return p;
}

// A sampler (csrc/core/sample.c): penalties over accepted tokens, temperature, top_k/top_p/min_p, seeded draw.
class Sampler {
  public:
    Sampler(const py::dict &params, int vocab_size) {
        fm_sampling p = to_sampling(params);
        fm_status st = fm_sampler_new(&p, vocab_size, &s_);
        if (st == FM_ERR_INVALID) throw py::value_error(fm_last_error());
        check(st);
    }
    ~Sampler() { fm_sampler_free(s_); }
    Sampler(const Sampler &) = delete;
    Sampler &operator=(const Sampler &) = delete;

    void accept(py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens) {
        fm_sampler_accept(s_, tokens.data(), (int)tokens.size());
    }
    int sample(py::array_t<float, py::array::c_style | py::array::forcecast> logits) {
        std::vector<float> l = checked_copy(logits);
        int32_t t;
        {
            py::gil_scoped_release release;
            t = fm_sampler_sample(s_, l.data());
        }
        return t;
    }
    py::array_t<float> apply_penalties(py::array_t<float, py::array::c_style | py::array::forcecast> logits) {
        std::vector<float> l = checked_copy(logits);
        fm_sampler_apply_penalties(s_, l.data());
        py::array_t<float> out((py::ssize_t)l.size());
        std::memcpy(out.mutable_data(), l.data(), l.size() * sizeof(float));
        return out;
    }
    void reset() { fm_sampler_reset(s_); }
    int vocab_size() const { return fm_sampler_vocab_size(s_); }
    fm_sampler *get() { return s_; }

  private:
    std::vector<float> checked_copy(const py::array_t<float, py::array::c_style | py::array::forcecast> &logits) {
        const int V = fm_sampler_vocab_size(s_);
        if (logits.size() != V)
            throw py::value_error("logits have " + std::to_string(logits.size()) + " entries, the sampler's vocabulary " +
                                  std::to_string(V));
        return std::vector<float>(logits.data(), logits.data() + V);
    }
    fm_sampler *s_ = nullptr;
};

// The sequence state of a model at one position (fm_model_snapshot).
class Snapshot {
  public:
    explicit Snapshot(fm_snapshot *s) : s_(s) {}
    ~Snapshot() { fm_snapshot_free(s_); }
    Snapshot(const Snapshot &) = delete;
    Snapshot &operator=(const Snapshot &) = delete;
    int position() const { return fm_snapshot_position(s_); }
    size_t nbytes() const { return fm_snapshot_bytes(s_); }
    py::array_t<int32_t> tokens() const {
        py::array_t<int32_t> out(position());
        std::memcpy(out.mutable_data(), fm_snapshot_tokens(s_), sizeof(int32_t) * (size_t)position());
        return out;
    }
    const fm_snapshot *get() const { return s_; }

  private:
    fm_snapshot *s_;
};

// One sequence state per model: calls from several Python threads are serialised here (the GIL is
// released first, then the model's mutex taken, so a thread waiting for the model never holds the GIL).
class Model {
    // The GIL released and the model's mutex held, for the scope.
    struct Exclusive {
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock;
        explicit Exclusive(std::mutex &mu) : lock(mu) {}
    };

  public:
    explicit Model(const py::dict &spec) {
        to_spec(spec, h_);
        const fm_config &c = h_.s.config;
        vocab_ = c.vocab_size;
        n_layers_ = c.num_hidden_layers;
        n_experts_ = c.num_experts > 0 ? c.num_experts : 0;
        fm_status st;
        {
            py::gil_scoped_release release;
            st = fm_model_load(&h_.s, &m_);
        }
        check(st);
    }
    ~Model() { fm_model_free(m_); }
    Model(const Model &) = delete;
    Model &operator=(const Model &) = delete;

    py::array_t<float> forward(py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens, bool all_logits) {
        const int n = (int)tokens.size();
        py::array_t<float> out = all_logits ? py::array_t<float>({n, vocab_}) : py::array_t<float>({1, vocab_});
        const int32_t *tok = tokens.data();
        float *dst = out.mutable_data();
        fm_status st;
        {
            Exclusive ex(mu_);
            st = fm_model_forward(m_, tok, n, dst, all_logits ? 1 : 0);
        }
        check(st);
        return out;
    }

    std::vector<int32_t> generate(py::array_t<int32_t, py::array::c_style | py::array::forcecast> prompt,
                                  int max_tokens, float temperature, uint64_t seed, std::vector<int32_t> stop_ids) {
        if (max_tokens < 0) throw py::value_error("max_tokens must be >= 0");
        std::vector<int32_t> out((size_t)max_tokens + 1);
        int n_out = 0;
        const int32_t *p = prompt.data();
        const int n_prompt = (int)prompt.size();
        fm_sampling sp = fm_sampling_default();
        sp.temperature = temperature;
        sp.seed = seed;
        fm_status st;
        {
            Exclusive ex(mu_);
            st = fm_model_generate(m_, p, n_prompt, max_tokens, &sp, stop_ids.data(), (int)stop_ids.size(),
                                   out.data(), &n_out);
        }
        check(st);
        out.resize((size_t)n_out);
        return out;
    }

    // Forward with the debug hook on: returns {name: float32 [T, n]} of every named intermediate,
    // chunks concatenated along T.
    py::dict trace(py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens) {
        struct Rec {
            std::vector<std::string> order;
            std::map<std::string, std::pair<int, std::vector<float>>> data;
        } rec;
        auto cb = [](void *user, const char *name, const float *x, int T, int n) {
            Rec *r = static_cast<Rec *>(user);
            auto it = r->data.find(name);
            if (it == r->data.end()) {
                r->order.push_back(name);
                it = r->data.emplace(name, std::make_pair(n, std::vector<float>())).first;
            }
            it->second.second.insert(it->second.second.end(), x, x + (size_t)T * n);
        };
        std::vector<float> logits((size_t)vocab_);
        fm_status st;
        {
            Exclusive ex(mu_);
            fm_model_set_trace(m_, cb, &rec);
            st = fm_model_forward(m_, tokens.data(), (int)tokens.size(), logits.data(), 0);
            fm_model_set_trace(m_, nullptr, nullptr);
        }
        check(st);
        py::dict out;
        for (auto &name : rec.order) {
            auto &[n, v] = rec.data[name];
            py::array_t<float> a({(py::ssize_t)(v.size() / n), (py::ssize_t)n});
            std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(float));
            out[py::str(name)] = a;
        }
        return out;
    }

    // Run tokens from the current position, sample the next token from the last logits (GIL released).
    int decode_step(py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens, Sampler &sampler) {
        const int32_t *tok = tokens.data();
        const int n = (int)tokens.size();
        fm_sampler *smp = sampler.get();
        int32_t next = -1;
        fm_status st;
        {
            Exclusive ex(mu_);
            st = fm_model_decode_step(m_, tok, n, smp, &next);
        }
        check(st);
        return next;
    }

    std::unique_ptr<Snapshot> snapshot() {
        fm_snapshot *s = nullptr;
        fm_status st;
        {
            Exclusive ex(mu_);
            st = fm_model_snapshot(m_, &s);
        }
        check(st);
        return std::make_unique<Snapshot>(s);
    }

    void restore(const Snapshot &snap) {
        fm_status st;
        {
            Exclusive ex(mu_);
            st = fm_model_restore(m_, snap.get());
        }
        if (st == FM_ERR_INVALID) throw py::value_error(fm_last_error());
        check(st);
    }

    py::array_t<uint64_t> expert_usage() const {
        py::array_t<uint64_t> out({n_layers_, n_experts_});
        if (n_experts_ > 0) fm_model_expert_usage(m_, out.mutable_data());
        return out;
    }

    py::dict memory() const {
        fm_memory mem;
        fm_model_memory(m_, &mem);
        return memory_dict(mem);
    }

    void reset() {
        Exclusive ex(mu_);
        fm_model_reset(m_);
    }
    int position() const { return fm_model_position(m_); }
    // The tokens the state holds (fm_model_tokens), copied under the lock.
    py::array_t<int32_t> tokens() {
        std::vector<int32_t> t;
        {
            Exclusive ex(mu_);
            const int32_t *p = fm_model_tokens(m_);
            t.assign(p, p + fm_model_position(m_));
        }
        py::array_t<int32_t> out((py::ssize_t)t.size());
        if (!t.empty()) std::memcpy(out.mutable_data(), t.data(), t.size() * sizeof(int32_t));
        return out;
    }
    void debug_fail_reads(int after, int count, bool corrupt) {
        Exclusive ex(mu_);
        fm_model_debug_fail_reads(m_, after, count, corrupt ? 1 : 0);
    }
    int context_length() const { return fm_model_context_length(m_); }
    std::string backend() const { return fm_model_backend(m_); }

    py::dict stats() const {
        fm_stats s;
        fm_model_stats(m_, &s);
        py::dict d;
        d["tokens"] = s.tokens;
        d["expert_hits"] = s.expert_hits;
        d["expert_misses"] = s.expert_misses;
        d["prefetches"] = s.prefetches;
        d["prefetch_hits"] = s.prefetch_hits;
        d["bytes_read"] = s.bytes_read;
        d["io_wait_seconds"] = s.io_wait_seconds;
        d["io_busy_seconds"] = s.io_busy_seconds;
        d["compute_seconds"] = s.compute_seconds;
        d["direct_io"] = (bool)s.direct_io;
        d["last_prompt_tokens"] = s.last_prompt_tokens;
        d["last_prompt_seconds"] = s.last_prompt_seconds;
        d["last_generated_tokens"] = s.last_generated_tokens;
        d["last_decode_seconds"] = s.last_decode_seconds;
        return d;
    }

  private:
    std::mutex mu_;
    fm_model *m_ = nullptr;
    int vocab_ = 0, n_layers_ = 0, n_experts_ = 0;
    SpecHolder h_;
};

// ---------------------------------------------------------------- ops, for the kernel tests

using f32arr = py::array_t<float, py::array::c_style | py::array::forcecast>;

static fm_mat make_mat(int dtype, py::array data, py::object scales, py::object biases, int rows, int cols, int gs,
                       bool int8_act, bool scale_bf16) {
    fm_mat w = {};
    w.int8_act = int8_act ? 1 : 0;
    w.scale_bf16 = scale_bf16 ? 1 : 0;
    w.dtype = (fm_dtype)dtype;
    w.rows = rows;
    w.cols = cols;
    w.group_size = gs;
    w.data = data.data();
    w.scales = scales.is_none() ? nullptr : (const uint16_t *)scales.cast<py::array>().data();
    w.biases = biases.is_none() ? nullptr : (const uint16_t *)biases.cast<py::array>().data();
    return w;
}

static f32arr copy(const f32arr &a) { return f32arr(py::array(a.request())).attr("copy")().cast<f32arr>(); }

static void bind_ops(py::module_ &m) {
    m.def("plan_memory", [](const py::dict &spec) {
        SpecHolder h;
        to_spec(spec, h);
        fm_memory mem;
        check(fm_model_plan(&h.s, &mem));
        return memory_dict(mem);
    });
    // the engine's CRC-32, for the tests (zlib.crc32's); portable: the table version the others fall back to
    m.def("crc32", [](py::buffer data, uint32_t crc, bool portable) {
        py::buffer_info b = data.request();
        py::gil_scoped_release release;
        return (portable ? fm_crc32_portable : fm_crc32)(crc, b.ptr, (size_t)(b.size * b.itemsize));
    }, py::arg("data"), py::arg("crc") = 0, py::arg("portable") = false);
    m.def("cpu_isas", []() {
        std::vector<std::string> out;
        for (const char *isa : {"scalar", "avx2", "avx512", "neon", "neondot"})
            if (fm_cpu_isa_available(isa)) out.push_back(isa);
        return out;
    });
    m.def("set_cpu_isa", [](const std::string &isa) {
        if (fm_cpu_set_isa(isa.c_str()) != 0) throw py::value_error("CPU kernel variant not available: " + isa);
    });
    m.def("set_threads", [](int n) {
        if (n < 1) throw py::value_error("threads must be >= 1");
        fm_threads_set(n);
    });
    m.def("get_threads", []() { return fm_threads_get(); });
    m.def("backends", []() { return std::string(fm_backend_names()); }, "comma-separated backends this build has");
    // scale_bf16: the scales and biases (uint16 arrays) hold bfloat16 bits, else float16
    m.def("op_matmul", [](int dtype, py::array data, py::object scales, py::object biases, int rows, int cols, int gs,
                          f32arr x, bool int8_act, bool scale_bf16) {
        fm_mat w = make_mat(dtype, data, scales, biases, rows, cols, gs, int8_act, scale_bf16);
        const int T = (int)(x.size() / cols);
        f32arr y({T, rows});
        fm_cpu_matmul(&w, x.data(), T, y.mutable_data());
        return y;
    }, py::arg("dtype"), py::arg("data"), py::arg("scales"), py::arg("biases"), py::arg("rows"), py::arg("cols"),
       py::arg("gs"), py::arg("x"), py::arg("int8_act") = false, py::kw_only(), py::arg("scale_bf16") = false);
    m.def("op_get_row", [](int dtype, py::array data, py::object scales, py::object biases, int rows, int cols, int gs,
                           int r, bool scale_bf16) {
        fm_mat w = make_mat(dtype, data, scales, biases, rows, cols, gs, false, scale_bf16);
        f32arr y(cols);
        fm_cpu_get_row(&w, r, y.mutable_data());
        return y;
    }, py::arg("dtype"), py::arg("data"), py::arg("scales"), py::arg("biases"), py::arg("rows"), py::arg("cols"),
       py::arg("gs"), py::arg("r"), py::kw_only(), py::arg("scale_bf16") = false);
    m.def("op_rmsnorm", [](f32arr x, f32arr w, float eps, bool zc) {
        const int n = (int)w.size(), T = (int)(x.size() / n);
        f32arr y({T, n});
        fm_cpu_rmsnorm(y.mutable_data(), x.data(), w.data(), T, n, eps, zc);
        return y;
    });
    m.def("op_l2norm", [](f32arr x, float eps, float scale) {
        f32arr y = copy(x);
        const int n = (int)x.shape(x.ndim() - 1);
        fm_cpu_l2norm(y.mutable_data(), (int)(x.size() / n), n, eps, scale);
        return y;
    });
    m.def("op_rope", [](f32arr x, int rot_dim, int pos0, float theta) {  // x [T, heads, hd]
        f32arr y = copy(x);
        fm_cpu_rope(y.mutable_data(), (int)x.shape(0), (int)x.shape(1), (int)x.shape(2), rot_dim, pos0, theta);
        return y;
    });
    m.def("op_silu_mul", [](f32arr gate, f32arr up) {
        f32arr y = copy(gate);
        fm_cpu_silu_mul(y.mutable_data(), gate.data(), up.data(), 1, (int)gate.size());
        return y;
    });
    m.def("op_sigmoid_mul", [](f32arr gate, f32arr x) {
        if (gate.size() != x.size()) throw py::value_error("gate and x differ in size");
        f32arr y = copy(x);
        fm_cpu_sigmoid_mul(y.mutable_data(), gate.data(), x.data(), 1, (int)x.size());
        return y;
    });
    m.def("op_attention", [](f32arr q, f32arr kc, f32arr vc, int pos0, float scale) {  // q [T, nh, hd]
        const int T = (int)q.shape(0), nh = (int)q.shape(1), hd = (int)q.shape(2), nkv = (int)kc.shape(1);
        if (kc.shape(0) < pos0 + T) throw py::value_error("cache shorter than pos0 + T");
        f32arr y({T, nh, hd});
        fm_cpu_attention(y.mutable_data(), q.data(), kc.data(), vc.data(), T, pos0, nh, nkv, hd, scale);
        return y;
    });
    m.def("op_conv1d_silu", [](f32arr x, f32arr state, f32arr w) {  // x [T, C], state [K-1, C], w [C, K]
        const int T = (int)x.shape(0), C = (int)x.shape(1), K = (int)w.shape(1);
        f32arr y({T, C});
        f32arr st = copy(state);
        fm_cpu_conv1d_silu(y.mutable_data(), x.data(), st.mutable_data(), w.data(), T, C, K);
        return py::make_tuple(y, st);
    });
    m.def("op_gated_delta", [](f32arr q, f32arr k, f32arr v, f32arr g, f32arr beta, f32arr S) {
        const int T = (int)q.shape(0), Hk = (int)q.shape(1), dk = (int)q.shape(2), Hv = (int)v.shape(1),
                  dv = (int)v.shape(2);
        f32arr y({T, Hv, dv});
        f32arr s2 = copy(S);
        fm_cpu_gated_delta(y.mutable_data(), s2.mutable_data(), q.data(), k.data(), v.data(), g.data(), beta.data(),
                          T, Hk, Hv, dk, dv);
        return py::make_tuple(y, s2);
    });
    m.def("op_gated_delta_chunk", [](f32arr q, f32arr k, f32arr v, f32arr g, f32arr beta, f32arr S, int chunk) {
        const int T = (int)q.shape(0), Hk = (int)q.shape(1), dk = (int)q.shape(2), Hv = (int)v.shape(1),
                  dv = (int)v.shape(2);
        f32arr y({T, Hv, dv});
        f32arr s2 = copy(S);
        fm_cpu_gated_delta_chunk(y.mutable_data(), s2.mutable_data(), q.data(), k.data(), v.data(), g.data(),
                                beta.data(), T, Hk, Hv, dk, dv, chunk);
        return py::make_tuple(y, s2);
    });
    m.def("op_topk_softmax", [](f32arr logits, int k, bool norm) {
        const int n = (int)logits.size();
        if (k < 1 || k > n) throw py::value_error("k out of range");
        py::array_t<int32_t> idx(k);
        f32arr w(k);
        fm_cpu_topk_softmax(logits.data(), n, k, norm, idx.mutable_data(), w.mutable_data());
        return py::make_tuple(idx, w);
    });
}

PYBIND11_MODULE(_core, m) {
    m.doc() = "flashmoe compiled core";
    py::class_<Sampler>(m, "Sampler")
        .def(py::init<const py::dict &, int>(), py::arg("params"), py::arg("vocab_size"))
        .def("accept", &Sampler::accept, py::arg("tokens"))
        .def("sample", &Sampler::sample, py::arg("logits"))
        .def("apply_penalties", &Sampler::apply_penalties, py::arg("logits"))
        .def("reset", &Sampler::reset)
        .def_property_readonly("vocab_size", &Sampler::vocab_size);
    py::class_<Snapshot>(m, "Snapshot")
        .def_property_readonly("position", &Snapshot::position)
        .def_property_readonly("nbytes", &Snapshot::nbytes)
        .def_property_readonly("tokens", &Snapshot::tokens);
    py::class_<Model>(m, "Model")
        .def(py::init<const py::dict &>())
        .def("forward", &Model::forward, py::arg("tokens"), py::arg("all_logits") = true)
        .def("generate", &Model::generate)
        .def("decode_step", &Model::decode_step, py::arg("tokens"), py::arg("sampler"))
        .def("snapshot", &Model::snapshot)
        .def("restore", &Model::restore, py::arg("snapshot"))
        .def("trace", &Model::trace)
        .def("reset", &Model::reset)
        .def("tokens", &Model::tokens)
        .def("debug_fail_reads", &Model::debug_fail_reads, py::arg("after"), py::arg("count"), py::arg("corrupt") = false)
        .def_property_readonly("position", &Model::position)
        .def_property_readonly("context_length", &Model::context_length)
        .def_property_readonly("backend", &Model::backend)
        .def("stats", &Model::stats)
        .def("expert_usage", &Model::expert_usage)
        .def("memory", &Model::memory);
    bind_ops(m);
    m.attr("F32") = (int)FM_F32;
    m.attr("BF16") = (int)FM_BF16;
    m.attr("Q8") = (int)FM_Q8;
    m.attr("Q4") = (int)FM_Q4;
    m.attr("ARCH_QWEN3_5_MOE") = (int)FM_ARCH_QWEN3_5_MOE;
    m.attr("ARCH_QWEN3_NEXT") = (int)FM_ARCH_QWEN3_NEXT;
}
