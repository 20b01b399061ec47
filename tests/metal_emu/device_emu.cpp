/*
 * device_emu.cpp — csrc/backend/metal/metal_device.h on the CPU grid emulator (emu.h): the device layer
 * under the Metal backend's table in the test-only build (CMake FLASHMOE_METAL_EMU), so that
 * csrc/backend/metal/metal_ops.c runs, unchanged, with every kernel of metal/ compiled as C++.
 *
 * As Metal would: a buffer bound must lie inside an allocation or a wrapped range (else an error naming
 * it); allocations are 16 KiB aligned and zeroed, of exactly the bytes asked for (so AddressSanitizer,
 * where the build has it, sees a read past the end); a kernel not in the build fails at open, as a
 * pipeline that does not compile would. Dispatches run at once, so command buffers complete as they are
 * committed.
 *
 * FM_EMU_ORDERS=all (the tests set it) runs every dispatch three times, its lanes and threadgroups
 * forward, reversed and shuffled, from the same contents of every bound buffer, and fails unless all
 * three leave the same bytes: a race on memory shows as a difference. Bindings last for one dispatch.
 *
 * FM_EMU_REPLACE=NAME=OTHER dispatches kernel OTHER wherever NAME is asked for: the kernels broken on
 * purpose (broken/, built in as NAME__FILE) run in the backend's place, for the emulator's own tests.
 */
#include <stdlib.h>
#include <string.h>

#include <string>
#include <vector>

extern "C" {
#include "../../csrc/core/util.h" /* fm_fail */
#include "metal_device.h"
#include "metal_ranges.h" /* the buffer table metal_host.m keeps */
}
#include "emu.h"

/* FM_EMU_FAIL_DISPATCH=N: the command buffer holding the process's Nth dispatch fails, as a GPU's can
 * (tests of the error path: the dispatch still runs, its buffer's wait reports the failure) */
static uint64_t dispatches;

struct fm_mtl {
    fm_mtl_ranges ranges = {}; /* allocations (owned) and wrapped ranges: metal_host.m's table */
    fm_emu::encoder enc;
    uint64_t serial = 0, failed = 0; /* the serial of a failed command buffer not yet reported */
    uint64_t fail_at = 0;
    std::string replace_from, replace_to;
    bool pending = false, check_orders = false, pending_fails = false;
};

namespace {

/* The range holding p, an address inside it or just past its end (an empty view), as metal_host.m binds. */
const fm_mtl_range *range_of(fm_mtl *d, const void *p) {
    const fm_mtl_range *r = fm_mtl_ranges_find(&d->ranges, (uintptr_t)p);
    if (!r && !(r = fm_mtl_ranges_find(&d->ranges, (uintptr_t)p - 1))) fm_emu::fail("buffer %p is in no Metal buffer", p);
    return r;
}

void add_range(fm_mtl *d, const void *p, size_t bytes, int owned) {
    const size_t len = bytes ? bytes : 1;
    if (fm_mtl_ranges_overlaps(&d->ranges, (uintptr_t)p, len)) fm_emu::fail("buffer %p (%zu bytes) overlaps another", p, bytes);
    if (fm_mtl_ranges_reserve(&d->ranges)) fm_emu::fail("out of memory for the buffer table");
    fm_mtl_ranges_insert(&d->ranges, fm_mtl_range{(uintptr_t)p, len, nullptr, owned});
}

void run_in_every_order(fm_mtl *d, const char *name, const fm_metal_grid &g) {
    std::vector<std::pair<char *, size_t>> used; /* the bound ranges, each once (setBytes copies are not) */
    for (int i = 0; i < fm_emu::MAX_BUFFERS; i++)
        if (d->enc.buffers[i] && !d->enc.bytes_len[i]) {
            const fm_mtl_range *r = range_of(d, d->enc.buffers[i]);
            bool seen = false;
            for (auto &u : used) seen |= u.first == (char *)r->base;
            if (!seen) used.emplace_back((char *)r->base, r->len);
        }
    std::vector<std::string> before, after;
    for (auto &u : used) before.emplace_back(u.first, u.second);
    const fm_emu::order orders[] = {fm_emu::order::forward, fm_emu::order::reverse, fm_emu::order::shuffled};
    for (fm_emu::order o : orders) {
        fm_emu::set_order(o);
        for (size_t i = 0; i < used.size(); i++) memcpy(used[i].first, before[i].data(), used[i].second);
        d->enc.dispatch(name, g);
        for (size_t i = 0; i < used.size(); i++) {
            if (o == fm_emu::order::forward) {
                after.emplace_back(used[i].first, used[i].second);
            } else if (memcmp(after[i].data(), used[i].first, used[i].second) != 0) {
                size_t at = 0;
                while (after[i][at] == used[i].first[at]) at++;
                fm_emu::fail("%s: lanes forward and %s leave different bytes in buffer %p at byte %zu of %zu "
                             "(a race?)", name, fm_emu::order_name(o), (const void *)used[i].first, at, used[i].second);
            }
        }
    }
    fm_emu::set_order(fm_emu::order::forward);
}

} // namespace

