/* The buffer table of the Metal device layer (csrc/backend/metal/metal_ranges.h) against a brute force:
 * random inserts of disjoint ranges, removals, and lookups of addresses inside, between, at the ends of
 * and around them. Run by tests/test_metal_host.py under AddressSanitizer; exits 1 on a mismatch. */
#include <stdio.h>

#include "metal_ranges.h"

#define SPACE 4096 /* addresses 4096 .. 4096 + SPACE*8 */
static unsigned char owner[SPACE * 8 + 64]; /* brute force: 1 + index of the range holding each address */
static uint64_t rng = 88172645463325252ull;
static uint64_t next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

int main(void) {
    fm_mtl_ranges t = {0};
    int ids[256] = {0}; /* id of each live range, by its handle */
    int fails = 0;
    for (int step = 0; step < 20000; step++) {
        const uintptr_t base = 4096 + next() % (SPACE * 8 - 200);
        const size_t len = 1 + next() % 160;
        int brute_overlap = 0;
        for (size_t a = base; a < base + len; a++) brute_overlap |= owner[a - 4096] != 0;
        if (fm_mtl_ranges_overlaps(&t, base, len) != brute_overlap) {
            fprintf(stderr, "overlaps(%zu, %zu) = %d, brute force %d\n", (size_t)base, len, !brute_overlap, brute_overlap);
            fails++;
        }
        if (!brute_overlap && t.n < 200 && next() % 3) {
            int id = 1;
            while (ids[id]) id++;
            ids[id] = 1;
            if (fm_mtl_ranges_reserve(&t) != 0) return 2;
            fm_mtl_ranges_insert(&t, (fm_mtl_range){base, len, (void *)(uintptr_t)id, 0});
            for (size_t a = base; a < base + len; a++) owner[a - 4096] = (unsigned char)id;
        } else if (t.n && next() % 2) {
            const size_t i = next() % t.n;
            if (fm_mtl_ranges_at(&t, t.r[i].base) != (ptrdiff_t)i) {
                fprintf(stderr, "at(%zu) != %zu\n", (size_t)t.r[i].base, i);
                fails++;
            }
            const fm_mtl_range r = fm_mtl_ranges_remove(&t, i);
            ids[(uintptr_t)r.handle] = 0;
            for (size_t a = r.base; a < r.base + r.len; a++) owner[a - 4096] = 0;
        }
        for (size_t i = 1; i < t.n; i++)
            if (t.r[i - 1].base + t.r[i - 1].len > t.r[i].base) {
                fprintf(stderr, "table not sorted and disjoint at %zu\n", i);
                return 1;
            }
        for (int probe = 0; probe < 8; probe++) {
            const uintptr_t p = 4096 - 2 + next() % (SPACE * 8 + 4);
            const int want = p >= 4096 && p < 4096 + SPACE * 8 ? owner[p - 4096] : 0;
            const fm_mtl_range *r = fm_mtl_ranges_find(&t, p);
            const int got = r ? (int)(uintptr_t)r->handle : 0;
            if (got != want) {
                fprintf(stderr, "find(%zu) = range %d, brute force %d\n", (size_t)p, got, want);
                fails++;
            }
            if (fm_mtl_ranges_at(&t, p) >= 0 && (!r || r->base != p)) {
                fprintf(stderr, "at(%zu) found a range that does not start there\n", (size_t)p);
                fails++;
            }
        }
    }
    if (!fm_mtl_ranges_overlaps(&t, UINTPTR_MAX - 4, 16)) {
        fprintf(stderr, "a range that wraps around the address space is not refused\n");
        fails++;
    }
    free(t.r);
    if (fails) return 1;
    printf("ok\n");
    return 0;
}
