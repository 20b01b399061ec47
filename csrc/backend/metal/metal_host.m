/*
 * metal_host.m — the device layer of metal_device.h on Metal itself (Objective-C, ARC): one MTLDevice, one
 * command queue, a pipeline per kernel compiled at open from the shader source embedded in the library
 * (fm_mtl_shader_sources, generated at build time by embed_shaders.py from metal/: one library per .metal
 * file), shared memory wrapped without copy, one serial compute encoder per command buffer.
 *
 * Memory: every allocation and every wrapped range is one MTLBuffer over host memory (16 KiB pages,
 * MTLResourceStorageModeShared, newBufferWithBytesNoCopy), kept in a table sorted by address so that
 * fm_mtl_set_buffer finds the buffer and offset of any address inside one (binary search: metal_ranges.h,
 * plain C, tested on Linux). An address in no buffer is an error that names it; so is a buffer longer than
 * the device's maxBufferLength (no splitting into overlapping views as llama.cpp does: the allocation
 * fails and says so).
 *
 * Errors: the encoding calls return nothing. A binding or dispatch that cannot be encoded (an address in
 * no buffer, an index or size past Metal's limits, more threads than the pipeline allows) is recorded, the
 * dispatch it belongs to is left out, the command buffer holding it is not sent, and the error travels
 * with the serial that fm_mtl_commit hands out for it; a command buffer that the GPU ends in MTLCommandBufferStatusError is recorded by its completed
 * handler. fm_mtl_wait reports the first failure among the serials it waits for, once (fm_fail).
 * Nothing here makes the GPU wait on the CPU: the host only waits for command buffers it has committed.
 *
 * Threads: the encoding and memory calls come from one thread (the compute thread of the backend); the
 * completed handlers run on Metal's threads and touch only the in-flight list, under its mutex.
 *
 * Never run here (no Mac): checked only by a syntax pass against declarations copied from Apple's
 * documentation (tests/metal_objc/, tests/test_metal_host.py) and by zig's cross compile for macOS
 * (.ci/cross_compile.py).
 */
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "../../core/util.h"
#include "metal_device.h"
#include "metal_ranges.h"

/* Generated at build time (csrc/backend/metal/embed_shaders.py): one translation unit per .metal file of
 * metal/ (fm_metal_args.h in front of it), compiled one library each, as the emulator and CI compile them. */
extern const int fm_mtl_shader_count;
extern const char *const fm_mtl_shader_names[];
extern const char *const fm_mtl_shader_sources[];

enum {
    FM_MTL_PAGE = 16384,          /* Apple Silicon's page: newBufferWithBytesNoCopy's alignment and length */
    FM_MTL_BUFFER_SLOTS = 31,     /* [[buffer(0..30)]]: Metal's buffer argument table */
    FM_MTL_MAX_SET_BYTES = 4096,  /* setBytes: Apple's limit for inline constant data */
    FM_MTL_MAX_TG_MEMORY = 32768, /* threadgroup memory of Apple GPUs */
};

/* fm_mtl_range.owned: how the memory of a range came */
enum { WRAPPED = 0, OWNED_MMAP = 1, OWNED_HEAP = 2 };

/* A serial handed out by fm_mtl_commit: a committed command buffer, or only an encoding error. */
typedef struct mtl_flight {
    uint64_t serial;
    void *cb;        /* id<MTLCommandBuffer>, retained; NULL when nothing was committed */
    int done;        /* the command buffer has completed (its handler ran) */
    fm_status st;    /* FM_OK, or why it failed ... */
    char *why;       /* ... in words (malloc'd) */
    struct mtl_flight *next;
} mtl_flight;

struct fm_mtl {
    id<MTLDevice> dev;
    id<MTLCommandQueue> queue;
    id<MTLComputePipelineState> pso[FM_K_COUNT];
    NSUInteger max_buffer; /* maxBufferLength */

    fm_mtl_ranges ranges; /* every buffer; .handle: its id<MTLBuffer>, retained (__bridge_retained) */

    id<MTLCommandBuffer> cb; /* the open command buffer and its encoder; nil when none is open */
    id<MTLComputeCommandEncoder> enc;
    int skip_dispatch;       /* a binding of the next dispatch failed: leave the dispatch out */
    fm_status enc_st;        /* the first encoding error since the last commit ... */
    char *enc_why;           /* ... in words (malloc'd) */

