/*
 * backend.c — the registry of the backends built into this library. The CUDA and Metal backends join
 * it when CMake builds them (FLASHMOE_CUDA, FLASHMOE_METAL); until then asking for one is an error that
 * says it is not built.
 */
#include <stdlib.h>
#include <string.h>

#include "../core/util.h"
#include "backend.h"

static const char *const KNOWN[] = {"cpu", "cuda", "metal"};

#ifdef FLASHMOE_METAL
const char *fm_backend_names(void) { return "cpu,metal"; }
#else
const char *fm_backend_names(void) { return "cpu"; }
#endif

const fm_backend_ops *fm_backend_find(const char *name) {
    if (!name || !*name || strcmp(name, "cpu") == 0) return fm_backend_cpu();
#ifdef FLASHMOE_METAL
    if (strcmp(name, "metal") == 0) return fm_backend_metal();
#endif
    for (size_t i = 0; i < sizeof KNOWN / sizeof KNOWN[0]; i++)
        if (strcmp(name, KNOWN[i]) == 0) {
            fm_fail(FM_ERR_INVALID, "backend '%s' is not built into this flashmoe (built: %s)", name,
                    fm_backend_names());
            return NULL;
        }
    fm_fail(FM_ERR_INVALID, "unknown backend '%s' (known: cpu, cuda, metal; built: %s)", name, fm_backend_names());
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
