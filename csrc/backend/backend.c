/*
 * backend.c — the registry of the backends built into this library: the CPU always, Metal where CMake
 * builds it (FLASHMOE_METAL: Apple Silicon by default). CUDA is not written yet: asking for it is an
 * error that says it is not built.
 *
 * The default backend (name NULL, "" or "auto") is Metal on an Apple build with Metal when this machine
 * has a Metal device and the Metal table fills in every op; the CPU otherwise. (While the Metal backend
 * lacks ops, the default stays the CPU; `backend="metal"` asks for it by name.)
 */
#include <stdlib.h>
#include <string.h>

#include "../core/util.h"
#include "backend.h"
#if defined(FLASHMOE_METAL) && defined(__APPLE__)
#include "metal/metal_device.h" /* fm_mtl_available */
#endif

static const char *const KNOWN[] = {"cpu", "cuda", "metal"};

const char *fm_backend_names(void) {
#ifdef FLASHMOE_METAL
    return "cpu,metal";
#else
    return "cpu";
#endif
}

#if defined(FLASHMOE_METAL) && defined(__APPLE__)
/* Whether a table fills in every op of backend.h (the order of its declaration; tests/test_backend.py
 * checks that this list names every field). */
static int complete(const fm_backend_ops *o) {
    const void *const ops[] = {
        (const void *)o->workspace_bytes, (const void *)o->memory_limit, (const void *)o->create,
        (const void *)o->destroy, (const void *)o->alloc, (const void *)o->free, (const void *)o->fill_zero,
        (const void *)o->copy, (const void *)o->to_host, (const void *)o->from_host,
        (const void *)o->host_view, (const void *)o->wrap_host, (const void *)o->unwrap_host,
        (const void *)o->record, (const void *)o->wait, (const void *)o->finish, (const void *)o->matmul,
        (const void *)o->embed, (const void *)o->rmsnorm, (const void *)o->l2norm, (const void *)o->rope,
        (const void *)o->silu_mul, (const void *)o->sigmoid_mul, (const void *)o->add,
        (const void *)o->split_q_gate, (const void *)o->kv_write, (const void *)o->attention,
        (const void *)o->conv1d_silu, (const void *)o->deltanet_split, (const void *)o->deltanet_gates,
        (const void *)o->gated_delta, (const void *)o->route, (const void *)o->gate_rows,
        (const void *)o->experts, (const void *)o->moe_combine,
    };
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++)
        if (!ops[i]) return 0;
    return 1;
}
#endif

static const fm_backend_ops *default_backend(void) {
#if defined(FLASHMOE_METAL) && defined(__APPLE__)
    if (complete(fm_backend_metal()) && fm_mtl_available()) return fm_backend_metal();
#endif
    return fm_backend_cpu();
}

const fm_backend_ops *fm_backend_find(const char *name) {
    if (!name || !*name || strcmp(name, "auto") == 0) return default_backend();
    if (strcmp(name, "cpu") == 0) return fm_backend_cpu();
#ifdef FLASHMOE_METAL
    if (strcmp(name, "metal") == 0) return fm_backend_metal();
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