    pthread_mutex_t lock;    /* guards the in-flight list (the completed handlers run on Metal's threads) */
    pthread_cond_t cond;
    mtl_flight *head, *tail; /* in serial order */
    uint64_t serial;         /* the last serial handed out */
};

static const char *const KERNEL_NAMES[FM_K_COUNT] = {
#define FM_MTL_HOST_NAME(id, name) name,
    FM_MTL_KERNELS(FM_MTL_HOST_NAME)
#undef FM_MTL_HOST_NAME
};

static char *dup_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *dup_printf(const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return strdup(buf);
}

static void release_object(void *p) {
    id o = (__bridge_transfer id)p; /* ARC releases it at the end of this scope */
    (void)o;
}

static const char *describe(NSError *e) {
    const char *s = e ? e.localizedDescription.UTF8String : NULL;
    return s ? s : "no description";
}

/* ---------------------------------------------------------------- the device */

/* The system's default device, probed once: whether there is one, and what it may hold resident. */
static pthread_once_t g_probe_once = PTHREAD_ONCE_INIT;
static int g_available;
static uint64_t g_working_set;
static void probe(void) {
    @autoreleasepool {
        id<MTLDevice> dev = MTLCreateSystemDefaultDevice();
        g_available = dev != nil;
        g_working_set = dev ? dev.recommendedMaxWorkingSetSize : 0;
    }
}
int fm_mtl_available(void) {
    pthread_once(&g_probe_once, probe);
    return g_available;
}

fm_status fm_mtl_open(fm_mtl **out) {
    *out = NULL;
    @autoreleasepool {
        id<MTLDevice> dev = MTLCreateSystemDefaultDevice();
        if (!dev) return fm_fail(FM_ERR_INVALID, "metal: no Metal device here (MTLCreateSystemDefaultDevice returned nil)");

        /* The source level: MSL 3.1, what CI compiles every shader with (xcrun metal -std=metal3.1) and
         * what macOS 14, the wheel's deployment target, supports. A newer OS compiles 3.1 source as well, so
         * the level is never above what the running OS has (a metallib built for a newer MSL fails to load
         * on an older macOS: llama.cpp#6370); nor is it raised on newer systems, since the shaders are
         * checked against 3.1 only. Older systems are refused, naming what they lack.
         * Math: no fast math. Metal's default (fast, or relaxed on Apple GPUs from macOS 15) lets the
         * compiler assume no inf/NaN, reassociate and use approximate exp/rsqrt/divide; the kernels are
         * held to the CPU backend's results (tests/test_ops.py's tolerances, never loosened) and checked in
         * an emulator that computes IEEE fp32, and the CPU backend honours inf/NaN and does not reassociate
         * (no -ffast-math). Safe math keeps the GPU what the emulator checked. Decode is bound by memory
         * bandwidth, so the precise functions cost little; a kernel that wants a fast function names it
         * (fast::exp), as rope names precise:: today. */
        MTLCompileOptions *opts = [MTLCompileOptions new];
        if (@available(macOS 14.0, *)) {
            opts.languageVersion = MTLLanguageVersion3_1;
        } else {
            return fm_fail(FM_ERR_INVALID, "metal: the shaders need Metal Shading Language 3.1 (macOS 14 or later)");
        }
        if (@available(macOS 15.0, *)) {
            opts.mathMode = MTLMathModeSafe;
            opts.mathFloatingPointFunctions = MTLMathFloatingPointFunctionsPrecise;
        } else {
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wdeprecated-declarations" /* replaced by mathMode in macOS 15 */
            opts.fastMathEnabled = NO;
#pragma clang diagnostic pop
        }

        /* Each kernel's function, from the library of the one file that defines it. */
        id<MTLFunction> fns[FM_K_COUNT];
        for (int k = 0; k < FM_K_COUNT; k++) fns[k] = nil;
        NSError *err = nil;
        for (int i = 0; i < fm_mtl_shader_count; i++) {
            NSString *src = [NSString stringWithUTF8String:fm_mtl_shader_sources[i]];
            if (!src) return fm_fail(FM_ERR_INVALID, "metal: %s: the embedded source is not UTF-8", fm_mtl_shader_names[i]);
            err = nil;
            id<MTLLibrary> lib = [dev newLibraryWithSource:src options:opts error:&err];
            if (!lib)
                return fm_fail(FM_ERR_DEVICE, "metal: %s does not compile on %s: %s", fm_mtl_shader_names[i],
                               dev.name.UTF8String, describe(err));
            for (int k = 0; k < FM_K_COUNT; k++) {
                id<MTLFunction> fn = [lib newFunctionWithName:[NSString stringWithUTF8String:KERNEL_NAMES[k]]];
                if (fn && fns[k])
                    return fm_fail(FM_ERR_INVALID, "metal: kernel %s is defined in two shader files (one is %s)",
                                   KERNEL_NAMES[k], fm_mtl_shader_names[i]);
                if (fn) fns[k] = fn;
            }
        }
        for (int k = 0; k < FM_K_COUNT; k++)
            if (!fns[k])
                return fm_fail(FM_ERR_INVALID, "metal: no kernel function %s in the .metal files", KERNEL_NAMES[k]);

        fm_mtl *d = (fm_mtl *)calloc(1, sizeof *d);
        if (!d) return fm_fail(FM_ERR_NOMEM, "metal: out of memory");
        pthread_mutex_init(&d->lock, NULL);
        pthread_cond_init(&d->cond, NULL);
        d->dev = dev;
        d->max_buffer = dev.maxBufferLength;
        d->queue = [dev newCommandQueue];
        if (!d->queue) {
            fm_mtl_close(d);
            return fm_fail(FM_ERR_DEVICE, "metal: %s gave no command queue", dev.name.UTF8String);
        }
        for (int k = 0; k < FM_K_COUNT; k++) {
            err = nil;
            d->pso[k] = [dev newComputePipelineStateWithFunction:fns[k] error:&err];
            if (!d->pso[k]) {
                fm_mtl_close(d);
                return fm_fail(FM_ERR_DEVICE, "metal: no pipeline for kernel %s: %s", KERNEL_NAMES[k], describe(err));
            }
        }
        *out = d;
        return FM_OK;
    }
}

