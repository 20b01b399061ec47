"""Batch invariance of the CPU matmul and experts ops: a token's outputs are bitwise the same whatever
batch it comes in (T, its place in the batch, the rows that share its tile or task) and whatever the
thread count, on every CPU kernel variant this build has (csrc/backend/cpu/matmul.h). Variants may differ
from each other; within one, decode (T = 1) and every prefill path must compute the same bits.

Each case compares rows of fm_cpu_matmul(w, X[s:s+T]) with fm_cpu_matmul(w, X[t]) one token at a time,
for T = 1..40 and a few large T, batches starting at varying s (so a token lands at different places in
its batch and its tiles), threads 1 and 2 (rows split over the pool once rows·cols·T >= 2e5). The weights
are test_ops' (awkward shapes: rows not a multiple of 4, cols with a tail where the dtype allows).
tests/test_cross_isa.py runs the same check in C for the NEON variants under qemu (tests/c/test_kernels.c).
"""

from __future__ import annotations

import numpy as np
import pytest
import test_ops
from test_ops import BF16, F32, Q4, Q8, build_experts, build_weight, randn, running_on

from flashmoe import _core

ISAS = _core.cpu_isas()
TS_SMALL = list(range(1, 41)) + [127, 200]
TS_SPLIT = [1, 2, 3, 4, 5, 8, 9, 13, 17, 40, 127]  # 257 x 1024: split over 2 threads from T = 1 on

# (name, dtype, group size, cols, int8 activations); cols with a tail past 8 lanes for f32 and bf16
WEIGHTS = [("f32", F32, 0, 130, False), ("bf16", BF16, 0, 130, False), ("q8g16", Q8, 16, 80, False)]
WEIGHTS += [(f"{n}g{gs}{'-int8' if i8 else ''}", d, gs, 3 * gs, i8)
            for n, d in (("q8", Q8), ("q4", Q4)) for gs in (32, 64, 128) for i8 in (False, True)]
CASES = [(name + sname, d, gs, cols, i8, kw) for name, d, gs, cols, i8 in WEIGHTS
         for sname, kw in test_ops.scale_dtypes(d)]


def bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def matmul(w, x, i8, kw):
    return _core.op_matmul(*w, x, i8, **kw)


def check_rows(w, x, i8, kw, ts, threads):
    """Every batch x[s:s+T] (T in ts) against each of its tokens alone, all at threads (the singles at 1)."""
    with running_on(("cpu", None), 1):
        single = np.stack([matmul(w, x[t:t + 1], i8, kw)[0] for t in range(len(x))])
    with running_on(("cpu", None), threads):
        for T in ts:
            s = (3 * T) % (len(x) - T + 1)
            y = matmul(w, x[s:s + T], i8, kw)
            bad = np.nonzero((bits(y) != bits(single[s:s + T])).any(axis=1))[0]
            assert bad.size == 0, (f"T={T} threads={threads}: tokens {(s + bad).tolist()[:8]} differ from the "
                                   f"token alone (max |diff| {np.abs(y - single[s:s + T]).max():.3g})")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name,dtype,gs,cols,i8,kw", CASES, ids=[c[0] for c in CASES])
def test_matmul_row_of_a_batch_is_the_token_alone(isa, name, dtype, gs, cols, i8, kw):
    rng = np.random.default_rng(len(name) * 1000 + cols)
    w = build_weight(rng, dtype, 13, cols, gs, **kw)
    x = randn(rng, 230, cols)
    _core.set_cpu_isa(isa)
    try:
        check_rows(w, x, i8, kw, TS_SMALL, 1)
    finally:
        _core.set_cpu_isa("auto")


# Rows split over the pool: 257 rows (not a multiple of 4), with 1 and 2 threads.
SPLIT = [c for c in CASES if c[0] in ("f32", "bf16", "q8g64", "q4g32", "q4g64-int8", "q8g64-int8-sbf16",
                                      "q4g32-int8", "q4g64-sbf16")]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name,dtype,gs,cols,i8,kw", SPLIT, ids=[c[0] for c in SPLIT])
def test_matmul_split_over_threads_is_the_token_alone(isa, threads, name, dtype, gs, cols, i8, kw):
    rng = np.random.default_rng(len(name) * 7 + threads)
    w = build_weight(rng, dtype, 257, 1024, gs, **kw)
    x = randn(rng, 140, 1024)
    _core.set_cpu_isa(isa)
    try:
        check_rows(w, x, i8, kw, TS_SPLIT, threads)
    finally:
        _core.set_cpu_isa("auto")


EXPERT_WEIGHTS = [("f32", F32, 0, 130, 60), ("bf16", BF16, 0, 96, 130), ("q8g64", Q8, 64, 192, 128),
                  ("q4g32", Q4, 32, 192, 96)]
EXPERT_CASES = [(name + sname, d, gs, H, I, kw) for name, d, gs, H, I in EXPERT_WEIGHTS
                for sname, kw in test_ops.scale_dtypes(d)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name,dtype,gs,H,I,kw", EXPERT_CASES, ids=[c[0] for c in EXPERT_CASES])
def test_experts_token_list_is_each_token_alone(isa, threads, name, dtype, gs, H, I, kw):
    """The experts op over token lists (side by side in lanes at 2 threads, or split over the pool when
    over 64 tokens) against each token alone and against the lists cut in two."""
    rng = np.random.default_rng(len(name) + H)
    xn, experts = build_experts(rng, dtype, gs, H, I, 100, (70, 9, 33, 1, 100), **kw)
    _core.set_cpu_isa(isa)
    try:
        with running_on(("cpu", None), threads):
            whole = _core.op_experts(xn, experts, **kw)
            cut = _core.op_experts(xn, [(g, u, d, tok[a:b]) for g, u, d, tok in experts
                                        for a, b in ((0, len(tok) // 3), (len(tok) // 3, len(tok))) if b > a], **kw)
        assert np.array_equal(bits(whole), bits(cut)), "an expert's token list cut in two differs"
        with running_on(("cpu", None), 1):
            alone = np.concatenate([_core.op_experts(xn, [(g, u, d, tok[i:i + 1])], **kw)
                                    for g, u, d, tok in experts for i in range(len(tok))])
        bad = np.nonzero((bits(whole) != bits(alone)).any(axis=1))[0]
        assert bad.size == 0, f"rows {bad.tolist()[:8]} differ from their token alone"
    finally:
        _core.set_cpu_isa("auto")