extern "C" {

fm_status fm_mtl_open(fm_mtl **out) {
    fm_mtl *d = new fm_mtl;
    const char *orders = getenv("FM_EMU_ORDERS");
    d->check_orders = orders && strcmp(orders, "all") == 0;
    const char *fail_at = getenv("FM_EMU_FAIL_DISPATCH");
    d->fail_at = fail_at ? strtoull(fail_at, nullptr, 10) : 0;
    if (const char *r = getenv("FM_EMU_REPLACE")) {
        const char *eq = strchr(r, '=');
        if (!eq || !fm_emu::has_kernel(eq + 1)) fm_emu::fail("FM_EMU_REPLACE=%s: want NAME=KERNEL, a kernel of this build", r);
        d->replace_from.assign(r, eq), d->replace_to = eq + 1;
    }
    for (int k = 0; k < FM_K_COUNT; k++)
        if (!fm_emu::has_kernel(fm_mtl_kernel_name((fm_mtl_kernel)k)))
            fm_emu::fail("kernel %s is not in this build", fm_mtl_kernel_name((fm_mtl_kernel)k));
    *out = d;
    return FM_OK;
}

void fm_mtl_close(fm_mtl *d) {
    free(d->ranges.r);
    delete d;
}

/* FM_EMU_WORKING_SET=BYTES: a GPU that may hold that much (tests of the memory plan's limit) */
uint64_t fm_mtl_working_set_limit(fm_mtl *d) {
    (void)d;
    const char *env = getenv("FM_EMU_WORKING_SET");
    return env ? strtoull(env, nullptr, 10) : 0;
}

void *fm_mtl_alloc(fm_mtl *d, size_t bytes) {
    void *p = nullptr;
    if (posix_memalign(&p, 16384, bytes ? bytes : 1)) return nullptr;
    memset(p, 0, bytes);
    add_range(d, p, bytes, 1);
    return p;
}

void fm_mtl_free(fm_mtl *d, void *p, size_t bytes) {
    const ptrdiff_t i = fm_mtl_ranges_at(&d->ranges, (uintptr_t)p);
    if (i < 0 || !d->ranges.r[i].owned || d->ranges.r[i].len != (bytes ? bytes : 1))
        fm_emu::fail("free of %p (%zu bytes): not an allocation", p, bytes);
    fm_mtl_ranges_remove(&d->ranges, (size_t)i);
    free(p);
}

int fm_mtl_wrap(fm_mtl *d, void *host, size_t bytes) {
    if ((uintptr_t)host % 16384) fm_emu::fail("wrap of %p: not 16 KiB aligned (newBufferWithBytesNoCopy)", host);
    add_range(d, host, bytes, 0);
    return 0;
}

void fm_mtl_unwrap(fm_mtl *d, void *host, size_t bytes) {
    (void)bytes;
    const ptrdiff_t i = fm_mtl_ranges_at(&d->ranges, (uintptr_t)host);
    if (i < 0 || d->ranges.r[i].owned) fm_emu::fail("unwrap of %p: not a wrapped range", host);
    fm_mtl_ranges_remove(&d->ranges, (size_t)i);
}

void fm_mtl_set_buffer(fm_mtl *d, int index, const void *p) {
    if (p) range_of(d, p);
    d->enc.set_buffer(p, index);
}

void fm_mtl_set_bytes(fm_mtl *d, int index, const void *p, size_t len) {
    if (len == 0 || len > 4096) fm_emu::fail("setBytes of %zu bytes at %d: Metal takes 1 byte to 4 KiB", len, index);
    d->enc.set_bytes(p, len, index);
}

void fm_mtl_dispatch(fm_mtl *d, fm_mtl_kernel k, const fm_metal_grid *g) {
    d->enc.set_threadgroup_memory_length(g->tg_bytes[0], 0);
    const char *name = fm_mtl_kernel_name(k);
    if (!d->replace_from.empty() && d->replace_from == name) name = d->replace_to.c_str();
    if (d->check_orders)
        run_in_every_order(d, name, *g);
    else
        d->enc.dispatch(name, *g);
    d->pending = true;
    if (++dispatches == d->fail_at) d->pending_fails = true;
    /* Metal keeps an encoder's bindings from one dispatch to the next; forgetting them here makes a
     * dispatch that relies on one left over from an earlier op fail ("buffer(i) is not bound") */
    for (int i = 0; i < fm_emu::MAX_BUFFERS; i++) d->enc.set_buffer(nullptr, i);
}

uint64_t fm_mtl_commit(fm_mtl *d) {
    if (d->pending) {
        d->serial++, d->pending = false;
        if (d->pending_fails && !d->failed) d->failed = d->serial;
        d->pending_fails = false;
    }
    return d->serial;
}

fm_status fm_mtl_wait(fm_mtl *d, uint64_t serial) {
    if (serial > d->serial) fm_emu::fail("wait for command buffer %llu, only %llu committed", (unsigned long long)serial,
                                         (unsigned long long)d->serial);
    if (d->failed && d->failed <= serial) {
        const uint64_t which = d->failed;
        d->failed = 0;
        return fm_fail(FM_ERR_DEVICE, "metal: command buffer %llu failed: an emulated GPU fault (FM_EMU_FAIL_DISPATCH)",
                       (unsigned long long)which);
    }
    return FM_OK;
}

} // extern "C"