void fm_mtl_close(fm_mtl *d) {
    if (!d) return;
    @autoreleasepool {
        if (d->serial) fm_mtl_wait(d, d->serial); /* nothing in flight may outlive the buffers */
        if (d->enc) [d->enc endEncoding];          /* encoded but never committed: dropped */
        d->enc = nil;
        d->cb = nil;
        free(d->enc_why);
        for (size_t i = 0; i < d->ranges.n; i++) {
            const fm_mtl_range *r = &d->ranges.r[i];
            release_object(r->handle);
            if (r->owned == OWNED_MMAP) munmap((void *)r->base, r->len);
            else if (r->owned == OWNED_HEAP) free((void *)r->base);
        }
        free(d->ranges.r);
        for (int k = 0; k < FM_K_COUNT; k++) d->pso[k] = nil;
        d->queue = nil;
        d->dev = nil;
        pthread_mutex_destroy(&d->lock);
        pthread_cond_destroy(&d->cond);
        free(d);
    }
}

uint64_t fm_mtl_working_set_limit(fm_mtl *d) {
    if (d) return d->dev.recommendedMaxWorkingSetSize;
    pthread_once(&g_probe_once, probe); /* before a model opens its instance: the default device's */
    return g_working_set;
}

/* ---------------------------------------------------------------- memory */

/* Wrap [p, p + len) in an MTLBuffer and add it to the table: 0, or -1 with fm_fail set. */
static int add_range(fm_mtl *d, void *p, size_t len, int owned) {
    if (fm_mtl_ranges_overlaps(&d->ranges, (uintptr_t)p, len)) {
        fm_fail(FM_ERR_INVALID, "metal: [%p, +%zu) overlaps memory already given to the GPU", p, len);
        return -1;
    }
    if (len > d->max_buffer) {
        fm_fail(FM_ERR_NOMEM, "metal: a buffer of %zu bytes is longer than this GPU's maxBufferLength (%lu bytes); "
                "buffers are not split", len, (unsigned long)d->max_buffer);
        return -1;
    }
    if (fm_mtl_ranges_reserve(&d->ranges) != 0) {
        fm_fail(FM_ERR_NOMEM, "metal: out of memory");
        return -1;
    }
    id<MTLBuffer> buf = [d->dev newBufferWithBytesNoCopy:p length:len options:MTLResourceStorageModeShared deallocator:nil];
    if (!buf) {
        fm_fail(FM_ERR_NOMEM, "metal: newBufferWithBytesNoCopy refused %zu bytes at %p", len, p);
        return -1;
    }
    fm_mtl_ranges_insert(&d->ranges, (fm_mtl_range){(uintptr_t)p, len, (__bridge_retained void *)buf, owned});
    return 0;
}

