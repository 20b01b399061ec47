"""Batch invariance (backend.h) of every backend this build has: a token's outputs are bitwise the same
whatever batch it comes in (T, its place in the batch, the rows that share its tile or task) and whatever
the thread count, on every CPU kernel variant (csrc/backend/cpu/matmul.h) and on each other backend
(VARIANTS; tests/test_metal_backend.py runs the "metal" ones on the emulated Metal backend). Variants may
differ from each other; within one, decode (T = 1) and every prefill path must compute the same bits.
Beside the matmul and experts: attention (a query alone or inside a call), conv1d (a call cut in three),
the router (a token alone); the gated delta rule's split is test_ops' test_gated_delta_same_bits_however_split.

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
# (backend, CPU variant or None): the CPU with each variant forced, then every other backend built
VARIANTS = [("cpu", isa) for isa in ISAS] + [(b, None) for b in test_ops.BACKENDS if b != "cpu"]
# the ops beside the matmul: the CPU once, then every other backend
BACKEND_TARGETS = [("cpu", None)] + [(b, None) for b in test_ops.BACKENDS if b != "cpu"]
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


def matmul(w, x, i8, kw, backend="cpu"):
    return _core.op_matmul(*w, x, i8, **kw, backend=backend)


def check_rows(w, x, i8, kw, ts, threads, backend="cpu"):
    """Every batch x[s:s+T] (T in ts) against each of its tokens alone, all at threads (the singles at 1)."""
    with running_on(("cpu", None), 1):
        single = np.stack([matmul(w, x[t:t + 1], i8, kw, backend)[0] for t in range(len(x))])
    with running_on(("cpu", None), threads):
        for T in ts:
            s = (3 * T) % (len(x) - T + 1)
            y = matmul(w, x[s:s + T], i8, kw, backend)
            bad = np.nonzero((bits(y) != bits(single[s:s + T])).any(axis=1))[0]
            assert bad.size == 0, (f"T={T} threads={threads}: tokens {(s + bad).tolist()[:8]} differ from the "
                                   f"token alone (max |diff| {np.abs(y - single[s:s + T]).max():.3g})")


@pytest.mark.parametrize("target", VARIANTS, ids=test_ops.target_id)
@pytest.mark.parametrize("name,dtype,gs,cols,i8,kw", CASES, ids=[c[0] for c in CASES])
def test_matmul_row_of_a_batch_is_the_token_alone(target, name, dtype, gs, cols, i8, kw):
    rng = np.random.default_rng(len(name) * 1000 + cols)
    w = build_weight(rng, dtype, 13, cols, gs, **kw)
    x = randn(rng, 230 if target[0] == "cpu" else 60, cols)  # (an emulated GPU is slow)
    with running_on(target):
        check_rows(w, x, i8, kw, TS_SMALL if target[0] == "cpu" else [1, 2, 5, 8, 9, 16, 33, 40, 50], 1, target[0])


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
EXPERT_CASES += [(name + "-int8", d, gs, H, I, {"int8_act": True}) for name, d, gs, H, I in EXPERT_WEIGHTS
                 if d in (Q8, Q4)]  # the quantized matrices on int8 activations


# threads 1 and 2 on the CPU (its thread pool); once elsewhere
TARGET_THREADS = [(t, n) for t in VARIANTS for n in ((1, 2) if t[0] == "cpu" else (1,))]


@pytest.mark.parametrize("target,threads", TARGET_THREADS, ids=[f"{test_ops.target_id(t)}-{n}" for t, n in TARGET_THREADS])
@pytest.mark.parametrize("name,dtype,gs,H,I,kw", EXPERT_CASES, ids=[c[0] for c in EXPERT_CASES])
def test_experts_token_list_is_each_token_alone(target, threads, name, dtype, gs, H, I, kw):
    """The experts op over token lists (side by side in lanes at 2 threads, or split over the pool when
    over 64 tokens) against each token alone and against the lists cut in two."""
    rng = np.random.default_rng(len(name) + H)
    lists = (70, 9, 33, 1, 100) if target[0] == "cpu" else (20, 9, 1, 33)  # (an emulated GPU is slow)
    xn, experts = build_experts(rng, dtype, gs, H, I, 100, lists, scale_bf16=kw.get("scale_bf16", False))
    kw = dict(kw, backend=target[0])
    with running_on(target):
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


# ---------------------------------------------------------------------- attention, conv1d, the router

@pytest.mark.parametrize("target", BACKEND_TARGETS, ids=test_ops.target_id)
@pytest.mark.parametrize("T,pos0,nh,nkv,hd", [(9, 13, 8, 2, 64), (5, 300, 2, 1, 40), (3, 510, 3, 3, 32)])
def test_attention_query_alone_or_in_a_call(target, T, pos0, nh, nkv, hd):
    """A prefill of T queries from pos0, against the reference; then bitwise: a few of its queries alone
    (T = 1, as decode; over 256 keys Metal's flash-decoding split takes them) and its tail as a call of its
    own. (Metal cuts a query's keys in chunks of 256 positions: pos0 300 and 510 make two and three.)"""
    q, kc, vc, _, scale = test_ops.build_attention(np.random.default_rng(T + pos0), T, pos0, nh, nkv, hd)
    whole = _core.op_attention(q, kc, vc, pos0, scale, backend=target[0])
    test_ops.check_outputs(whole, test_ops.ref_attention(q, kc, vc, pos0, scale), (test_ops.TOL_DOT,))
    for t in sorted({0, T // 2, T - 1}):
        alone = _core.op_attention(q[t:t + 1], kc, vc, pos0 + t, scale, backend=target[0])
        assert np.array_equal(bits(alone[0]), bits(whole[t])), f"query {t} alone differs"
    a = T // 2 + 1
    rest = _core.op_attention(q[a:], kc, vc, pos0 + a, scale, backend=target[0])
    assert np.array_equal(bits(rest), bits(whole[a:])), "a call's tail differs"


@pytest.mark.parametrize("target", BACKEND_TARGETS, ids=test_ops.target_id)
def test_conv1d_same_bits_however_split(target):
    """conv1d_silu over 7 tokens in one call: the same bits (outputs and final state) as in calls of 2, 1
    and 4 tokens with the state carried (calls shorter and longer than the K-1 = 3 rows of state)."""
    rng = np.random.default_rng(11)
    T, C, K = 7, 130, 4
    x, state, w = randn(rng, T, C), randn(rng, K - 1, C), randn(rng, C, K, scale=0.5)
    whole, whole_state = _core.op_conv1d_silu(x, state, w, backend=target[0])
    outs, st = [], state
    for a, b in ((0, 2), (2, 3), (3, 7)):
        o, st = _core.op_conv1d_silu(x[a:b], st, w, backend=target[0])
        outs.append(o)
    assert np.array_equal(bits(np.concatenate(outs)), bits(whole))
    assert np.array_equal(bits(st), bits(whole_state))


def hard_logits(rng, T, E, kind):
    """Router logits [T, E] that are hard for a top-k in fp32: near-ties a few ulp apart and exact ties
    (equal values, -0.0 and +0.0) around the top, one logit far above the rest (weight ~1), all equal
    (weights 1/E), a spread so wide that exp underflows for most; NaN and ±inf (all NaN, half NaN, +inf and
    -inf, all -inf, one +inf and one NaN)."""
    x = (rng.standard_normal((T, E)) * 3).astype(np.float32)
    for t in range(T):
        row = x[t]
        if kind == "near":
            top = row.max()
            pick = rng.choice(E, min(E, 12), replace=False)
            row[pick] = np.nextafter(top, np.float32(np.inf) if t % 2 else np.float32(-np.inf)) if E > 1 else top
            row[pick[::3]] = top
            row[pick[1::4]] = np.float32(-0.0) if t % 3 else np.float32(0.0)
            row[pick[2::4]] = np.float32(0.0)
            row[pick[:2]] = np.nextafter(np.nextafter(top, np.float32(np.inf)), np.float32(np.inf))
        elif kind == "peaked":
            row[rng.integers(E)] = row.max() + 30.0
        elif kind == "flat":
            row[:] = 1.5
        elif kind == "wide":
            row[:] = np.linspace(-40.0, 5.0, E, dtype=np.float32)[rng.permutation(E)]
        elif kind == "nonfinite":  # test_ops' ref_topk_softmax says the contract
            p = rng.permutation(E)
            if t == 0 or t == 3:
                row[:] = np.nan if t == 0 else -np.inf
            elif t == 1:
                row[p[:(E + 1) // 2]] = np.nan
            elif t == 2:
                row[p[:E // 3]], row[p[E // 3:2 * E // 3]] = np.inf, -np.inf
            else:
                row[p[0]], row[p[-1]] = np.inf, np.nan
    return x


# E: one expert, fewer than a simdgroup, 33, 512; k up to 32 (Metal's FM_ROUTE_MAX_K)
@pytest.mark.parametrize("target", BACKEND_TARGETS, ids=test_ops.target_id)
@pytest.mark.parametrize("E,k", [(1, 1), (2, 2), (5, 3), (33, 32), (64, 8), (512, 10), (512, 32)])
@pytest.mark.parametrize("kind", ["near", "peaked", "flat", "wide", "nonfinite"])
@pytest.mark.parametrize("norm", [True, False])
def test_route_hard_cases(target, E, k, kind, norm):
    """Indices exactly the CPU backend's (ties: the lower index first) and test_ops' float64 reference's,
    weights within TOL_PROB; each token's indices and weights the same bits alone as among the others."""
    rng = np.random.default_rng(E * 1000 + k * 10 + len(kind) + norm)
    logits = hard_logits(rng, 5, E, kind)
    idx, w = _core.op_route(logits, k, norm, backend=target[0])
    np.testing.assert_array_equal(idx, _core.op_route(logits, k, norm, backend="cpu")[0])
    test_ops.check_outputs((idx, w), test_ops.ref_route(logits, k, norm), (0, test_ops.TOL_PROB))
    for t in (0, 4):
        one_idx, one_w = _core.op_route(logits[t:t + 1], k, norm, backend=target[0])
        assert np.array_equal(one_idx[0], idx[t]) and np.array_equal(bits(one_w[0]), bits(w[t])), t
