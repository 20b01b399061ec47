/*
 * backend.c — the registry of the backends built into this library: the CPU always, Metal where CMake
 * builds it (FLASHMOE_METAL: Apple Silicon by default), CUDA where it builds it (FLASHMOE_CUDA).
 *
 * The default backend (name NULL, "" or "auto") is the environment's FLASHMOE_BACKEND where set; else Metal
 * on an Apple build with Metal when this machine has a Metal device and the Metal table fills in every op;
 * else CUDA on a CUDA build when this machine has a CUDA device; the CPU otherwise. (While the Metal backend
 * lacks ops, the default stays the CPU; `backend="metal"` asks for it by name.)
 */
#include <stdlib.h>
#include <string.h>

#include "../core/util.h"
#include "backend.h"
#if defined(FLASHMOE_METAL) && defined(__APPLE__)
#include "metal/metal_device.h" /* fm_mtl_available */
#endif
#ifdef FLASHMOE_CUDA
int fm_cuda_available(void); /* cuda/cuda_ops.cu */
#endif

static const char *const KNOWN[] = {"cpu", "cuda", "metal"};

const char *fm_backend_names(void) {
#if defined(FLASHMOE_METAL) && defined(FLASHMOE_CUDA)
    return "cpu,cuda,metal";
#elif defined(FLASHMOE_METAL)
    return "cpu,metal";
#elif defined(FLASHMOE_CUDA)
    return "cpu,cuda";
#else
    return "cpu";
#endif
}

int fm_backend_has_device(const char *name) {
#ifdef FLASHMOE_CUDA
    if (strcmp(name, "cuda") == 0) return fm_cuda_available();
#endif
#if defined(FLASHMOE_METAL) && defined(__APPLE__)
    if (strcmp(name, "metal") == 0) return fm_mtl_available();
#endif
    return fm_backend_find(name) != NULL; /* the CPU; the emulated Metal device */
}

/* The first op of backend.h a table leaves out (in the order of its declaration), NULL when it fills in
 * every one but the optional ops (tests/test_layering.py checks that this list names every other field). */
const char *fm_backend_missing_op(const fm_backend_ops *o) {
#define OP(f) {(const void *)o->f, #f}
    const struct { const void *fn; const char *name; } ops[] = {
        OP(workspace_bytes), OP(memory_limit), OP(create), OP(destroy), OP(alloc), OP(free), OP(fill_zero),
        OP(copy), OP(to_host), OP(from_host), OP(host_view), OP(wrap_host), OP(unwrap_host), OP(record),
        OP(wait), OP(finish), OP(device_stats), OP(matmul), OP(embed), OP(rmsnorm), OP(l2norm), OP(rope), OP(silu_mul),
        OP(sigmoid_mul), OP(add), OP(split_q_gate), OP(kv_write), OP(attention), OP(conv1d_silu),
        OP(deltanet_split), OP(deltanet_gates), OP(gated_delta), OP(route), OP(gate_rows), OP(experts),
        OP(moe_combine),
    };
#undef OP
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++)
        if (!ops[i].fn) return ops[i].name;
    return NULL;
}

static const fm_backend_ops *default_backend(void) {
    /* FLASHMOE_BACKEND: the user's choice for everything that names none (e.g. cpu on a Mac whose GPU is
     * not to be used, as CI's hosted runners: their paravirtual GPU is no compute target, METAL.md) */
    const char *env = getenv("FLASHMOE_BACKEND");
    if (env && *env && strcmp(env, "auto") != 0) return fm_backend_find(env);
#if defined(FLASHMOE_METAL) && defined(__APPLE__)
    if (!fm_backend_missing_op(fm_backend_metal()) && fm_mtl_available()) return fm_backend_metal();
#endif
#ifdef FLASHMOE_CUDA
    if (fm_cuda_available()) return fm_backend_cuda();
#endif
    return fm_backend_cpu();
}

const fm_backend_ops *fm_backend_find(const char *name) {
    if (!name || !*name || strcmp(name, "auto") == 0) return default_backend();
    if (strcmp(name, "cpu") == 0) return fm_backend_cpu();
#ifdef FLASHMOE_METAL
    if (strcmp(name, "metal") == 0) return fm_backend_metal();
#endif
#ifdef FLASHMOE_CUDA
    if (strcmp(name, "cuda") == 0) return fm_backend_cuda();
#endif
    for (size_t i = 0; i < sizeof KNOWN / sizeof KNOWN[0]; i++)
        if (strcmp(name, KNOWN[i]) == 0) {
            fm_fail(FM_ERR_INVALID, "backend '%s' is not built into this flashmoe (built: %s)", name,
                    fm_backend_names());
            return NULL;
        }
    fm_fail(FM_ERR_INVALID, "unknown backend '%s' (known: auto, cpu, cuda, metal; built: %s)", name,
            fm_backend_names());
    return NULL;
}

fm_status fm_backend_open(const fm_backend_ops *ops, const fm_backend_params *p, fm_backend *out) {
    out->op = ops;
    out->ctx = NULL;
    return ops->create(p, &out->ctx);
}

void fm_backend_close(fm_backend *b) {
    if (b->op) b->op->destroy(b->ctx);
    b->op = NULL;
    b->ctx = NULL;
}