static size_t whole_pages(size_t bytes) { return (bytes + FM_MTL_PAGE - 1) / FM_MTL_PAGE * FM_MTL_PAGE; }

void *fm_mtl_alloc(fm_mtl *d, size_t bytes) {
    @autoreleasepool {
        const size_t len = whole_pages(bytes ? bytes : 1);
        if (len < bytes) {
            fm_fail(FM_ERR_NOMEM, "metal: %zu bytes is too large", bytes);
            return NULL;
        }
        if (len > d->max_buffer) { /* before touching memory */
            fm_fail(FM_ERR_NOMEM, "metal: a buffer of %zu bytes is longer than this GPU's maxBufferLength (%lu bytes); "
                    "buffers are not split", len, (unsigned long)d->max_buffer);
            return NULL;
        }
        /* Anonymous pages come zeroed and page aligned (16 KiB on Apple Silicon), committed on first touch;
         * where the page is smaller, 16 KiB-aligned heap memory, zeroed by hand. */
        int owned = OWNED_MMAP;
        void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANON, -1, 0);
        if (p == MAP_FAILED) p = NULL;
        if (p && (uintptr_t)p % FM_MTL_PAGE) {
            munmap(p, len);
            p = NULL;
            owned = OWNED_HEAP;
            if (posix_memalign(&p, FM_MTL_PAGE, len) != 0) p = NULL;
            if (p) memset(p, 0, len);
        }
        if (!p) {
            fm_fail(FM_ERR_NOMEM, "metal: out of memory (%zu bytes)", len);
            return NULL;
        }
        if (add_range(d, p, len, owned) != 0) {
            if (owned == OWNED_MMAP) munmap(p, len);
            else free(p);
            return NULL;
        }
        return p;
    }
}

void fm_mtl_free(fm_mtl *d, void *p, size_t bytes) {
    if (!p) return;
    @autoreleasepool {
        const ptrdiff_t i = fm_mtl_ranges_at(&d->ranges, (uintptr_t)p);
        if (i < 0 || d->ranges.r[i].owned == WRAPPED || d->ranges.r[i].len != whole_pages(bytes ? bytes : 1)) {
            fm_fail(FM_ERR_INVALID, "metal: fm_mtl_free(%p, %zu): not an allocation of fm_mtl_alloc of that size", p, bytes);
            return;
        }
        const fm_mtl_range r = fm_mtl_ranges_remove(&d->ranges, (size_t)i);
        release_object(r.handle);
        if (r.owned == OWNED_MMAP) munmap(p, r.len);
        else free(p);
    }
}

int fm_mtl_wrap(fm_mtl *d, void *host, size_t bytes) {
    @autoreleasepool {
        /* The length is rounded up to whole pages, as newBufferWithBytesNoCopy wants: the page of the last
         * byte is mapped whatever the length (16 KiB is the VM page on Apple Silicon). The core wraps the
         * dense weights with their exact size (model.c), in memory that fm_alloc_weights rounds to 2 MiB. */
        if (!host || (uintptr_t)host % FM_MTL_PAGE || !bytes || whole_pages(bytes) < bytes) {
            fm_fail(FM_ERR_INVALID, "metal: wrapped host memory must start on a 16 KiB page (%p, %zu bytes)", host, bytes);
            return -1;
        }
        return add_range(d, host, whole_pages(bytes), WRAPPED);
    }
}

void fm_mtl_unwrap(fm_mtl *d, void *host, size_t bytes) {
    if (!host) return;
    @autoreleasepool {
        const ptrdiff_t i = fm_mtl_ranges_at(&d->ranges, (uintptr_t)host);
        if (i < 0 || d->ranges.r[i].owned != WRAPPED) {
            fm_fail(FM_ERR_INVALID, "metal: fm_mtl_unwrap(%p, %zu): not wrapped host memory", host, bytes);
            return;
        }
        release_object(fm_mtl_ranges_remove(&d->ranges, (size_t)i).handle);
    }
}

/* ---------------------------------------------------------------- encoding */

