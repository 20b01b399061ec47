/*
 * metal_ranges.h — the table of metal_host.m's buffers: disjoint address ranges [base, base + len), each
 * with an opaque handle (its MTLBuffer), sorted by base, so that any address inside one finds it by
 * binary search. Plain C (no Metal), so that tests/test_metal_host.py runs it on Linux against a brute
 * force (tests/c/test_metal_ranges.c).
 */
#ifndef FM_METAL_RANGES_H
#define FM_METAL_RANGES_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    uintptr_t base;
    size_t len;
    void *handle; /* the range's MTLBuffer (retained by metal_host.m) */
    int owned;    /* how the memory came: metal_host.m's business */
} fm_mtl_range;

typedef struct {
    fm_mtl_range *r; /* sorted by base, disjoint, len > 0 */
    size_t n, cap;
} fm_mtl_ranges;

/* The index of the first range whose base is above p (0..n). */
static inline size_t fm_mtl_ranges_upper(const fm_mtl_ranges *t, uintptr_t p) {
    size_t lo = 0, hi = t->n;
    while (lo < hi) {
        const size_t mid = lo + (hi - lo) / 2;
        if (t->r[mid].base <= p) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* The range holding address p, or NULL. */
static inline const fm_mtl_range *fm_mtl_ranges_find(const fm_mtl_ranges *t, uintptr_t p) {
    const size_t i = fm_mtl_ranges_upper(t, p);
    if (i == 0) return NULL;
    const fm_mtl_range *r = &t->r[i - 1];
    return p - r->base < r->len ? r : NULL;
}

/* The index of the range that starts exactly at p, or -1. */
static inline ptrdiff_t fm_mtl_ranges_at(const fm_mtl_ranges *t, uintptr_t p) {
    const size_t i = fm_mtl_ranges_upper(t, p);
    return i > 0 && t->r[i - 1].base == p ? (ptrdiff_t)(i - 1) : -1;
}

/* Whether [base, base + len) overlaps a range of the table (or wraps around the address space). */
static inline int fm_mtl_ranges_overlaps(const fm_mtl_ranges *t, uintptr_t base, size_t len) {
    if (len == 0 || base + len < base) return 1;
    const size_t i = fm_mtl_ranges_upper(t, base);
    if (i > 0 && t->r[i - 1].base + t->r[i - 1].len > base) return 1;
    return i < t->n && base + len > t->r[i].base;
}

/* Room for one more range: 0, or -1 when out of memory. */
static inline int fm_mtl_ranges_reserve(fm_mtl_ranges *t) {
    if (t->n < t->cap) return 0;
    const size_t cap = t->cap ? 2 * t->cap : 64;
    fm_mtl_range *r = (fm_mtl_range *)realloc(t->r, cap * sizeof *r);
    if (!r) return -1;
    t->r = r;
    t->cap = cap;
    return 0;
}

/* Add a range that overlaps none (fm_mtl_ranges_overlaps) into room made by fm_mtl_ranges_reserve. */
static inline void fm_mtl_ranges_insert(fm_mtl_ranges *t, fm_mtl_range range) {
    const size_t i = fm_mtl_ranges_upper(t, range.base);
    memmove(&t->r[i + 1], &t->r[i], (t->n - i) * sizeof *t->r);
    t->r[i] = range;
    t->n++;
}

/* Take out the range at index i; its entry. */
static inline fm_mtl_range fm_mtl_ranges_remove(fm_mtl_ranges *t, size_t i) {
    const fm_mtl_range out = t->r[i];
    memmove(&t->r[i], &t->r[i + 1], (t->n - i - 1) * sizeof *t->r);
    t->n--;
    return out;
}

#endif /* FM_METAL_RANGES_H */
