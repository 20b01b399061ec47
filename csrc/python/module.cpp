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
#include "../backend/backend.h"
#include "../backend/cpu/cpu.h"
#include "../backend/cpu/threads.h"
#ifdef FLASHMOE_CUDA
#include "../backend/cuda/host_ffn.h"
#endif
#include "flashmoe.h"
uint32_t fm_crc32(uint32_t crc, const void *data, size_t n); /* core/util.h */
uint32_t fm_crc32_portable(uint32_t crc, const void *data, size_t n);
}

namespace py = pybind11;

// fm_last_error() as the exception class cls of flashmoe.errors.
[[noreturn]] static void raise_error(const char *cls) {
    py::module_ errors = py::module_::import("flashmoe.errors");
    PyErr_SetString(errors.attr(cls).ptr(), fm_last_error());
    throw py::error_already_set();
}

[[noreturn]] static void raise_status(fm_status st) {
    const char *cls = "FlashMoEError";
    switch (st) {
    case FM_ERR_FORMAT: cls = "FormatError"; break;
    case FM_ERR_CONTEXT: cls = "ContextLengthError"; break;
    case FM_ERR_IO: cls = "ReadError"; break;
    case FM_ERR_BUDGET: cls = "MemoryBudgetError"; break;
    case FM_ERR_DEVICE: cls = "DeviceError"; break;
    default: break;
    }
    raise_error(cls);
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
    h.s.gpu_memory_budget = spec.contains("gpu_memory_budget") ? spec["gpu_memory_budget"].cast<uint64_t>() : 0;
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

    // Progress from inside fm_model_forward, which runs without the GIL: after each layer of a prompt it
    // takes the GIL to let Ctrl-C through and to call progress(done, total); an exception from either
    // stops the forward (the engine resets the sequence) and is raised once it has returned.
    struct ProgressCall {
        py::object fn;  // callable(done, total) or None
        std::unique_ptr<py::error_already_set> error;
        static int call(void *user, int done, int total) {
            auto *p = static_cast<ProgressCall *>(user);
            py::gil_scoped_acquire gil;
            try {
                if (PyErr_CheckSignals() != 0) throw py::error_already_set();
                if (!p->fn.is_none()) p->fn(done, total);
            } catch (py::error_already_set &e) {
                p->error = std::make_unique<py::error_already_set>(std::move(e));
                return 1;
            }
            return 0;
        }
    };

    py::array_t<float> forward(py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens, bool all_logits,
                               py::object progress) {
        const int n = (int)tokens.size();
        py::array_t<float> out = all_logits ? py::array_t<float>({n, vocab_}) : py::array_t<float>({1, vocab_});
        const int32_t *tok = tokens.data();
        float *dst = out.mutable_data();
        ProgressCall pc{std::move(progress), nullptr};
        const bool watch = n > 1 || !pc.fn.is_none(); // a single token's layers are too short to be worth it
        fm_status st;
        {
            Exclusive ex(mu_);
            if (watch) fm_model_set_progress(m_, ProgressCall::call, &pc);
            st = fm_model_forward(m_, tok, n, dst, all_logits ? 1 : 0);
            fm_model_set_progress(m_, nullptr, nullptr);
        }
        if (pc.error) {
            pc.error->restore();
            throw py::error_already_set();
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
        d["device_expert_slots"] = s.device_expert_slots;
        d["device_expert_hits"] = s.device_expert_hits;
        d["device_expert_misses"] = s.device_expert_misses;
        d["device_bytes_in"] = s.device_bytes_in;
        d["device_step_replays"] = s.device_step_replays;
        d["device_step_recordings"] = s.device_step_recordings;
        d["device_shared_folds"] = s.device_shared_folds;
        d["device_host_experts"] = s.device_host_experts;
        d["device_prompt_layers"] = s.device_prompt_layers;
        d["device_launch_seconds"] = s.device_launch_seconds;
        d["device_wait_seconds"] = s.device_wait_seconds;
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
    m.def("backend_has_device", [](const std::string &name) { return fm_backend_has_device(name.c_str()) != 0; },
          "whether backend `name` is built and this machine has its device (a GPU for cuda)");
}

// ---------------------------------------------------------------- ops, for the op tests (tests/test_ops.py)
//
// Each op_* runs one op of a backend's table (csrc/backend/backend.h) on the backend named by its keyword
// backend= ("cpu" unless given): the inputs are copied into that backend's memory, the op is issued,
// finish() is checked and the outputs come back in new arrays (the inputs are never written). An unknown
// or unbuilt backend raises ArgumentError with fm_last_error's text; a backend whose table lacks the op,
// NotImplementedError. The exceptions are op_gated_delta and op_gated_delta_chunk: CPU kernel entry
// points (fm_cpu_*, the two forms the interface's gated_delta chooses between), not through a backend.

using f32arr = py::array_t<float, py::array::c_style | py::array::forcecast>;
using i32arr = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

static f32arr copy(const f32arr &a) { return f32arr(py::array(a.request())).attr("copy")().cast<f32arr>(); }
static f32arr like(const f32arr &a) { return f32arr(std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim())); }

// The op-test instance of each backend: opened on first use with a config without experts (no expert
// scratch), kept for the life of the process. (The op entry points hold the GIL, which serialises them.)
static fm_backend *op_backend(const std::string &name) {
    static std::map<std::string, fm_backend> open;
    auto it = open.find(name);
    if (it != open.end()) return &it->second;
    const fm_backend_ops *ops = fm_backend_find(name.c_str());
    if (!ops) raise_error("ArgumentError");
    static const fm_config no_experts = {};
    const fm_backend_params p = {&no_experts, 1, 0, 0};
    fm_backend b;
    const fm_status st = fm_backend_open(ops, &p, &b);
    if (st != FM_OK) {
        fm_backend_close(&b);
        raise_status(st);
    }
    return &open.emplace(name, b).first->second;
}

[[noreturn]] static void missing_op(const fm_backend *b, const char *op) {
    PyErr_SetString(PyExc_NotImplementedError, (std::string("backend '") + b->op->name + "' has no op " + op).c_str());
    throw py::error_already_set();
}

// One op call: its backend instance and the buffers it holds in that backend's memory, freed when the
// call goes (and the instance closed, where the call opened one of its own).
class OpCall {
  public:
    explicit OpCall(const std::string &backend) : b_(op_backend(backend)) {}
    // An instance of the call's own, sized by p (op_experts: the experts' scratch depends on the shapes).
    OpCall(const std::string &backend, const fm_backend_params &p) {
        const fm_backend_ops *ops = fm_backend_find(backend.c_str());
        if (!ops) raise_error("ArgumentError");
        const fm_status st = fm_backend_open(ops, &p, &own_);
        if (st != FM_OK) {
            fm_backend_close(&own_);
            raise_status(st);
        }
        b_ = &own_;
    }
    ~OpCall() {
        for (const Buf &a : bufs_) b_->op->free(b_->ctx, a.kind, a.p, a.bytes);
        if (b_ == &own_) fm_backend_close(&own_);
    }
    OpCall(const OpCall &) = delete;
    OpCall &operator=(const OpCall &) = delete;

    fm_backend *b() const { return b_; }

    // A copy of host bytes in the backend's memory.
    void *in(const void *host, size_t bytes, fm_mem_kind kind = FM_MEM_SCRATCH) {
        void *p = alloc(kind, bytes);
        FM_OP(b_, from_host, p, host, bytes);
        return p;
    }
    float *in(const f32arr &a) { return (float *)in(a.data(), (size_t)a.nbytes()); }
    float *zeros(size_t n) { return (float *)alloc(FM_MEM_SCRATCH, n * sizeof(float)); }

    // A weight matrix (dtype, data, scales, biases, rows, cols, gs: the arrays as stored) in the backend's
    // memory of `kind`, its sizes checked.
    fm_mat mat(int dtype, const py::array &data, const py::object &scales, const py::object &biases, int rows, int cols,
               int gs, bool int8_act, bool scale_bf16, fm_mem_kind kind) {
        if (dtype < FM_F32 || dtype > FM_Q4 || rows <= 0 || cols <= 0)
            throw py::value_error("bad matrix dtype or shape");
        fm_mat w = {};
        w.dtype = (fm_dtype)dtype;
        w.rows = rows;
        w.cols = cols;
        w.int8_act = int8_act ? 1 : 0;
        w.scale_bf16 = scale_bf16 ? 1 : 0;
        w.data = array_in(data, fm_tensor_data_bytes(w.dtype, rows, cols), "data", kind);
        if (dtype == FM_Q8 || dtype == FM_Q4) {
            if (gs <= 0 || cols % gs != 0 || scales.is_none() || biases.is_none())
                throw py::value_error("a quantized matrix needs a group size dividing cols, scales and biases");
            const size_t nb = sizeof(uint16_t) * (size_t)rows * (size_t)(cols / gs);
            w.group_size = gs;
            w.scales = (const uint16_t *)array_in(scales.cast<py::array>(), nb, "scales", kind);
            w.biases = (const uint16_t *)array_in(biases.cast<py::array>(), nb, "biases", kind);
        }
        return w;
    }

    // Wait for the ops issued so far; a failed op raises here.
    void sync() { check(FM_OP(b_, finish)); }
    // The op output at backend address src, copied into host (its size), once the ops have finished.
    template <class A> A out(A host, const void *src) {
        sync();
        FM_OP(b_, to_host, host.mutable_data(), src, (size_t)host.nbytes());
        return host;
    }

  private:
    struct Buf {
        fm_mem_kind kind;
        void *p;
        size_t bytes;
    };
    void *alloc(fm_mem_kind kind, size_t bytes) {
        void *p = b_->op->alloc(b_->ctx, kind, bytes ? bytes : 1);
        if (!p) throw std::bad_alloc();
        bufs_.push_back({kind, p, bytes ? bytes : 1});
        return p;
    }
    void *array_in(const py::array &a, uint64_t need, const char *what, fm_mem_kind kind) {
        py::array c = py::array::ensure(a, py::array::c_style);
        if (!c || (uint64_t)c.nbytes() != need)
            throw py::value_error(std::string("matrix ") + what + ": " + std::to_string(need) + " bytes expected");
        return in(c.data(), (size_t)need, kind);
    }
    fm_backend *b_ = nullptr;
    fm_backend own_ = {};
    std::vector<Buf> bufs_;
};

// FM_OP on a call's instance: NotImplementedError where the backend's table has no such op.
#define RUN_OP(c, name, ...)                                                                                           \
    do {                                                                                                               \
        if (!(c).b()->op->name) missing_op((c).b(), #name);                                                            \
        FM_OP((c).b(), name, __VA_ARGS__);                                                                             \
    } while (0)

static void check_size(bool ok, const char *what) {
    if (!ok) throw py::value_error(what);
}

// Rows ids of a matrix, dequantized: the embed op. [T, cols]
static f32arr run_embed(int dtype, py::array data, py::object scales, py::object biases, int rows, int cols, int gs,
                        const i32arr &ids, bool scale_bf16, const std::string &backend) {
    const int T = (int)ids.size();
    for (int t = 0; t < T; t++) check_size(ids.data()[t] >= 0 && ids.data()[t] < rows, "row id out of range");
    OpCall c(backend);
    const fm_mat w = c.mat(dtype, data, scales, biases, rows, cols, gs, false, scale_bf16, FM_MEM_DENSE);
    float *y = c.zeros((size_t)T * cols);
    RUN_OP(c, embed, &w, ids.data(), T, y);
    return c.out(f32arr({T, cols}), y);
}

// A matrix of op_experts given as the tuple (dtype, data, scales, biases, rows, cols, gs).
static fm_mat expert_mat(OpCall &c, const py::handle &t, int rows, int cols, bool int8_act, bool scale_bf16) {
    py::tuple m = t.cast<py::tuple>();
    check_size(m.size() == 7, "an expert matrix is (dtype, data, scales, biases, rows, cols, gs)");
    check_size(m[4].cast<int>() == rows && m[5].cast<int>() == cols, "expert matrices: gate, up [I, H], down [H, I]");
    const int dtype = m[0].cast<int>();
    return c.mat(dtype, m[1].cast<py::array>(), m[2], m[3], rows, cols, m[6].cast<int>(),
                 int8_act && (dtype == FM_Q8 || dtype == FM_Q4), scale_bf16, FM_MEM_EXPERT_SLOTS);
}

// op_experts' list read: T, H (xn's), I (the first gate's rows), then each expert's matrices (mats[3j..3j+2]) and
// its tokens (toks[j]), checked
struct ExpertList {
    int T, H, I, n;
    std::vector<fm_mat> mats;
    std::vector<i32arr> toks;
};
static ExpertList expert_dims(const f32arr &xn, const py::list &experts) {
    check_size(xn.ndim() == 2 && xn.shape(0) > 0 && py::len(experts) > 0, "xn [T, H] and at least one expert");
    const int I = (int)experts[0].cast<py::tuple>()[0].cast<py::tuple>()[4].cast<int>();
    return {(int)xn.shape(0), (int)xn.shape(1), I, (int)py::len(experts), {}, {}};
}
static void read_experts(OpCall &c, const py::list &experts, bool int8_act, bool scale_bf16, ExpertList &l) {
    l.mats.resize((size_t)3 * l.n);
    for (int j = 0; j < l.n; j++) {
        py::tuple e = experts[j].cast<py::tuple>();
        check_size(e.size() == 4, "an expert is (gate, up, down, tok)");
        l.mats[3 * j] = expert_mat(c, e[0], l.I, l.H, int8_act, scale_bf16);
        l.mats[3 * j + 1] = expert_mat(c, e[1], l.I, l.H, int8_act, scale_bf16);
        l.mats[3 * j + 2] = expert_mat(c, e[2], l.H, l.I, int8_act, scale_bf16);
        l.toks.push_back(e[3].cast<i32arr>());
        const i32arr &tok = l.toks.back();
        check_size(tok.size() >= 1 && tok.size() <= l.T, "an expert has 1 to T tokens");
        for (py::ssize_t i = 0; i < tok.size(); i++)
            check_size(tok.data()[i] >= 0 && tok.data()[i] < l.T, "a token of an expert out of range");
    }
}

static void bind_op_tests(py::module_ &m) {
    const auto kw_backend = py::arg("backend") = "cpu";
    // scale_bf16: the scales and biases (uint16 arrays) hold bfloat16 bits, else float16
    m.def("op_matmul", [](int dtype, py::array data, py::object scales, py::object biases, int rows, int cols, int gs,
                          f32arr x, bool int8_act, bool scale_bf16, const std::string &backend) {
        check_size(cols > 0 && x.size() % cols == 0, "x is not [T, cols]");
        const int T = (int)(x.size() / cols);
        OpCall c(backend);
        const fm_mat w = c.mat(dtype, data, scales, biases, rows, cols, gs, int8_act, scale_bf16, FM_MEM_DENSE);
        float *y = c.zeros((size_t)T * rows);
        RUN_OP(c, matmul, &w, c.in(x), T, y);
        return c.out(f32arr({T, rows}), y);
    }, py::arg("dtype"), py::arg("data"), py::arg("scales"), py::arg("biases"), py::arg("rows"), py::arg("cols"),
       py::arg("gs"), py::arg("x"), py::arg("int8_act") = false, py::kw_only(), py::arg("scale_bf16") = false,
       kw_backend);
    m.def("op_embed", &run_embed, py::arg("dtype"), py::arg("data"), py::arg("scales"), py::arg("biases"),
          py::arg("rows"), py::arg("cols"), py::arg("gs"), py::arg("ids"), py::kw_only(), py::arg("scale_bf16") = false,
          kw_backend);
    m.def("op_get_row", [](int dtype, py::array data, py::object scales, py::object biases, int rows, int cols, int gs,
                           int r, bool scale_bf16, const std::string &backend) {  // embed with one id: [cols]
        i32arr ids(1);
        ids.mutable_data()[0] = r;
        return run_embed(dtype, data, scales, biases, rows, cols, gs, ids, scale_bf16, backend).attr("reshape")(cols);
    }, py::arg("dtype"), py::arg("data"), py::arg("scales"), py::arg("biases"), py::arg("rows"), py::arg("cols"),
       py::arg("gs"), py::arg("r"), py::kw_only(), py::arg("scale_bf16") = false, kw_backend);
    m.def("op_rmsnorm", [](f32arr x, f32arr w, float eps, bool zc, const std::string &backend) {  // x [T, n], w [n]
        const int n = (int)w.size();
        check_size(n > 0 && x.size() % n == 0, "x is not [T, n]");
        const int T = (int)(x.size() / n);
        OpCall c(backend);
        float *y = c.zeros(x.size());
        RUN_OP(c, rmsnorm, y, c.in(x), c.in(w), T, n, eps, zc);
        return c.out(f32arr({T, n}), y);
    }, py::arg("x"), py::arg("w"), py::arg("eps"), py::arg("zero_centered"), py::kw_only(), kw_backend);
    m.def("op_l2norm", [](f32arr x, float eps, float scale, const std::string &backend) {  // per row of the last axis
        const int n = (int)x.shape(x.ndim() - 1);
        OpCall c(backend);
        float *y = c.in(x);
        RUN_OP(c, l2norm, y, (int)(x.size() / n), n, eps, scale);
        return c.out(like(x), y);
    }, py::arg("x"), py::arg("eps"), py::arg("scale"), py::kw_only(), kw_backend);
    m.def("op_rope", [](f32arr x, int rot_dim, int pos0, float theta, const std::string &backend) {  // x [T, heads, hd]
        check_size(x.ndim() == 3 && rot_dim <= x.shape(2), "x is not [T, heads, head_dim >= rot_dim]");
        OpCall c(backend);
        float *y = c.in(x);
        RUN_OP(c, rope, y, (int)x.shape(0), (int)x.shape(1), (int)x.shape(2), rot_dim, pos0, theta);
        return c.out(like(x), y);
    }, py::arg("x"), py::arg("rot_dim"), py::arg("pos0"), py::arg("theta"), py::kw_only(), kw_backend);
    m.def("op_silu_mul", [](f32arr gate, f32arr up, const std::string &backend) {  // silu(gate) * up
        check_size(gate.size() == up.size(), "gate and up differ in size");
        OpCall c(backend);
        float *y = c.zeros(gate.size());
        RUN_OP(c, silu_mul, y, c.in(gate), c.in(up), 1, (int)gate.size());
        return c.out(like(gate), y);
    }, py::arg("gate"), py::arg("up"), py::kw_only(), kw_backend);
    m.def("op_sigmoid_mul", [](f32arr gate, f32arr x, const std::string &backend) {  // x * sigmoid(gate)
        check_size(gate.size() == x.size(), "gate and x differ in size");
        OpCall c(backend);
        float *y = c.zeros(x.size());
        RUN_OP(c, sigmoid_mul, y, c.in(gate), c.in(x), 1, (int)x.size());
        return c.out(like(x), y);
    }, py::arg("gate"), py::arg("x"), py::kw_only(), kw_backend);
    m.def("op_add", [](f32arr x, f32arr y, const std::string &backend) {  // x + y
        check_size(x.size() == y.size(), "x and y differ in size");
        OpCall c(backend);
        float *out = c.in(x);
        RUN_OP(c, add, out, c.in(y), (size_t)x.size());
        return c.out(like(x), out);
    }, py::arg("x"), py::arg("y"), py::kw_only(), kw_backend);
    m.def("op_split_q_gate", [](f32arr q2, const std::string &backend) {  // q2 [T, nh, 2·hd] -> q, gate [T, nh, hd]
        check_size(q2.ndim() == 3 && q2.shape(2) % 2 == 0, "q2 is not [T, nh, 2·hd]");
        const int T = (int)q2.shape(0), nh = (int)q2.shape(1), hd = (int)q2.shape(2) / 2;
        OpCall c(backend);
        float *q = c.zeros(q2.size() / 2), *gate = c.zeros(q2.size() / 2);
        RUN_OP(c, split_q_gate, q, gate, c.in(q2), T, nh, hd);
        return py::make_tuple(c.out(f32arr({T, nh, hd}), q), c.out(f32arr({T, nh, hd}), gate));
    }, py::arg("q2"), py::kw_only(), kw_backend);
    m.def("op_kv_write", [](f32arr cache, f32arr src, int pos0, const std::string &backend) {  // [ctx, row], [T, row]
        check_size(cache.ndim() == 2 && src.ndim() == 2 && cache.shape(1) == src.shape(1),
                   "cache [ctx, row], src [T, row]");
        check_size(pos0 >= 0 && pos0 + src.shape(0) <= cache.shape(0), "rows [pos0, pos0 + T) are not in the cache");
        OpCall c(backend);
        float *kc = c.in(cache);
        RUN_OP(c, kv_write, kc, c.in(src), pos0, (int)src.shape(0), (int)src.shape(1));
        return c.out(like(cache), kc);
    }, py::arg("cache"), py::arg("src"), py::arg("pos0"), py::kw_only(), kw_backend);
    m.def("op_attention", [](f32arr q, f32arr kc, f32arr vc, int pos0, float scale, const std::string &backend) {
        // q [T, nh, hd]; k, v cache [ctx, nkv, hd]
        check_size(q.ndim() == 3 && kc.ndim() == 3 && vc.ndim() == 3, "q, k_cache, v_cache are 3-D");
        const int T = (int)q.shape(0), nh = (int)q.shape(1), hd = (int)q.shape(2), nkv = (int)kc.shape(1);
        if (kc.shape(0) < pos0 + T) throw py::value_error("cache shorter than pos0 + T");
        OpCall c(backend);
        float *y = c.zeros(q.size());
        RUN_OP(c, attention, y, c.in(q), c.in(kc), c.in(vc), T, pos0, nh, nkv, hd, scale);
        return c.out(f32arr({T, nh, hd}), y);
    }, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("pos0"), py::arg("scale"), py::kw_only(),
       kw_backend);
    m.def("op_conv1d_silu", [](f32arr x, f32arr state, f32arr w, const std::string &backend) {
        // x [T, C], state [K-1, C], w [C, K] -> out [T, C], the new state
        const int T = (int)x.shape(0), C = (int)x.shape(1), K = (int)w.shape(1);
        check_size(state.size() == (py::ssize_t)(K - 1) * C && w.size() == (py::ssize_t)C * K,
                   "state [K-1, C], w [C, K]");
        OpCall c(backend);
        float *y = c.zeros(x.size()), *st = c.in(state);
        RUN_OP(c, conv1d_silu, y, c.in(x), st, c.in(w), T, C, K);
        return py::make_tuple(c.out(f32arr({T, C}), y), c.out(like(state), st));
    }, py::arg("x"), py::arg("state"), py::arg("w"), py::kw_only(), kw_backend);
    m.def("op_deltanet_split", [](f32arr conv, int kd, int vd, const std::string &backend) {  // [T, 2·kd + vd]
        check_size(conv.ndim() == 2 && conv.shape(1) == 2 * kd + vd, "conv is not [T, 2·kd + vd]");
        const int T = (int)conv.shape(0);
        OpCall c(backend);
        float *q = c.zeros((size_t)T * kd), *k = c.zeros((size_t)T * kd), *v = c.zeros((size_t)T * vd);
        RUN_OP(c, deltanet_split, q, k, v, c.in(conv), T, kd, vd);
        return py::make_tuple(c.out(f32arr({T, kd}), q), c.out(f32arr({T, kd}), k), c.out(f32arr({T, vd}), v));
    }, py::arg("conv"), py::arg("kd"), py::arg("vd"), py::kw_only(), kw_backend);
    m.def("op_deltanet_gates", [](f32arr b, f32arr a, f32arr A_log, f32arr dt_bias, const std::string &backend) {
        // b, a [T, Hv]; A_log, dt_bias [Hv] -> beta, g [T, Hv]
        check_size(b.ndim() == 2 && a.ndim() == 2 && a.shape(0) == b.shape(0) && a.shape(1) == b.shape(1) &&
                   A_log.size() == b.shape(1) && dt_bias.size() == b.shape(1), "b, a [T, Hv]; A_log, dt_bias [Hv]");
        OpCall c(backend);
        float *beta = c.in(b), *g = c.in(a);
        RUN_OP(c, deltanet_gates, beta, g, c.in(A_log), c.in(dt_bias), (int)b.shape(0), (int)b.shape(1));
        return py::make_tuple(c.out(like(b), beta), c.out(like(a), g));
    }, py::arg("b"), py::arg("a"), py::arg("A_log"), py::arg("dt_bias"), py::kw_only(), kw_backend);
    m.def("op_gated_delta_auto", [](f32arr q, f32arr k, f32arr v, f32arr g, f32arr beta, f32arr S, int pos0,
                                    const std::string &backend) {  // the interface's gated_delta: it picks the form
        const int T = (int)q.shape(0), Hk = (int)q.shape(1), dk = (int)q.shape(2), Hv = (int)v.shape(1),
                  dv = (int)v.shape(2);
        OpCall c(backend);
        float *y = c.zeros((size_t)T * Hv * dv), *s2 = c.in(S);
        RUN_OP(c, gated_delta, y, s2, c.in(q), c.in(k), c.in(v), c.in(g), c.in(beta), T, pos0, Hk, Hv, dk, dv);
        return py::make_tuple(c.out(f32arr({T, Hv, dv}), y), c.out(like(S), s2));
    }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("g"), py::arg("beta"), py::arg("S"), py::kw_only(),
       py::arg("pos0") = 0, kw_backend);
    // CPU kernel entry points, not through a backend: the recurrent and the chunked form of the gated delta
    // rule (fm_cpu_gated_delta, fm_cpu_gated_delta_chunk), tested each against the reference.
    m.def("op_gated_delta", [](f32arr q, f32arr k, f32arr v, f32arr g, f32arr beta, f32arr S) {
        const int T = (int)q.shape(0), Hk = (int)q.shape(1), dk = (int)q.shape(2), Hv = (int)v.shape(1),
                  dv = (int)v.shape(2);
        f32arr y({T, Hv, dv});
        f32arr s2 = copy(S);
        fm_cpu_gated_delta(y.mutable_data(), s2.mutable_data(), q.data(), k.data(), v.data(), g.data(), beta.data(),
                          T, Hk, Hv, dk, dv);
        return py::make_tuple(y, s2);
    });
    m.def("op_gated_delta_chunk", [](f32arr q, f32arr k, f32arr v, f32arr g, f32arr beta, f32arr S, int chunk,
                                     int pos0) {
        const int T = (int)q.shape(0), Hk = (int)q.shape(1), dk = (int)q.shape(2), Hv = (int)v.shape(1),
                  dv = (int)v.shape(2);
        f32arr y({T, Hv, dv});
        f32arr s2 = copy(S);
        fm_cpu_gated_delta_chunk(y.mutable_data(), s2.mutable_data(), q.data(), k.data(), v.data(), g.data(),
                                beta.data(), T, Hk, Hv, dk, dv, chunk, pos0);
        return py::make_tuple(y, s2);
    }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("g"), py::arg("beta"), py::arg("S"), py::arg("chunk"),
       py::arg("pos0") = 0);
    m.def("op_route", [](f32arr logits, int k, bool norm, const std::string &backend) {
        // logits [T, E] -> top-k indices and weights [T, k]
        check_size(logits.ndim() == 2, "logits are not [T, E]");
        const int T = (int)logits.shape(0), E = (int)logits.shape(1);
        if (k < 1 || k > E) throw py::value_error("k out of range");
        OpCall c(backend);
        py::array_t<int32_t> idx({T, k});
        f32arr w({T, k});
        RUN_OP(c, route, c.in(logits), T, E, k, norm, idx.mutable_data(), w.mutable_data());  // to the host
        c.sync();
        return py::make_tuple(idx, w);
    }, py::arg("logits"), py::arg("k"), py::arg("norm"), py::kw_only(), kw_backend);
    m.def("op_topk_softmax", [](f32arr logits, int k, bool norm, const std::string &backend) {  // route, T = 1
        const int n = (int)logits.size();
        if (k < 1 || k > n) throw py::value_error("k out of range");
        OpCall c(backend);
        py::array_t<int32_t> idx(k);
        f32arr w(k);
        RUN_OP(c, route, c.in(logits), 1, n, k, norm, idx.mutable_data(), w.mutable_data());
        c.sync();
        return py::make_tuple(idx, w);
    }, py::arg("logits"), py::arg("k"), py::arg("norm"), py::kw_only(), kw_backend);
    m.def("op_argmax", [](f32arr x, const std::string &backend) {  // the greedy token of x [n]
        const int n = (int)x.size();
        check_size(n > 0, "x is empty");
        fm_config cfg = {};
        cfg.vocab_size = n; /* an instance for a vocabulary of n: argmax's scratch */
        const fm_backend_params p = {&cfg, 1, 0, 0};
        OpCall c(backend, p);
        int32_t out = -1;
        RUN_OP(c, argmax, &out, c.in(x), n);
        c.sync();
        return py::array_t<int32_t>(py::ssize_t(1), &out);
    }, py::arg("x"), py::kw_only(), kw_backend);
    m.def("op_gate_rows", [](f32arr x, f32arr g, const std::string &backend) {  // x [T, n] * sigmoid(g [T])
        check_size(x.ndim() == 2 && g.size() == x.shape(0), "x [T, n], g [T]");
        OpCall c(backend);
        float *y = c.in(x);
        RUN_OP(c, gate_rows, y, c.in(g), (int)x.shape(0), (int)x.shape(1));
        return c.out(like(x), y);
    }, py::arg("x"), py::arg("g"), py::kw_only(), kw_backend);
    m.def("op_moe_combine", [](f32arr out, f32arr ye, i32arr row, f32arr weights, const std::string &backend) {
        // out [T, h] + Σ_j weights[t, j] · ye[row[t, j]]; row, weights [T, k]
        check_size(out.ndim() == 2 && ye.ndim() == 2 && out.shape(1) == ye.shape(1), "out [T, h], ye [R, h]");
        check_size(row.ndim() == 2 && row.shape(0) == out.shape(0) && weights.size() == row.size(),
                   "row, weights [T, k]");
        for (py::ssize_t i = 0; i < row.size(); i++) check_size(row.data()[i] >= 0 && row.data()[i] < ye.shape(0),
                                                               "a row of ye out of range");
        OpCall c(backend);
        float *y = c.in(out);
        RUN_OP(c, moe_combine, y, c.in(ye), row.data(), weights.data(), (int)out.shape(0), (int)row.shape(1),
               (int)out.shape(1));  // row, weights: host
        return c.out(like(out), y);
    }, py::arg("out"), py::arg("ye"), py::arg("row"), py::arg("weights"), py::kw_only(), kw_backend);
    // Routed experts: experts is a list of (gate, up, down, tok), each matrix a tuple (dtype, data, scales,
    // biases, rows, cols, gs), tok int32 [n] the rows of xn [T, H] routed to it. Expert j's rows of the result
    // ye [Σ n, H] follow expert j - 1's. The call opens an instance of its own, for a chunk of T tokens of
    // len(experts) experts of these shapes (the CPU sizes its expert scratch by them, and its lanes by the
    // thread count at the call: _core.set_threads first).
    // int8_act: the quantized matrices on int8 activations (a numerics option, cpu/cpu.h)
    m.def("op_experts", [](f32arr xn, py::list experts, bool int8_act, bool scale_bf16, const std::string &backend) {
        ExpertList l = expert_dims(xn, experts);
        const int T = l.T, H = l.H, n_work = l.n;
        fm_config cfg = {};
        cfg.hidden_size = H;
        cfg.moe_intermediate_size = l.I;
        cfg.num_experts = n_work;
        const fm_backend_params p = {&cfg, T, T, 0};
        OpCall c(backend, p);
        read_experts(c, experts, int8_act, scale_bf16, l);
        std::vector<fm_expert_work> work((size_t)n_work);
        int rows = 0;
        for (int j = 0; j < n_work; j++) {
            const fm_mat *m3 = &l.mats[3 * j];
            work[j] = {m3, m3 + 1, m3 + 2, l.toks[j].data(), (int)l.toks[j].size(), rows, -1};
            rows += (int)l.toks[j].size();
        }
        float *ye = c.zeros((size_t)rows * H);
        RUN_OP(c, experts, work.data(), n_work, c.in(xn), ye, H);
        return c.out(f32arr({rows, H}), ye);
    }, py::arg("xn"), py::arg("experts"), py::kw_only(), py::arg("int8_act") = false, py::arg("scale_bf16") = false,
       kw_backend);
#ifdef FLASHMOE_CUDA
    // op_experts' call on the host's replay of the CUDA kernels (cuda/host_ffn.c), int8 activations: isa 0 the
    // portable C, 1 AVX2 where the CPU has it. None where host_ffn declines the matrices.
    m.def("op_host_experts", [](f32arr xn, py::list experts, bool scale_bf16, int isa) -> py::object {
        ExpertList l = expert_dims(xn, experts);
        const int H = l.H, n_work = l.n;
        OpCall c("cpu");
        read_experts(c, experts, true, scale_bf16, l);
        std::vector<fmh_job> jobs((size_t)n_work);
        size_t rows = 0;
        for (int j = 0; j < n_work; j++) {
            const fm_mat *m3 = &l.mats[3 * j];
            if (!fmh_takes(m3, m3 + 1, m3 + 2)) return py::none();
            jobs[j] = {m3, m3 + 1, m3 + 2, l.toks[j].data(), (int)l.toks[j].size(), nullptr};
            rows += (size_t)l.toks[j].size();
        }
        f32arr ye({(py::ssize_t)rows, (py::ssize_t)H});
        float *y = ye.mutable_data();
        for (int j = 0; j < n_work; j++) jobs[j].out = y, y += (size_t)jobs[j].n * H;
        const float *x = xn.data();
        int st;
        {
            py::gil_scoped_release nogil;
            st = fmh_experts(jobs.data(), n_work, x, H, isa);
        }
        if (st) throw std::bad_alloc();
        return std::move(ye);
    }, py::arg("xn"), py::arg("experts"), py::kw_only(), py::arg("scale_bf16") = false, py::arg("isa") = 1);
#endif
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
        .def("forward", &Model::forward, py::arg("tokens"), py::arg("all_logits") = true,
             py::arg("progress") = py::none())
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
    bind_op_tests(m);
    m.attr("F32") = (int)FM_F32;
    m.attr("BF16") = (int)FM_BF16;
    m.attr("Q8") = (int)FM_Q8;
    m.attr("Q4") = (int)FM_Q4;
    m.attr("ARCH_QWEN3_5_MOE") = (int)FM_ARCH_QWEN3_5_MOE;
    m.attr("ARCH_QWEN3_NEXT") = (int)FM_ARCH_QWEN3_NEXT;
}