/* Record an encoding error (the first since the last commit is reported) and leave out the dispatch. */
static void encode_failed(fm_mtl *d, fm_status st, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void encode_failed(fm_mtl *d, fm_status st, const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fm_fail(st, "%s", buf);
    d->skip_dispatch = 1;
    if (d->enc_st == FM_OK) {
        d->enc_st = st;
        d->enc_why = strdup(buf);
    }
}

/* The open command buffer's encoder, opened on first use; 0 when Metal gives none. */
static int encoder(fm_mtl *d) {
    if (d->enc) return 1;
    d->cb = [d->queue commandBuffer];
    if (d->cb) d->enc = [d->cb computeCommandEncoderWithDispatchType:MTLDispatchTypeSerial];
    if (!d->enc) {
        d->cb = nil;
        encode_failed(d, FM_ERR_DEVICE, "metal: no command buffer or compute encoder from the queue");
        return 0;
    }
    return 1;
}

void fm_mtl_set_buffer(fm_mtl *d, int index, const void *p) {
    @autoreleasepool {
        if (!encoder(d)) return;
        if (index < 0 || index >= FM_MTL_BUFFER_SLOTS) {
            encode_failed(d, FM_ERR_INVALID, "metal: buffer index %d (Metal has 0..%d)", index, FM_MTL_BUFFER_SLOTS - 1);
            return;
        }
        if (!p) { /* nothing bound (the emulator allows it too; Metal's setBuffer takes nil) */
            [d->enc setBuffer:nil offset:0 atIndex:(NSUInteger)index];
            return;
        }
        const fm_mtl_range *r = fm_mtl_ranges_find(&d->ranges, (uintptr_t)p);
        NSUInteger offset = r ? (NSUInteger)((uintptr_t)p - r->base) : 0;
        if (!r && (r = fm_mtl_ranges_find(&d->ranges, (uintptr_t)p - 1)) != NULL)
            offset = 0; /* just past a buffer's end: an empty view (as the emulator allows), bound at its start */
        if (!r) {
            encode_failed(d, FM_ERR_INVALID, "metal: [[buffer(%d)]] = %p is in no Metal buffer (neither fm_mtl_alloc'ed "
                          "nor fm_mtl_wrap'ed)", index, p);
            return;
        }
        [d->enc setBuffer:(__bridge id<MTLBuffer>)r->handle offset:offset atIndex:(NSUInteger)index];
    }
}

void fm_mtl_set_bytes(fm_mtl *d, int index, const void *p, size_t len) {
    @autoreleasepool {
        if (!encoder(d)) return;
        if (index < 0 || index >= FM_MTL_BUFFER_SLOTS || len == 0 || len > FM_MTL_MAX_SET_BYTES) {
            encode_failed(d, FM_ERR_INVALID, "metal: setBytes of %zu bytes at index %d (at most %d bytes, index 0..%d)",
                          len, index, FM_MTL_MAX_SET_BYTES, FM_MTL_BUFFER_SLOTS - 1);
            return;
        }
        [d->enc setBytes:p length:len atIndex:(NSUInteger)index];
    }
}

void fm_mtl_dispatch(fm_mtl *d, fm_mtl_kernel k, const fm_metal_grid *g) {
    @autoreleasepool {
        if (!encoder(d)) return;
        if (d->skip_dispatch) { /* a binding of it failed (recorded): never run it on a stale binding */
            d->skip_dispatch = 0;
            return;
        }
        if ((unsigned)k >= FM_K_COUNT) {
            encode_failed(d, FM_ERR_INVALID, "metal: no kernel %d", (int)k);
            d->skip_dispatch = 0;
            return;
        }
        id<MTLComputePipelineState> pso = d->pso[k];
        const uint64_t threads = (uint64_t)g->threads[0] * g->threads[1] * g->threads[2];
        if (threads == 0 || threads > pso.maxTotalThreadsPerThreadgroup || g->tg_bytes[0] > FM_MTL_MAX_TG_MEMORY) {
            encode_failed(d, FM_ERR_INVALID, "metal: kernel %s dispatched with %" PRIu64 " threads per threadgroup "
                          "(its pipeline allows %lu) and %u bytes of threadgroup memory (at most %d)",
                          KERNEL_NAMES[k], threads, (unsigned long)pso.maxTotalThreadsPerThreadgroup,
                          (unsigned)g->tg_bytes[0], FM_MTL_MAX_TG_MEMORY);
            d->skip_dispatch = 0;
            return;
        }
        if (!g->groups[0] || !g->groups[1] || !g->groups[2]) return; /* an empty grid: nothing to run */
        [d->enc setComputePipelineState:pso];
        if (g->tg_bytes[0]) [d->enc setThreadgroupMemoryLength:g->tg_bytes[0] atIndex:0];
        [d->enc dispatchThreadgroups:MTLSizeMake(g->groups[0], g->groups[1], g->groups[2])
               threadsPerThreadgroup:MTLSizeMake(g->threads[0], g->threads[1], g->threads[2])];
    }
}

/* ---------------------------------------------------------------- command buffers */

static void append_flight(fm_mtl *d, mtl_flight *f) {
    pthread_mutex_lock(&d->lock);
    if (d->tail) d->tail->next = f;
    else d->head = f;
    d->tail = f;
    pthread_mutex_unlock(&d->lock);
}

uint64_t fm_mtl_commit(fm_mtl *d) {
    @autoreleasepool {
        if (!d->cb && d->enc_st == FM_OK) return d->serial; /* nothing encoded: nothing sent */
        mtl_flight *f = (mtl_flight *)calloc(1, sizeof *f);
        if (!f) { /* cannot track it: run it to the end here */
            if (d->enc) {
                [d->enc endEncoding];
                [d->cb commit];
                [d->cb waitUntilCompleted];
            }
            d->enc = nil;
            d->cb = nil;
            return d->serial;
        }
        f->serial = ++d->serial;
        id<MTLCommandBuffer> cb = d->cb;
        if (d->enc) [d->enc endEncoding];
        d->enc = nil;
        d->cb = nil;
        d->skip_dispatch = 0;
        if (d->enc_st != FM_OK || !cb) {
            /* An op of it was not encoded: it is not sent (its results would be wrong); the error is this
             * serial's. */
            f->st = d->enc_st != FM_OK ? d->enc_st : FM_ERR_DEVICE;
            f->why = d->enc_why ? d->enc_why : strdup("metal: nothing was encoded");
            f->done = 1;
            d->enc_st = FM_OK;
            d->enc_why = NULL;
            append_flight(d, f);
            return f->serial;
        }
        f->cb = (__bridge_retained void *)cb;
        append_flight(d, f); /* before commit: the handler may run at once */
        pthread_mutex_t *lock = &d->lock;
        pthread_cond_t *cond = &d->cond;
        [cb addCompletedHandler:^(id<MTLCommandBuffer> done) {
            char *why = NULL;
            const MTLCommandBufferStatus status = done.status;
            if (status == MTLCommandBufferStatusError)
                why = dup_printf("metal: command buffer %" PRIu64 " failed on the GPU: %s", f->serial, describe(done.error));
            else if (status != MTLCommandBufferStatusCompleted)
                why = dup_printf("metal: command buffer %" PRIu64 " ended with status %lu", f->serial, (unsigned long)status);
            pthread_mutex_lock(lock);
            f->st = why ? FM_ERR_DEVICE : FM_OK;
            f->why = why;
            f->done = 1;
            pthread_cond_broadcast(cond);
            pthread_mutex_unlock(lock);
        }];
        [cb commit];
        return f->serial;
    }
}

fm_status fm_mtl_wait(fm_mtl *d, uint64_t serial) {
    if (serial > d->serial)
        return fm_fail(FM_ERR_INVALID, "metal: wait for command buffer %" PRIu64 " of %" PRIu64 " committed", serial,
                       d->serial);
    fm_status st = FM_OK;
    char *why = NULL;
    int more = 0;
    mtl_flight *finished = NULL;
    pthread_mutex_lock(&d->lock);
    while (d->head && d->head->serial <= serial) {
        mtl_flight *f = d->head;
        while (!f->done) pthread_cond_wait(&d->cond, &d->lock);
        d->head = f->next;
        if (!d->head) d->tail = NULL;
        f->next = finished;
        finished = f;
        if (f->st != FM_OK && st == FM_OK) {
            st = f->st;
            why = f->why;
            f->why = NULL;
        } else if (f->st != FM_OK) {
            more++;
        }
    }
    pthread_mutex_unlock(&d->lock);
    while (finished) {
        mtl_flight *f = finished;
        finished = f->next;
        if (f->cb) release_object(f->cb);
        free(f->why);
        free(f);
    }
    if (st != FM_OK) {
        if (more) fm_fail(st, "%s (and %d more failed command buffer%s)", why, more, more > 1 ? "s" : "");
        else fm_fail(st, "%s", why);
        free(why);
    }
    return st;
}
