"""Every backend op against an independent float64 numpy reference (ggml test-backend-ops style).

A case is (op, id, build, ref, tol): build(rng) returns the op's positional arguments, ref(*args)
the expected outputs computed in float64, tol the allowed normalised error per output,
    err = max|out - ref| / max(1, max|ref|),
justified where the case is registered (over the reference's elements that are not NaN: a NaN output must be
where the reference has one). Integer outputs (top-k indices) must match exactly, as must outputs with tol 0.
A case's keyword arguments (kwargs, e.g. scale_bf16) go to both the op and the reference; its threads, if
set, is the thread count the op runs with.

Every case runs on every backend this build has (BACKENDS; the CPU once per kernel variant, TARGETS)
through _core.op_<name>(..., backend=NAME), which runs the op of that backend's table
(csrc/backend/backend.h): a CUDA or Metal build is tested by being built. A backend whose table lacks
an op reports the case as skipped. The ops of CPU_KERNEL_OPS are CPU kernel forms called directly
(fm_cpu_*), run on the CPU variants only. tests/test_cross_isa.py runs some of these cases again with
the NEON kernels under qemu.
"""

from __future__ import annotations

import contextlib
import functools
import os
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

from flashmoe import _core
from flashmoe.quant import f32_to_bf16, quantize  # input builders only; references are below

# FLASHMOE_BACKEND (the default backend, backend.c) set to one backend: the ops run on it and the CPU only
# (CI's hosted Macs set cpu: their paravirtual GPU is no compute target)
_ONLY = os.environ.get("FLASHMOE_BACKEND") or "auto"
# A backend built in but without its device here (a CUDA build on a machine with no GPU) is left out.
BACKENDS = [b for b in ("cpu", "cuda", "metal") if b in _core.backends().split(",") and _ONLY in ("auto", "cpu", b)
            and (b == "cpu" or _ONLY != "cpu") and _core.backend_has_device(b)]
# (backend, CPU kernel variant or None): the CPU with each variant it can run forced (scalar, avx2, ...).
TARGETS = [("cpu", isa) for isa in _core.cpu_isas()] + [(b, None) for b in BACKENDS if b != "cpu"]
# The gated delta rule's two CPU forms, each tested against the reference (the interface's gated_delta,
# which picks one, is op gated_delta_auto).
CPU_KERNEL_OPS = {"gated_delta", "gated_delta_chunk"}
F32, BF16, Q8, Q4 = _core.F32, _core.BF16, _core.Q8, _core.Q4


def target_id(target):
    backend, isa = target
    return f"{backend}-{isa}" if isa else backend


@contextlib.contextmanager
def running_on(target, threads=None):
    """The CPU kernel variant of target forced, and the thread pool at threads (if given), for the scope."""
    isa, before = target[1], _core.get_threads() if threads else None
    if isa:
        _core.set_cpu_isa(isa)
    if threads:
        _core.set_threads(threads)
    try:
        yield
    finally:
        if isa:
            _core.set_cpu_isa("auto")
        if threads:
            _core.set_threads(before)


# Tolerances. fp32 has eps = 2^-23 ~ 1.2e-7; a formula error (wrong axis, head, sign, missing eps)
# shows up at >= 1e-3, so these leave 10-100x headroom over rounding while still catching bugs.
TOL_ELEM = 1e-5  # elementwise / row-norm ops: a handful of correctly rounded fp32 ops per output,
#                  <= ~10 eps relative (expf, sqrtf are <= 1 ulp); norms' sum of squares is in double.
TOL_DOT = 1e-5   # fp32 dots of n <= 192 terms in 8 partial sums: <= n/8+3 roundings per lane, random
#                  signs give ~sqrt(n/8)*eps*sum|terms|; sum|terms| ~ 0.8n vs max|ref| ~ 3 sqrt(n) for
#                  N(0,1) data -> ~1e-6. Covers matmul, attention scores, the conv taps, Sᵀk / Sᵀq.
TOL_PROB = 1e-6  # router weights <= 1: softmax in double, one rounding to fp32, k-term fp32 renorm.


@dataclass
class Case:
    op: str
    id: str
    build: Callable
    ref: Callable
    tol: tuple
    kwargs: dict = field(default_factory=dict)
    threads: int | None = None
    refused_by: tuple = ()  # backends whose kernels do not take this shape: a clear error is the result there

    @property
    def cpu_kernel(self):
        return self.op in CPU_KERNEL_OPS


CASES: list[Case] = []


def case(op, id, build, ref, *tol, threads=None, refused_by=(), **kwargs):
    CASES.append(Case(op, id, build, ref, tol, kwargs, threads, refused_by))


def f64(a):
    return np.asarray(a, dtype=np.float64)


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ---------------------------------------------------------------- matmul / get_row


def ref_scales(a, rows, scale_bf16):
    """Scales or biases [rows, ng] in float64, exact: bfloat16 bits (the top 16 of a float32) when
    scale_bf16, else float16."""
    u = np.asarray(a, np.uint16)
    return f64((u.astype(np.uint32) << 16).view(np.float32) if scale_bf16 else u.view(np.float16)).reshape(rows, -1)


def ref_dequant(dtype, data, scales, biases, rows, cols, gs, scale_bf16=False):
    """W [rows, cols] in float64, exact: w = scale * q + bias per group (docs/FORMAT.md)."""
    if dtype == F32:
        return f64(data).reshape(rows, cols)
    if dtype == BF16:  # the top 16 bits of a float32
        return f64((np.asarray(data, np.uint16).astype(np.uint32) << 16).view(np.float32)).reshape(rows, cols)
    data = np.asarray(data, np.uint8).reshape(rows, -1)
    if dtype == Q4:
        q = np.empty((rows, cols), np.int64)
        q[:, 0::2] = data & 0x0F  # byte j: element 2j in the low nibble,
        q[:, 1::2] = data >> 4    #         element 2j+1 in the high nibble
    else:
        q = data.astype(np.int64)
    s = np.repeat(ref_scales(scales, rows, scale_bf16), gs, axis=1)
    b = np.repeat(ref_scales(biases, rows, scale_bf16), gs, axis=1)
    return s * q + b


def pack_q(q, bits):
    """Levels q [rows, cols] (uint8) as stored: q4 two per byte, element 2j in the low nibble."""
    q = q.astype(np.uint8)
    return np.ascontiguousarray(q[:, 0::2] | (q[:, 1::2] << np.uint8(4)) if bits == 4 else q)


def quantize_mlx(w, bits, gs):
    """Input builder: w [rows, cols] quantized as MLX's affine quantizer does (mlx/ops.cpp), with bfloat16
    scales and biases as MLX checkpoints store them. Per group: scale = max((max - min) / (2^bits - 1),
    1e-7), negated unless |min| > |max| (so about half the scales are negative); bias = that edge (max or
    min), scale = edge / rint(edge / scale) where that is not 0 (else bias 0). A constant group gets scale
    -1e-7 (not a float16 normal) and q 0. q is computed from the stored bf16 values."""
    maxq = (1 << bits) - 1
    g = np.asarray(w, np.float32).reshape(w.shape[0], -1, gs)
    mx, mn = g.max(axis=2), g.min(axis=2)
    up = np.abs(mn) > np.abs(mx)
    s = np.maximum((mx - mn) / np.float32(maxq), np.float32(1e-7))
    s = np.where(up, s, -s)
    edge = np.where(up, mn, mx)
    q0 = np.rint(edge / s)
    s = np.where(q0 != 0, edge / np.where(q0 != 0, q0, 1), s).astype(np.float32)
    b = np.where(q0 == 0, 0, edge).astype(np.float32)
    s16, b16 = f32_to_bf16(s), f32_to_bf16(b)
    sf, bf = ref_scales(s16, w.shape[0], True)[..., None], ref_scales(b16, w.shape[0], True)[..., None]
    q = np.clip(np.rint((g - bf) / sf), 0, maxq).reshape(w.shape)
    return pack_q(q, bits), s16, b16


def build_weight(rng, dtype, rows, cols, gs, scale_bf16=False):
    w = randn(rng, rows, cols)
    w[0] *= 1e-6          # tiny row: float16-subnormal scales and biases (bf16: ~3e-7 scales)
    w[1, :gs or 8] = 0.5  # a constant group: scale 0, q 0, bias = value (bf16: scale -1e-7)
    if dtype == F32:
        return (F32, w, None, None, rows, cols, 0)
    if dtype == BF16:
        return (BF16, f32_to_bf16(w), None, None, rows, cols, 0)
    if scale_bf16:
        q, s, b = quantize_mlx(w, 8 if dtype == Q8 else 4, gs)
        return (dtype, q, s, b, rows, cols, gs)
    q, s, b = quantize(w, 8 if dtype == Q8 else 4, gs)
    return (dtype, q, s.view(np.uint16), b.view(np.uint16), rows, cols, gs)


# Scale dtypes of q4/q8 matrices: float16 (our converter), bfloat16 (MLX checkpoints; kwargs scale_bf16).
SCALE_DTYPES = (("", {}), ("-sbf16", {"scale_bf16": True}))


def scale_dtypes(dtype):
    return SCALE_DTYPES if dtype in (Q4, Q8) else SCALE_DTYPES[:1]


WEIGHTS = [("f32", F32, 0, 130), ("f32", F32, 0, 60), ("f32", F32, 0, 7)]
WEIGHTS += [("bf16", BF16, 0, 130), ("bf16", BF16, 0, 96)]
WEIGHTS += [(f"{n}g{gs}", d, gs, 3 * gs) for n, d in (("q8", Q8), ("q4", Q4)) for gs in (16, 32, 64)]


def ref_matmul(*a, scale_bf16=False):
    return f64(a[7]) @ ref_dequant(*a[:7], scale_bf16=scale_bf16).T


for name, dtype, gs, cols in WEIGHTS:
    for sname, kw in scale_dtypes(dtype):
        for T in (1, 5):
            case("matmul", f"{name}{sname}-13x{cols}-T{T}",
                 lambda rng, d=dtype, g=gs, c=cols, T=T, kw=kw: build_weight(rng, d, 13, c, g, **kw)
                 + (randn(rng, T, c),),
                 ref_matmul, TOL_DOT, **kw)
# Big enough to be split over the thread pool (rows x cols x T >= 2e5), rows not a multiple of the split;
# T = 1 (decode), 3 (fused quantized kernel, a few tokens) and 11 (dequantized rows in register tiles).
for name, dtype, gs in (("f32", F32, 0), ("bf16", BF16, 0), ("q8g64", Q8, 64), ("q4g64", Q4, 64), ("q4g32", Q4, 32)):
    for sname, kw in scale_dtypes(dtype):
        for T in (1, 3, 11):
            case("matmul", f"{name}{sname}-257x1024-T{T}",
                 lambda rng, d=dtype, g=gs, T=T, kw=kw: build_weight(rng, d, 257, 1024, g, **kw)
                 + (randn(rng, T, 1024),),
                 ref_matmul, TOL_DOT, **kw)


def quantize_x_ref(x, gs):
    """int8 activations as csrc/backend/cpu/cpu.h defines them, in float32 exactly as the C code rounds:
    per group, m = max|x|, xq = rint(x * (127 / m)), d = m / 127 (all zero when m = 0)."""
    x = np.asarray(x, np.float32).reshape(x.shape[0], -1, gs)
    amax = np.abs(x).max(axis=2, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    return np.rint(x * inv), amax / np.float32(127)


def ref_matmul_int8(dtype, data, scales, biases, rows, cols, gs, x, int8_act, scale_bf16=False):
    """y = sum_g d_g * (scale_g * sum q*xq + bias_g * sum xq), in float64 (ops.h)."""
    assert int8_act and dtype in (Q4, Q8)
    xq, d = quantize_x_ref(x, gs)                                              # [T, ng, gs], [T, ng, 1]
    s, b = ref_scales(scales, rows, scale_bf16), ref_scales(biases, rows, scale_bf16)  # [rows, ng]
    q = (ref_dequant(dtype, data, np.full_like(scales, 0x3C00), np.zeros_like(biases), rows, cols, gs)
         .reshape(rows, -1, gs))                                               # the integers q, [rows, ng, gs]
    dots = np.einsum("rgi,tgi->trg", q, f64(xq))                               # [T, rows, ng]
    dx = f64(d)[:, None, :, 0]                                                 # [T, 1, ng]
    return (dx * (dots * s[None] + b[None] * f64(xq).sum(axis=2)[:, None, :])).sum(axis=2)


# float16-subnormal scales and biases (below 2^-14 = 6.1e-5) on every row: weights ~1.5e-5, with x scaled
# up by as much so that outputs are O(1) and the normalised error judges them (in the cases above only row 0
# is tiny, and its outputs of ~1e-5 would pass the tolerance even if computed as zero). Every kernel
# variant reads these scales: the fp32-activation paths (T = 1, 5, 11) and the int8 ones.
def build_subnormal(rng, dtype, rows, cols, gs, T, int8_act):
    w = randn(rng, rows, cols) * np.float32(1.5e-5)
    q, s, b = quantize(w, 8 if dtype == Q8 else 4, gs)
    sub = lambda a: np.all((np.abs(a.astype(np.float32)) < 2.0 ** -14) & (a != 0))  # noqa: E731
    assert sub(s) and sub(b), "the scales and biases must be float16 subnormals"
    return (dtype, q, s.view(np.uint16), b.view(np.uint16), rows, cols, gs,
            randn(rng, T, cols) * np.float32(1 / 1.5e-5)) + ((True,) if int8_act else ())


for name, dtype, gs in (("q8g32", Q8, 32), ("q8g64", Q8, 64), ("q4g32", Q4, 32), ("q4g64", Q4, 64)):
    for T in (1, 5, 11):
        case("matmul", f"subnormal-{name}-13x{4 * gs}-T{T}",
             lambda rng, d=dtype, g=gs, T=T: build_subnormal(rng, d, 13, 4 * g, g, T, False),
             ref_matmul, TOL_DOT)
        case("matmul", f"subnormal-int8-{name}-13x{4 * gs}-T{T}",
             lambda rng, d=dtype, g=gs, T=T: build_subnormal(rng, d, 13, 4 * g, g, T, True),
             ref_matmul_int8, TOL_DOT)


# bfloat16 scales and biases that float16 cannot hold, as MLX checkpoints have them: magnitudes ~1e-7
# (float16 subnormals, rounded to a step of 6e-8) or ~1e-30 (zero in float16), both signs, on every row,
# with x scaled up by as much so that outputs are O(1) (as above). A kernel that reads bf16 scales as
# float16, or narrows them through float16, fails these; every kernel variant reads them.
def build_bf16_extreme(rng, dtype, rows, cols, gs, mag):
    bits, ng = 8 if dtype == Q8 else 4, cols // gs
    q = rng.integers(0, 1 << bits, (rows, cols))
    s = rng.uniform(0.5, 2.0, (rows, ng)) * rng.choice([-1.0, 1.0], (rows, ng)) * mag
    b = rng.uniform(-8.0, 8.0, (rows, ng)) * mag
    s16, b16 = f32_to_bf16(s.astype(np.float32)), f32_to_bf16(b.astype(np.float32))
    sv = ref_scales(s16, rows, True)
    assert np.abs(sv - sv.astype(np.float16)).max() > 0.1 * mag  # float16 cannot hold them: the cases tell
    return (dtype, pack_q(q, bits), s16, b16, rows, cols, gs)


for name, dtype, gs in (("q8g32", Q8, 32), ("q8g64", Q8, 64), ("q4g32", Q4, 32), ("q4g64", Q4, 64)):
    for mag in (1e-7, 1e-30):
        for T in (1, 5, 11):
            case("matmul", f"bf16-extreme{mag:.0e}-{name}-13x{4 * gs}-T{T}",
                 lambda rng, d=dtype, g=gs, m=mag, T=T: build_bf16_extreme(rng, d, 13, 4 * g, g, m)
                 + (randn(rng, T, 4 * g) * np.float32(1 / m),),
                 ref_matmul, TOL_DOT, scale_bf16=True)
            case("matmul", f"bf16-extreme{mag:.0e}-int8-{name}-13x{4 * gs}-T{T}",
                 lambda rng, d=dtype, g=gs, m=mag, T=T: build_bf16_extreme(rng, d, 13, 4 * g, g, m)
                 + (randn(rng, T, 4 * g) * np.float32(1 / m), True),
                 ref_matmul_int8, TOL_DOT, scale_bf16=True)
        for r in (0, 12):  # tol 0: a get_row of ~1e-30 values that is off at all fails
            case("get_row", f"bf16-extreme{mag:.0e}-{name}-13x{4 * gs}-r{r}",
                 lambda rng, d=dtype, g=gs, m=mag, r=r: build_bf16_extreme(rng, d, 13, 4 * g, g, m) + (r,),
                 lambda *a, scale_bf16: ref_dequant(*a[:7], scale_bf16=scale_bf16)[a[7]].astype(np.float32), 0.0,
                 scale_bf16=True)


def x_with_zero_group(rng, T, cols, gs):
    x = randn(rng, T, cols)
    x[0, :gs] = 0.0  # m = 0: xq = 0, d = 0
    return x


# int8 activations: every group size the kernels take; T = 1 (decode, rows straight from their packed
# form) and more (prefill: unpacked rows in 2-row tiles, odd row counts leave one
# row; 4096 columns make blocks of 48 tokens, so T = 50 crosses a block with a 2-token tail); enough rows
# to be split over the thread pool in the 257-row cases.
for name, dtype in (("q8", Q8), ("q4", Q4)):
    for sname, kw in scale_dtypes(dtype):
        for gs, rows, cols, Ts in ((32, 13, 96, (1, 3, 8, 9, 14)), (64, 13, 192, (1, 3, 8, 9, 14)),
                                   (128, 13, 384, (1, 3, 8, 9, 14)), (64, 257, 1024, (1, 3, 8, 9, 14)),
                                   (256, 9, 512, (1, 3, 8, 9, 14)), (64, 7, 4096, (50,)), (32, 5, 4096, (50,))):
            for T in Ts:
                case("matmul", f"int8-{name}g{gs}{sname}-{rows}x{cols}-T{T}",
                     lambda rng, d=dtype, g=gs, r=rows, c=cols, T=T, kw=kw: build_weight(rng, d, r, c, g, **kw)
                     + (x_with_zero_group(rng, T, c, g), True),
                     ref_matmul_int8, TOL_DOT, **kw)

# int8 activations in prefill on CUDA's tensor-core kernel (csrc/backend/cuda/matmul_mma.cu, T >= 16; tiles of 128
# rows x 32 tokens below T = 48, 64 x 64 from there): rows not a multiple of a tile, chunk counts (cols / 32 for
# q4, / 16 for q8) under 32 (lanes of the butterfly with no chunk), odd and over 32 but not a multiple of it.
for name, dtype in (("q8", Q8), ("q4", Q4)):
    for sname, kw in scale_dtypes(dtype):
        for gs, rows, cols in ((32, 70, 1056), (64, 13, 192), (128, 130, 384)):
            for T in (16, 33, 100):
                case("matmul", f"int8-prefill-{name}g{gs}{sname}-{rows}x{cols}-T{T}",
                     lambda rng, d=dtype, g=gs, r=rows, c=cols, T=T, kw=kw: build_weight(rng, d, r, c, g, **kw)
                     + (x_with_zero_group(rng, T, c, g), True),
                     ref_matmul_int8, TOL_DOT, **kw)

for name, dtype, gs, cols in WEIGHTS:
    # get_row is the dequantised row exactly: s * q is exact in fp32 (11-bit or, bf16, 8-bit x 8-bit
    # significands), so the kernel's one rounding of (+ bias) equals the exact float64 value rounded once.
    for sname, kw in scale_dtypes(dtype):
        for r in (0, 1, 12):
            case("get_row", f"{name}{sname}-13x{cols}-r{r}",
                 lambda rng, d=dtype, g=gs, c=cols, r=r, kw=kw: build_weight(rng, d, 13, c, g, **kw) + (r,),
                 lambda *a, scale_bf16=False: ref_dequant(*a[:7], scale_bf16=scale_bf16)[a[7]].astype(np.float32),
                 0.0, **kw)

# embed: the rows of a list of ids (T = 6, repeats, both ends), each exact as get_row's.
for name, dtype, gs, cols in WEIGHTS:
    for sname, kw in scale_dtypes(dtype):
        case("embed", f"{name}{sname}-13x{cols}-T6",
             lambda rng, d=dtype, g=gs, c=cols, kw=kw: build_weight(rng, d, 13, c, g, **kw)
             + (np.array([12, 0, 1, 5, 1, 12], np.int32),),
             lambda *a, scale_bf16=False: ref_dequant(*a[:7], scale_bf16=scale_bf16)[a[7]].astype(np.float32),
             0.0, **kw)


# ---------------------------------------------------------------- norms, rope, silu


def ref_rmsnorm(x, w, eps, zc):
    x = f64(x)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + f64(w) if zc else f64(w))


def ref_l2norm(x, eps, scale):
    x = f64(x)
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + eps) * scale


def build_rows(rng, *shape, scale=3.0):
    x = randn(rng, *shape, scale=scale)
    x.reshape(-1, shape[-1])[0] *= 1e-4  # a tiny row, where eps matters
    return x


def norm_weight(rng, n, zero_centered):
    return randn(rng, n, scale=0.1) + np.float32(0.0 if zero_centered else 1.0)  # stored near 0 when zc


for T in (1, 3, 17):
    for n in (60, 130):
        for zc in (True, False):
            case("rmsnorm", f"T{T}-n{n}-{'zc' if zc else 'plain'}",
                 lambda rng, T=T, n=n, zc=zc: (build_rows(rng, T, n), norm_weight(rng, n, zc), 1e-6, zc),
                 ref_rmsnorm, TOL_ELEM)
for T, H, n, scale in ((1, 1, 60, 1.0), (3, 3, 96, 96 ** -0.5), (17, 6, 130, 1.0)):
    case("l2norm", f"T{T}-H{H}-n{n}-s{scale:.3g}",
         lambda rng, T=T, H=H, n=n, s=scale: (build_rows(rng, T, H, n), 1e-6, s),
         ref_l2norm, TOL_ELEM)


def ref_rope(x, rot, pos0, theta):
    half, y = rot // 2, f64(x).copy()
    # inv_freq = 1 / theta^(2i/rot) held in fp32, as HF computes it (the kernel mirrors that); the
    # rest in float64. Positions stay <= 50, so a 1-ulp difference in inv_freq moves angles < 1e-5.
    inv = f64(np.float32(1.0 / theta ** (np.arange(half) * 2.0 / rot)))
    ang = (pos0 + np.arange(x.shape[0]))[:, None, None] * inv  # [T, 1, half]
    x1, x2 = y[..., :half].copy(), y[..., half:rot].copy()
    y[..., :half] = x1 * np.cos(ang) - x2 * np.sin(ang)
    y[..., half:rot] = x2 * np.cos(ang) + x1 * np.sin(ang)
    return y  # dims >= rot pass through unchanged


for T, H, hd, rot, pos0, theta in ((1, 1, 64, 64, 0, 1e4), (3, 3, 96, 32, 7, 1e7), (17, 5, 130, 64, 30, 1e7),
                                   (17, 6, 60, 60, 0, 1e6), (1, 3, 96, 24, 49, 1e7)):
    case("rope", f"T{T}-H{H}-hd{hd}-rot{rot}-p{pos0}",
         lambda rng, T=T, H=H, hd=hd, rot=rot, p=pos0, th=theta: (randn(rng, T, H, hd), rot, p, th),
         ref_rope, TOL_ELEM)


def sigmoid(g):
    return 0.5 * (1.0 + np.tanh(0.5 * f64(g)))  # no overflow at large |g|


for T, n in ((1, 60), (3, 96), (17, 130)):
    case("silu_mul", f"T{T}-n{n}", lambda rng, T=T, n=n: (randn(rng, T, n, scale=8.0), randn(rng, T, n)),
         lambda g, u: f64(g) * sigmoid(g) * f64(u), TOL_ELEM)
    case("sigmoid_mul", f"T{T}-n{n}", lambda rng, T=T, n=n: (randn(rng, T, n, scale=8.0), randn(rng, T, n)),
         lambda g, x: f64(x) * sigmoid(g), TOL_ELEM)
# Gates across and beyond the range where exp(-g) is clamped (|g| > 87): saturated ends, no inf or nan.
EXTREME_GATES = np.concatenate([np.linspace(-120, 120, 241), [-1e4, -88.5, -87.2, 87.2, 88.5, 1e4]]).astype(np.float32)
case("silu_mul", "extremes", lambda rng: (EXTREME_GATES[None, :], np.ones((1, EXTREME_GATES.size), np.float32)),
     lambda g, u: f64(g) * sigmoid(g) * f64(u), TOL_ELEM)
case("sigmoid_mul", "extremes", lambda rng: (EXTREME_GATES[None, :], np.ones((1, EXTREME_GATES.size), np.float32)),
     lambda g, x: f64(x) * sigmoid(g), TOL_ELEM)

# gate_rows: out[t] * sigmoid(g[t]), the shared expert's gate: one sigmoid and one product per output.
for T, n in ((1, 60), (3, 96), (17, 130)):
    case("gate_rows", f"T{T}-n{n}", lambda rng, T=T, n=n: (randn(rng, T, n), randn(rng, T, scale=8.0)),
         lambda x, g: f64(x) * sigmoid(g)[:, None], TOL_ELEM)
case("gate_rows", "extremes", lambda rng: (randn(rng, EXTREME_GATES.size, 5), EXTREME_GATES),
     lambda x, g: f64(x) * sigmoid(g)[:, None], TOL_ELEM)

# add (the residual): one fp32 addition per element, correctly rounded. The float64 sum of two fp32 values
# rounded to fp32 is that same value (rounding twice is harmless for + when 53 >= 2·24 + 2), so exact;
# y is small next to x, so that the sums round.
for shape in ((1, 60), (3, 130), (17, 1000)):
    case("add", "x".join(map(str, shape)), lambda rng, s=shape: (randn(rng, *s), randn(rng, *s, scale=1e-3)),
         lambda x, y: (f64(x) + f64(y)).astype(np.float32), 0.0)


# ---------------------------------------------------------------- attention


def ref_attention(q, kc, vc, pos0, scale):
    T, nh, hd = q.shape
    group, out = nh // kc.shape[1], np.zeros(q.shape)
    for t in range(T):
        n = pos0 + t + 1  # causal: query t sees cache positions [0, pos0 + t]
        for h in range(nh):
            s = f64(kc[:n, h // group]) @ f64(q[t, h]) * scale
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ f64(vc[:n, h // group])
    return out


def build_attention(rng, T, pos0, nh, nkv, hd):
    ctx = pos0 + T + 3
    kc, vc = randn(rng, ctx, nkv, hd), randn(rng, ctx, nkv, hd)
    kc[pos0 + T:] = vc[pos0 + T:] = np.nan  # beyond the filled cache: must never be read
    return randn(rng, T, nh, hd, scale=2.0), kc, vc, pos0, hd ** -0.5


# Scores are hd-term fp32 dots (|s| <~ 10); exp turns an absolute score error into the same relative
# weight error, and the output is a convex combination of v, so TOL_DOT applies.
# The kernel takes 4 tokens and 8 keys per step: the cases cover partial token and key blocks, a first
# chunk (pos0 0) and a later one, grouped heads; and contexts of several of the Metal kernel's 256-key
# chunks (decode there takes its flash-decoding split), one at head_dim 256.
for T, pos0, nh, nkv, hd in ((1, 0, 4, 4, 60), (1, 40, 5, 5, 96), (3, 5, 6, 2, 96), (17, 0, 3, 1, 130),
                             (17, 20, 6, 2, 60), (9, 13, 8, 2, 64), (6, 0, 6, 2, 40), (1, 700, 4, 2, 64),
                             (2, 300, 2, 1, 256)):
    case("attention", f"T{T}-pos{pos0}-h{nh}kv{nkv}-hd{hd}",
         lambda rng, a=(T, pos0, nh, nkv, hd): build_attention(rng, *a), ref_attention, TOL_DOT)

# The gated query projection [T, nh, 2·hd] (per head: query | gate) split into q and gate [T, nh, hd], and
# rows [pos0, pos0 + T) of a KV cache [ctx, row] written (the other rows kept): copies, so exact.
for T, nh, hd in ((1, 4, 64), (5, 3, 60), (17, 2, 130)):
    case("split_q_gate", f"T{T}-h{nh}-hd{hd}", lambda rng, a=(T, nh, 2 * hd): (randn(rng, *a),),
         lambda q2: (q2[..., :q2.shape[2] // 2], q2[..., q2.shape[2] // 2:]), 0.0, 0.0)


def ref_kv_write(cache, src, pos0):
    out = f64(cache).copy()
    out[pos0:pos0 + src.shape[0]] = src
    return out


for ctx, row, pos0, T in ((8, 120, 0, 1), (20, 96, 7, 5), (20, 256, 3, 17), (33, 60, 32, 1)):
    case("kv_write", f"ctx{ctx}-row{row}-pos{pos0}-T{T}",
         lambda rng, c=ctx, r=row, p=pos0, T=T: (randn(rng, c, r), randn(rng, T, r), p), ref_kv_write, 0.0)


# ---------------------------------------------------------------- Gated DeltaNet


def ref_conv1d_silu(x, state, w):
    T, K = x.shape[0], w.shape[1]
    xx = np.concatenate([f64(state), f64(x)])  # [K-1+T, C], oldest first
    a = sum(f64(w[:, j]) * xx[j:j + T] for j in range(K))
    return a / (1.0 + np.exp(-a)), xx[T:]  # new state: the last K-1 inputs


# T above, at and below K-1 (the state update's two paths); the state is a pure copy, so exact.
for T, C, K in ((1, 60, 4), (2, 130, 4), (3, 96, 4), (17, 60, 4), (5, 130, 2), (1, 96, 2)):
    case("conv1d_silu", f"T{T}-C{C}-K{K}",
         lambda rng, T=T, C=C, K=K: (randn(rng, T, C), randn(rng, K - 1, C), randn(rng, C, K, scale=0.5)),
         ref_conv1d_silu, TOL_DOT, 0.0)


def ref_gated_delta(q, k, v, g, beta, S):
    """The recurrent form of DESIGN.md §3, one token and one value head at a time."""
    T, Hk, _ = q.shape
    Hv = v.shape[1]
    S, out = f64(S).copy(), np.zeros(v.shape)
    for t in range(T):
        for h in range(Hv):
            kh = h // (Hv // Hk)
            qt, kt = f64(q[t, kh]), f64(k[t, kh])
            S[h] *= np.exp(g[t, h])
            u = f64(v[t, h]) - S[h].T @ kt
            S[h] += np.outer(kt, beta[t, h] * u)
            out[t, h] = S[h].T @ qt
    return out, S


def build_gated_delta(rng, T, Hk, Hv, dk, dv):
    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(randn(rng, T, Hk, dk)) / np.sqrt(dk)  # as the model feeds it: l2-normalised, q scaled
    k = unit(randn(rng, T, Hk, dk))
    g = -rng.uniform(0.0, 2.0, (T, Hv))            # log-decay, <= 0
    beta = rng.uniform(0.0, 1.0, (T, Hv))
    f = np.float32
    return (q.astype(f), k.astype(f), randn(rng, T, Hv, dv), g.astype(f), beta.astype(f),
            randn(rng, Hv, dk, dv, scale=0.5))  # nonzero initial state


# With unit k and beta, g in range, each step's map S -> e^g (I - beta k kᵀ) S is a contraction, so
# rounding does not grow over T; every step is dk-term fp32 dots: TOL_DOT for output and state.
GATED_DELTA = [(1, 2, 4, 32, 48), (3, 1, 3, 60, 20), (17, 2, 6, 24, 20), (17, 3, 3, 96, 32), (5, 2, 4, 20, 60)]
for T, Hk, Hv, dk, dv in GATED_DELTA:
    case("gated_delta", f"T{T}-Hk{Hk}-Hv{Hv}-dk{dk}-dv{dv}",
         lambda rng, a=(T, Hk, Hv, dk, dv): build_gated_delta(rng, *a), ref_gated_delta, TOL_DOT, TOL_DOT)


# The chunked (WY / UT-transform) form against the same float64 recurrent reference, on the awkward
# sizes: T below, at and above a chunk and over several chunks (a partial last chunk), dk != dv and not
# multiples of the kernels' 16-column tiles, Hv/Hk = 1, 2, 3, chunks of 16 and 64 (0: the op's
# default), and the decay and beta extremes: g very negative (e^g underflows to 0 inside a chunk; one
# -1e30 exercises the clamp) or ~0 (no forgetting: the state carries over whole), beta ~0 (no write)
# or ~1 (overwrite). Tolerance TOL_DOT, as the recurrent form: the chunked form computes the same sums
# associated differently, dk-term dots (Q S0, K S0, the Gram matrices) and <= C-term ones (M U, Kᵀ U)
# whose terms are no larger than the recurrent form's: every decay e^{γ_i - γ_j} <= 1 (exp of a
# difference of cumulative log-decays, never a quotient), and U = (I + A)⁻¹ R holds exactly the
# recurrence's own u_i. Observed here: <= 2.2e-7 on outputs, 5.7e-7 on states (1.3e-6 over a wider
# random sweep, where the recurrent C op's own error reaches 1.8e-6); chunked vs recurrent C <= 1e-6.
def build_gated_delta_chunk(rng, T, Hk, Hv, dk, dv, chunk, g_kind, b_kind):
    q, k, v, g, beta, S = build_gated_delta(rng, T, Hk, Hv, dk, dv)
    if g_kind == "strong":  # e^g ~ e^-5 .. e^-100 per token
        g = -rng.uniform(5.0, 100.0, (T, Hv))
        g.flat[rng.integers(g.size)] = -1e30
    elif g_kind == "flat":
        g = -rng.uniform(0.0, 1e-3, (T, Hv))
    if b_kind == "0":
        beta = rng.uniform(0.0, 1e-3, (T, Hv))
    elif b_kind == "1":
        beta = 1.0 - rng.uniform(0.0, 1e-3, (T, Hv))
    f = np.float32
    return q, k, v, g.astype(f), beta.astype(f), S, chunk


GATED_DELTA_CHUNK = [(1, 2, 4, 60, 36, 64, "mixed", "u"), (63, 1, 1, 60, 36, 16, "mixed", "u"),
                     (63, 2, 6, 36, 60, 64, "mixed", "u"), (64, 2, 2, 60, 36, 64, "flat", "1"),
                     (64, 1, 3, 60, 36, 16, "strong", "0"), (65, 2, 4, 36, 60, 64, "strong", "1"),
                     (65, 1, 2, 60, 36, 16, "flat", "0"), (130, 2, 6, 60, 36, 64, "mixed", "u"),
                     (130, 3, 3, 32, 48, 16, "flat", "1"), (130, 1, 2, 128, 128, 0, "mixed", "u")]
for T, Hk, Hv, dk, dv, C, gk, bk in GATED_DELTA_CHUNK:
    case("gated_delta_chunk", f"T{T}-Hk{Hk}-Hv{Hv}-dk{dk}-dv{dv}-C{C}-g{gk}-b{bk}",
         lambda rng, a=(T, Hk, Hv, dk, dv, C, gk, bk): build_gated_delta_chunk(rng, *a),
         lambda *a: ref_gated_delta(*a[:6]), TOL_DOT, TOL_DOT)

# The interface's gated_delta: the backend picks the form (the CPU: recurrent for one token, chunked for
# more), on the cases of both forms, against the same reference with the same tolerance.
for T, Hk, Hv, dk, dv in GATED_DELTA:
    case("gated_delta_auto", f"T{T}-Hk{Hk}-Hv{Hv}-dk{dk}-dv{dv}",
         lambda rng, a=(T, Hk, Hv, dk, dv): build_gated_delta(rng, *a), ref_gated_delta, TOL_DOT, TOL_DOT)
for T, Hk, Hv, dk, dv, _, gk, bk in GATED_DELTA_CHUNK:
    case("gated_delta_auto", f"T{T}-Hk{Hk}-Hv{Hv}-dk{dk}-dv{dv}-g{gk}-b{bk}",
         lambda rng, a=(T, Hk, Hv, dk, dv, 0, gk, bk): build_gated_delta_chunk(rng, *a)[:6],
         ref_gated_delta, TOL_DOT, TOL_DOT)

# ... from positions pos0 not a multiple of 16, where a backend's chunks (ending at multiples of 16 in
# absolute position) cut the call unevenly: T over several chunks with partial ones at both ends, a 1-token
# first chunk (pos0 15 or 31: the recurrent step), a 1-token last one, two 1-token chunks (T 2 at pos0 15),
# T below 16 inside one chunk and across a boundary; dk below 16, dk = dv = 128 and the real models' heads
# (Qwen3.5-35B and Qwen3-Next: 16 key heads, 32 value heads; Qwen3.5-397B and 122B: 64 value heads), dk 256
# (CUDA's widest chunked form) and 300 (past it: CUDA's recurrent form for every token), dv past a
# 128-column block; the decay and beta extremes of the chunked cases. Same reference, same tolerance: the
# sums are the same ones, associated differently (as the CPU's chunked form's, above).
GATED_DELTA_POS = [(40, 2, 4, 32, 48, 5, "mixed", "u"), (33, 1, 3, 60, 20, 15, "mixed", "u"),
                   (18, 2, 6, 24, 20, 31, "strong", "1"), (7, 2, 4, 20, 60, 3, "mixed", "u"),
                   (9, 1, 2, 36, 60, 12, "flat", "0"), (2, 2, 4, 32, 48, 15, "mixed", "u"),
                   (49, 1, 2, 8, 130, 1, "mixed", "u"), (40, 1, 2, 128, 128, 9, "strong", "0"),
                   (37, 16, 32, 128, 128, 7, "mixed", "u"), (37, 16, 64, 128, 128, 27, "flat", "1"),
                   (20, 1, 2, 256, 40, 3, "mixed", "u"), (20, 1, 1, 300, 24, 6, "mixed", "u")]
# Metal's kernel takes dk up to 128 (the models' 128; FM_GDN_MAX_DK): past it, a clear error there.
METAL_MAX_DK = 128
for T, Hk, Hv, dk, dv, p0, gk, bk in GATED_DELTA_POS:
    case("gated_delta_auto", f"T{T}-Hk{Hk}-Hv{Hv}-dk{dk}-dv{dv}-pos{p0}-g{gk}-b{bk}",
         lambda rng, a=(T, Hk, Hv, dk, dv, 0, gk, bk): build_gated_delta_chunk(rng, *a)[:6],
         lambda *a, pos0: ref_gated_delta(*a), TOL_DOT, TOL_DOT, pos0=p0,
         refused_by=("metal",) if dk > METAL_MAX_DK else ())


# DeltaNet's conv output [T, 2·kd + vd] split into q, k [T, kd] and v [T, vd]: copies, so exact.
for T, kd, vd in ((1, 32, 48), (5, 60, 36), (17, 128, 256)):
    case("deltanet_split", f"T{T}-kd{kd}-vd{vd}",
         lambda rng, T=T, kd=kd, vd=vd: (randn(rng, T, 2 * kd + vd), kd, vd),
         lambda conv, kd, vd: (conv[:, :kd], conv[:, kd:2 * kd], conv[:, 2 * kd:]), 0.0, 0.0, 0.0)


def ref_deltanet_gates(b, a, A_log, dt_bias):
    """beta = sigmoid(b), g = -exp(A_log) · softplus(a + dt_bias) (HF Qwen3NextGatedDeltaNet)."""
    return sigmoid(b), -np.exp(f64(A_log)) * np.logaddexp(0.0, f64(a) + f64(dt_bias))


def build_deltanet_gates(rng, T, Hv, extremes=False):
    A_log = np.log(rng.uniform(1.0, 16.0, Hv)).astype(np.float32)  # as HF initialises it: A in [1, 16)
    dt_bias = randn(rng, Hv)
    if extremes:  # sigmoid's clamp on b; softplus from underflow (e^-120) past its linear branch (x > 20) on a
        return EXTREME_GATES[None, :], np.linspace(-120, 30, Hv).astype(np.float32)[None, :], A_log, dt_bias
    return randn(rng, T, Hv, scale=4.0), randn(rng, T, Hv, scale=4.0), A_log, dt_bias


# A handful of correctly rounded fp32 operations per output (a + dt_bias, expf, log1pf, the product; libm's
# expf and log1pf are within 1 ulp), so TOL_ELEM; where softplus amplifies the rounding of a + dt_bias
# (relatively by |x| for x << 0) its value is below e^-20, far under the normalisation.
for T, Hv in ((1, 4), (5, 16), (17, 48)):
    case("deltanet_gates", f"T{T}-Hv{Hv}", lambda rng, T=T, Hv=Hv: build_deltanet_gates(rng, T, Hv),
         ref_deltanet_gates, TOL_ELEM, TOL_ELEM)
case("deltanet_gates", "extremes", lambda rng: build_deltanet_gates(rng, 1, EXTREME_GATES.size, extremes=True),
     ref_deltanet_gates, TOL_ELEM, TOL_ELEM)


# ---------------------------------------------------------------- router


def build_logits(rng, n, kind):
    return rng.integers(-3, 4, n).astype(np.float32) if kind == "ties" else randn(rng, n, scale=3.0)


def ref_topk_softmax(logits, k, norm):
    """The router's contract (csrc/backend/cuda/route.cu's header): the top k by logit, descending, NaN after
    every number (after -inf), equal logits (-0.0 and +0.0 too) and NaNs the lower index first; weights
    softmax(logits) with exp(l - max) taken as 1 where l is the max of the numbers (so an inf max, or all
    -inf, gives shares, not inf - inf), NaN for every choice of a row holding a NaN."""
    l = f64(logits)
    mx = np.max(l[~np.isnan(l)], initial=-np.inf)
    with np.errstate(invalid="ignore"):
        p = np.where(l == mx, 1.0, np.exp(l - mx))
    p /= p.sum()
    idx = np.argsort(-l, kind="stable")[:k]  # descending; numpy sorts NaN last; ties keep the lower index
    w = p[idx]
    return idx, (w / w.sum() if norm else w)


for n, k, norm, kind in ((60, 4, True, "randn"), (60, 4, False, "randn"), (130, 10, True, "randn"),
                         (512, 10, False, "randn"), (512, 1, True, "randn"), (7, 7, False, "randn"),
                         (64, 8, True, "ties"), (64, 8, False, "ties")):
    # "ties": integer logits, so many exact ties, some straddling the k-th place. The CPU convention
    # (lower index first, as torch.topk on CPU) is part of the contract so backends route identically.
    case("topk_softmax", f"n{n}-k{k}-{'norm' if norm else 'raw'}-{kind}",
         lambda rng, n=n, k=k, norm=norm, kind=kind: (build_logits(rng, n, kind), k, norm),
         ref_topk_softmax, 0, TOL_PROB)


def ref_route(logits, k, norm):
    rows = [ref_topk_softmax(row, k, norm) for row in logits]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


# route: topk_softmax of each token's logits [T, E]; norm on and off, ties.
for T, E, k, norm, kind in ((3, 60, 4, True, "randn"), (3, 60, 4, False, "randn"), (17, 512, 10, True, "randn"),
                            (17, 512, 10, False, "randn"), (9, 64, 8, True, "ties"), (9, 64, 8, False, "ties")):
    case("route", f"T{T}-E{E}-k{k}-{'norm' if norm else 'raw'}-{kind}",
         lambda rng, T=T, E=E, k=k, norm=norm, kind=kind: (np.stack([build_logits(rng, E, kind) for _ in range(T)]),
                                                           k, norm),
         ref_route, 0, TOL_PROB)


# ---------------------------------------------------------------- argmax (a greedy step's token)


def ref_argmax(x):
    """The sampler's greedy token: the lowest index holding the largest number (-0.0 ties +0.0), NaN never
    chosen, 0 when every value is NaN."""
    num = ~np.isnan(x)
    if not num.any():
        return np.array([0], dtype=np.int32)
    return np.array([np.flatnonzero(num & (x == x[num].max()))[0]], dtype=np.int32)


def build_argmax(rng, n, kind):
    x = randn(rng, n, scale=3.0)
    nan, inf = np.float32(np.nan), np.float32(np.inf)
    if kind == "ties":  # integers: the largest held by many ids, across the kernels' blocks of 4096
        x = rng.integers(-50, 3, n).astype(np.float32)
    elif kind == "late":  # the largest at the last id, NaNs before it
        x[rng.choice(n - 1, min(n - 1, 9), replace=False)] = nan
        x[-1] = x.max() + 1
    elif kind == "zeros":  # every number negative but zeros of both signs, -0.0 first (they tie: it wins)
        x = -np.abs(x) - 1
        at = np.sort(rng.choice(n, min(n, 7), replace=False))
        x[at] = np.float32(0.0)
        x[at[0]] = np.float32(-0.0)
    elif kind == "nan_top":  # NaN first and at the would-be largest; +inf twice
        x[x.argmax()] = nan
        x[0] = nan
        x[rng.choice(np.arange(1, n), min(n - 1, 2), replace=False)] = inf
    elif kind == "all_nan":
        x[:] = nan
    elif kind == "minus_inf":  # NaN and -inf only
        x[:] = -inf
        x[rng.choice(n, n // 2, replace=False)] = nan
    return (x,)


for n, kind in ((1, "randn"), (7, "ties"), (4096, "randn"), (4097, "late"), (9000, "ties"), (12289, "zeros"),
                (248320, "randn"), (248320, "ties"), (248320, "late"), (5000, "nan_top"), (300, "all_nan"),
                (4100, "minus_inf")):
    case("argmax", f"n{n}-{kind}", lambda rng, n=n, kind=kind: build_argmax(rng, n, kind), ref_argmax, 0)


def build_nonfinite_logits(rng, E, k):
    """Logits [13, E] (E >= 5), a token per pattern of NaN and ±inf over randn ones (nan_some, minus_infs:
    k - 2 numbers left, so 2 NaNs, or 2 -inf, are chosen after them)."""
    nan, inf = np.float32(np.nan), np.float32(np.inf)
    rows = randn(rng, 13, E, scale=3.0)
    pick = [rng.choice(E, n, replace=False) for n in (5, min(E, E - k + 2), 1, 3, 3, 1, min(E, E - k + 2), 3)]
    rows[0, 0] = nan                                          # nan_first
    rows[1, rows[1].argmax()] = nan                           # nan_top: the would-be first choice
    rows[2, pick[0]] = nan                                    # nans
    rows[3, pick[1]] = nan                                    # nan_some
    rows[4] = nan                                             # nan_all
    rows[5, pick[2]] = inf                                    # inf
    rows[6, pick[3]] = inf                                    # infs: tied, 1/3 each
    rows[7, pick[4][:2]], rows[7, pick[4][2]] = inf, nan      # inf_nan
    rows[8, pick[5]] = -inf                                   # minus_inf
    rows[9, pick[6]] = -inf                                   # minus_infs: 2 chosen, weight 0
    rows[10] = -inf                                           # minus_inf_all: 1/E each
    rows[11, pick[7]] = (inf, -inf, nan)                      # mixed
    rows[12] = nan                                            # minus_inf_nans: the -inf, then NaNs
    rows[12, pick[7][0]] = -inf
    return rows


# route on non-finite logits: indices and weights as the contract says (NaN weights where the reference has
# them, the rest within TOL_PROB); E = 7, k = 7 takes every logit, so the whole order.
for E, k, norm in ((60, 8, True), (60, 8, False), (512, 10, True), (7, 7, False), (40, 1, True)):
    case("route", f"E{E}-k{k}-{'norm' if norm else 'raw'}-nonfinite",
         lambda rng, E=E, k=k, norm=norm: (build_nonfinite_logits(rng, E, k), k, norm),
         ref_route, 0, TOL_PROB)


# ---------------------------------------------------------------- MoE: routed experts, combine


def build_moe_combine(rng, T, k, h):
    """out [T, h], ye [T·k, h] (each token's k expert rows, in an order the experts wrote them), row and
    router-like weights [T, k] (positive, summing to 0.5..1)."""
    p = np.exp(rng.standard_normal((T, k)))
    w = p / p.sum(axis=1, keepdims=True) * rng.uniform(0.5, 1.0, (T, 1))
    return (randn(rng, T, h), randn(rng, T * k, h), rng.permutation(T * k).reshape(T, k).astype(np.int32),
            w.astype(np.float32))


def ref_moe_combine(out, ye, row, w):
    return f64(out) + np.einsum("tj,tjh->th", f64(w), f64(ye)[row])


# out[t] + Σ_j w[t, j] · ye[row[t, j]], in fp32 in order: 2k roundings of partial sums bounded by
# |out| + max|ye| (the weights are >= 0 and sum to <= 1), <= 2k·2^-24·(that) ~ 3e-6 of max|ref| at k = 10:
# TOL_ELEM.
for T, k, h in ((1, 4, 60), (3, 1, 64), (5, 8, 130), (17, 10, 96)):
    case("moe_combine", f"T{T}-k{k}-h{h}", lambda rng, T=T, k=k, h=h: build_moe_combine(rng, T, k, h),
         ref_moe_combine, TOL_ELEM)


def build_experts(rng, dtype, gs, H, I, T, sizes, scale_bf16=False):
    """xn [T, H] and one (gate [I, H], up [I, H], down [H, I], tok) per size: tok that many distinct tokens,
    in no order (the op gathers them)."""
    kw = {"scale_bf16": True} if scale_bf16 else {}
    experts = [(build_weight(rng, dtype, I, H, gs, **kw), build_weight(rng, dtype, I, H, gs, **kw),
                build_weight(rng, dtype, H, I, gs, **kw), rng.permutation(T)[:n].astype(np.int32)) for n in sizes]
    return randn(rng, T, H), experts


def ref_experts(xn, experts, scale_bf16=False):
    """Each expert's rows y = down(silu(gate x) · up x) over its tokens, the experts' rows one after another."""
    ys = []
    for gate, up, down, tok in experts:
        x = f64(xn)[tok]
        g = x @ ref_dequant(*gate, scale_bf16=scale_bf16).T
        u = x @ ref_dequant(*up, scale_bf16=scale_bf16).T
        ys.append((g * sigmoid(g) * u) @ ref_dequant(*down, scale_bf16=scale_bf16).T)
    return np.concatenate(ys)


# The routed experts' FFN, with the weights of the matmul cases (H, I awkward where the dtype allows: not
# multiples of 4-row tiles or of 8 lanes) and fp32 activations (int8 ones are the matmul cases'). Token groups:
# a decode step (4 experts of the one token, read in place), a small chunk (every expert <= 64 tokens: one
# per thread, side by side), a mixed one (70, 100 and 65 tokens split over the pool, the rest side by side;
# 64 is the most a lane takes), and one with a single small expert (run alone). threads 1: every expert
# over the pool; 2: the side-by-side lanes too. Tolerance TOL_DOT, as the matmuls': each output is an
# I-term fp32 dot of h = silu(g)·u, whose own error is that of the H-term gate and up dots (silu's
# relative condition number is <= 1.1 where it is not small) plus two roundings. Observed here: <= 1.0e-6
# (q4 with bf16 scales, AVX2), <= 3e-7 for f32 and bf16 weights.
EXPERT_WEIGHTS = [("f32", F32, 0, 130, 60), ("bf16", BF16, 0, 96, 130), ("q8g64", Q8, 64, 192, 128),
                  ("q4g32", Q4, 32, 192, 96)]
EXPERT_GROUPS = [("decode", 1, (1, 1, 1, 1)), ("small", 20, (7, 1, 20, 3, 12)),
                 ("mixed", 100, (70, 5, 33, 1, 100, 64, 65)), ("one-small", 80, (80, 9))]
for name, dtype, gs, H, I in EXPERT_WEIGHTS:
    for sname, kw in scale_dtypes(dtype):
        for group, T, sizes in EXPERT_GROUPS:
            for threads in (1, 2):
                case("experts", f"{name}{sname}-H{H}-I{I}-{group}-t{threads}",
                     lambda rng, a=(dtype, gs, H, I, T, sizes), kw=kw: build_experts(rng, *a, **kw),
                     ref_experts, TOL_DOT, threads=threads, **kw)


# ---------------------------------------------------------------- the harness


def normalised_error(out, ref):
    out, ref = f64(out), f64(ref)
    return float(np.max(np.abs(out - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def case_args(c):
    return c.build(np.random.default_rng(zlib.crc32(f"{c.op}-{c.id}".encode())))


def run_op(target, op, args, c):
    """The outputs of op (case c's, or another taking its arguments) on target, with c's keyword arguments and
    thread count; skips where the backend's table lacks the op."""
    kwargs = c.kwargs if op in CPU_KERNEL_OPS else dict(c.kwargs, backend=target[0])
    with running_on(target, c.threads):
        try:
            return getattr(_core, "op_" + op)(*args, **kwargs)
        except NotImplementedError as e:
            pytest.skip(str(e))


def check_outputs(outs, refs, tols):
    if not isinstance(refs, tuple):
        outs, refs = (outs,), (refs,)
    assert len(outs) == len(refs) == len(tols)
    for i, (out, ref, tol) in enumerate(zip(outs, refs, tols)):
        out, ref = np.asarray(out), np.asarray(ref)
        assert out.shape == ref.shape, f"output {i}: shape {out.shape} != {ref.shape}"
        if ref.dtype.kind in "iu":
            np.testing.assert_array_equal(out, ref, err_msg=f"output {i}")
            continue
        nan = np.isnan(ref)  # NaN exactly where the reference has it (router weights of a NaN logit's row)
        np.testing.assert_array_equal(np.isnan(out), nan, err_msg=f"output {i}: NaN positions")
        if nan.all():
            continue
        err = normalised_error(out[~nan], ref[~nan])
        assert err <= tol, f"output {i}: normalised error {err:.3g} > {tol:g}"


@pytest.mark.parametrize("target,c", [pytest.param(t, c, id=f"{target_id(t)}-{c.op}-{c.id}")
                                      for t in TARGETS for c in CASES if t[0] == "cpu" or not c.cpu_kernel])
def test_op(target, c):
    args = case_args(c)
    if target[0] in c.refused_by:  # a shape this backend's kernels do not take: refused, saying why
        with pytest.raises(Exception, match=r"dk \d+"):
            run_op(target, c.op, args, c)
        return
    before = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    outs = run_op(target, c.op, args, c)
    for a, b in zip(args, before):  # ops take inputs by value (state is returned, not written in place)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
    check_outputs(outs, c.ref(*args, **c.kwargs), c.tol)


@pytest.mark.parametrize("target,c", [pytest.param(t, c, id=f"{target_id(t)}-{c.id}") for t in TARGETS if t[0] == "cpu"
                                      for c in CASES if c.op == "gated_delta_chunk"])
def test_gated_delta_chunk_vs_recurrent(target, c):
    """The chunked form against the C recurrent form directly: each within TOL_DOT of the float64
    reference (test_op), so within 2·TOL_DOT of each other."""
    args = case_args(c)
    chunked, recurrent = run_op(target, "gated_delta_chunk", args, c), run_op(target, "gated_delta", args[:6], c)
    for i, (a, b) in enumerate(zip(chunked, recurrent)):
        err = normalised_error(a, b)
        assert err <= 2 * TOL_DOT, f"output {i}: chunked vs recurrent normalised error {err:.3g}"


def split_at(T, pos0, cuts):
    """Calls [a, b) over tokens 0..T at positions pos0 + t, cut at the absolute positions in cuts."""
    bounds = [0] + sorted({c - pos0 for c in cuts if 0 < c - pos0 < T}) + [T]
    return list(zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("target", [pytest.param(t, id=target_id(t)) for t in TARGETS])
@pytest.mark.parametrize("T,pos0,dims", [(100, 0, (2, 4, 32, 24)), (100, 5, (2, 4, 32, 24)),
                                         (37, 15, (2, 4, 32, 24)), (33, 31, (2, 4, 32, 24)),
                                         (2, 15, (2, 4, 32, 24)), (65, 15, (2, 4, 32, 24)),
                                         (70, 9, (1, 2, 128, 128)), (40, 3, (1, 2, 256, 40))],
                         ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else None)
def test_gated_delta_same_bits_however_split(target, T, pos0, dims):
    """Batch invariance (backend.h): the interface's gated_delta over a sequence gives the same bits in one
    call as in calls cut at multiples of FM_DELTANET_CHUNK (16) positions, at every thread count. pos0 15 or
    31 makes a 1-token first chunk (the recurrent step, as a 1-token call takes), a call ending 1 past a
    multiple of 16 a 1-token last one (T 2 and 65 at pos0 15; the cut at 16 makes one too). dims: Hk, Hv, dk,
    dv (dk 128 and 256: CUDA's chunked form with 8 and 16 lanes a column)."""
    rng = np.random.default_rng(T * 100 + pos0)
    q, k, v, g, beta, S = build_gated_delta(rng, T, *dims)
    if target[0] == "metal" and dims[2] > METAL_MAX_DK:  # refused there, saying why (test_op's cases)
        with pytest.raises(Exception, match=r"dk \d+"), running_on(target):
            _core.op_gated_delta_auto(q, k, v, g, beta, S, pos0=pos0, backend="metal")
        return

    def run(calls, threads):
        state, outs = S, []
        with running_on(target, threads):
            for a, b in calls:
                o, state = _core.op_gated_delta_auto(q[a:b], k[a:b], v[a:b], g[a:b], beta[a:b], state,
                                                     pos0=pos0 + a, backend=target[0])
                outs.append(o)
        return np.concatenate(outs), state

    whole, whole_state = run([(0, T)], 1)
    check_outputs((whole, whole_state), ref_gated_delta(q, k, v, g, beta, S), (TOL_DOT, TOL_DOT))
    splits = [split_at(T, pos0, range(0, pos0 + T, 16)), split_at(T, pos0, range(0, pos0 + T, 64)),
              split_at(T, pos0, [48, 96])]
    for calls in splits:
        for threads in (1, 2):
            out, state = run(calls, threads)
            assert np.array_equal(out, whole) and np.array_equal(state, whole_state), (calls, threads)


if "cuda" in BACKENDS:  # defined only where it runs (a skip fails CI's FLASHMOE_CI_REQUIRE=all)
    @pytest.mark.parametrize("slice_chunks", [1, 2, 3])
    def test_cuda_gated_delta_slices_give_the_same_bits(slice_chunks, monkeypatch):
        """CUDA's chunked gated delta rule runs a long call in slices of chunks that reuse its scratch (64 MiB
        of per-chunk records: 7,000 tokens at 64 value heads); FLASHMOE_CUDA_GD_SLICE (tests only) makes a
        slice that many chunks: the same bits as the call in one slice, from a 1-token first chunk (pos0 15)
        and from a partial one (pos0 5), to a partial or 1-token last chunk."""
        for T, pos0 in ((70, 15), (58, 5), (44, 5)):
            rng = np.random.default_rng(T + pos0)
            args = build_gated_delta(rng, T, 2, 4, 32, 24)
            monkeypatch.delenv("FLASHMOE_CUDA_GD_SLICE", raising=False)
            whole = _core.op_gated_delta_auto(*args, pos0=pos0, backend="cuda")
            monkeypatch.setenv("FLASHMOE_CUDA_GD_SLICE", str(slice_chunks))
            sliced = _core.op_gated_delta_auto(*args, pos0=pos0, backend="cuda")
            for a, b in zip(whole, sliced):
                assert np.array_equal(a, b), (T, pos0, slice_chunks)
            check_outputs(sliced, ref_gated_delta(*args), (TOL_DOT, TOL_DOT))


if "cuda" in BACKENDS:  # defined only where it runs (a skip fails CI's FLASHMOE_CI_REQUIRE=all)
    # (dtype, group size, rows, cols, T): partial tiles of rows and tokens, chunk counts of 1 and 2 (a block's warps
    # mostly without any), under 32, odd, over 32 and not a multiple of it; groups of 3 and 6 chunks.
    IMMA_SHAPES = [(Q4, 32, 5, 32, 16), (Q8, 32, 7, 32, 47), (Q4, 64, 13, 192, 17), (Q8, 64, 13, 192, 48),
                   (Q4, 32, 70, 1056, 33), (Q8, 32, 65, 544, 100), (Q4, 128, 130, 384, 64),
                   (Q8, 128, 129, 384, 20), (Q4, 256, 9, 512, 129), (Q8, 256, 3, 4096, 31), (Q4, 96, 13, 288, 40),
                   (Q8, 96, 33, 960, 64)]

    @pytest.mark.parametrize("sname,kw", SCALE_DTYPES, ids=["f16", "bf16"])
    @pytest.mark.parametrize("dtype,gs,rows,cols,T", IMMA_SHAPES,
                             ids=[f"{'q4' if d == Q4 else 'q8'}g{g}-{r}x{c}-T{t}" for d, g, r, c, t in IMMA_SHAPES])
    def test_cuda_int8_prefill_on_tensor_cores_is_the_dp4a_kernels_bits(dtype, gs, rows, cols, T, sname, kw,
                                                                        monkeypatch):
        """CUDA's int8-activation matmul from T = 16 on (matmul_mma.cu: mma.sync's integer MMA, then fm_mm's fp32
        terms in fm_mm's order) gives the bits of fm_mm's dp4a kernel on the same inputs (FLASHMOE_CUDA_IMMA=0)
        for every (row, token): tokens of a prefill stay those of decode (batch invariance). x has a group of
        zeros (xd = 0), a token of ±1e30 (huge products) and one with an inf (NaN outputs, of the same bits: the
        same operations on the same operands, in the same order) beside N(0, 1) ones; the others within TOL_DOT
        of the float64 reference too."""
        rng = np.random.default_rng(rows * cols + T + gs)
        w = build_weight(rng, dtype, rows, cols, gs, **kw)
        x = x_with_zero_group(rng, T, cols, gs)
        x[T // 2] = np.where(rng.random(cols) < 0.5, np.float32(-1e30), np.float32(1e30))
        x[T // 3, cols // 2] = np.inf
        monkeypatch.setenv("FLASHMOE_CUDA_IMMA", "1")
        mma = _core.op_matmul(*w, x, True, **kw, backend="cuda")
        monkeypatch.setenv("FLASHMOE_CUDA_IMMA", "0")
        dp4a = _core.op_matmul(*w, x, True, **kw, backend="cuda")
        bad = np.argwhere(mma.view(np.uint32) != dp4a.view(np.uint32))
        assert bad.size == 0, f"(token, row) {bad[:8].tolist()} differ from the dp4a kernel's"
        keep = (np.arange(T) != T // 2) & (np.arange(T) != T // 3)
        check_outputs(mma[keep], ref_matmul_int8(*w, x[keep], True, **kw), (TOL_DOT,))


    # (dtype, group size, H, I, token list sizes, xn rows): experts of 4 tokens and more (FMC_IMMA_MIN_EXPERT_T) on
    # tensor cores beside smaller ones on the dp4a kernel in the same call (1, 2, 3), 4 exactly, partial token
    # tiles, a shared expert's worth (all 100), a short prompt's few tokens an expert (the last: 8-token tiles under
    # FLASHMOE_CUDA_IMMA_NARROW=auto); chunk counts under 32 (some of a block's 4 warps with none) and not a multiple
    # of 32 (warps with different counts).
    IMMA_EXPERTS = [(Q4, 32, 192, 96, (40, 9, 4, 3, 100, 1), 100), (Q8, 64, 192, 128, (33, 1, 17, 64), 70),
                    (Q4, 64, 320, 192, (16, 31, 2), 40), (Q8, 32, 96, 160, (20, 50), 60),
                    (Q4, 64, 192, 128, (3, 5, 4, 7, 3), 12)]

    @pytest.mark.parametrize("env", [{}, {"FLASHMOE_CUDA_IMMA_MIN_EXPERT_T": "1"},
                                     {"FLASHMOE_CUDA_IMMA_MIN_EXPERT_T": "1", "FLASHMOE_CUDA_IMMA_NARROW": "1"},
                                     {"FLASHMOE_CUDA_IMMA_MIN_EXPERT_T": "3", "FLASHMOE_CUDA_IMMA_NARROW": "auto"}],
                             ids=["min4", "min1", "narrow", "auto"])
    @pytest.mark.parametrize("sname,kw", SCALE_DTYPES, ids=["f16", "bf16"])
    @pytest.mark.parametrize("dtype,gs,H,I,sizes,T", IMMA_EXPERTS,
                             ids=[f"{'q4' if e[0] == Q4 else 'q8'}g{e[1]}-H{e[2]}-I{e[3]}"
                                  for e in IMMA_EXPERTS])
    def test_cuda_int8_experts_on_tensor_cores_are_the_dp4a_kernels_bits(dtype, gs, H, I, sizes, T, sname, kw,
                                                                         env, monkeypatch):
        """The routed experts' FFN on int8 activations: the experts of 4 tokens or more (min1: of any count,
        FLASHMOE_CUDA_IMMA_MIN_EXPERT_T=1; narrow: in tiles of 8 tokens; auto: the tiles
        that pad less, by FLASHMOE_CUDA_IMMA_NARROW=auto's rule) take the tensor-core kernels (gate·up
        with silu(gate)·up into h, then down), the others fm_mm's in the same call; every row the bits of the
        call on fm_mm's kernels alone (FLASHMOE_CUDA_IMMA=0)."""
        rng = np.random.default_rng(H * I + len(sizes))
        xn, experts = build_experts(rng, dtype, gs, H, I, T, sizes, **kw)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("FLASHMOE_CUDA_IMMA", "1")
        mma = _core.op_experts(xn, experts, int8_act=True, **kw, backend="cuda")
        monkeypatch.setenv("FLASHMOE_CUDA_IMMA", "0")
        dp4a = _core.op_experts(xn, experts, int8_act=True, **kw, backend="cuda")
        assert np.isfinite(dp4a).all()
        bad = np.argwhere(mma.view(np.uint32) != dp4a.view(np.uint32))
        assert bad.size == 0, f"(row, column) {bad[:8].tolist()} differ from the dp4a kernel's"


    # (dtype, group size, H, I, token list sizes, xn rows): decode's one token an expert, and up to 4 (the host's
    # share of decode's VRAM misses: cuda/host_ffn.c); chunk counts a multiple of 8 (its AVX2 path) and not (the
    # portable C, for that matrix); groups of 1 to 12 chunks, 3 (gs 96) among them.
    HOST_EXPERTS = [(Q4, 64, 512, 256, (1, 1, 1), 1), (Q8, 32, 256, 512, (1, 2), 2), (Q4, 32, 320, 96, (4, 1, 3), 5),
                    (Q4, 96, 768, 192, (1, 2), 3), (Q8, 192, 768, 384, (1,), 1), (Q4, 256, 1024, 512, (2, 1), 3),
                    (Q8, 128, 256, 256, (4,), 4)]

    @pytest.mark.parametrize("isa", [0, 1], ids=["c", "avx2"])
    @pytest.mark.parametrize("sname,kw", SCALE_DTYPES, ids=["f16", "bf16"])
    @pytest.mark.parametrize("dtype,gs,H,I,sizes,T", HOST_EXPERTS,
                             ids=[f"{'q4' if e[0] == Q4 else 'q8'}g{e[1]}-H{e[2]}-I{e[3]}-n{max(e[4])}"
                                  for e in HOST_EXPERTS])
    def test_cuda_experts_on_the_host_are_the_kernels_bits(dtype, gs, H, I, sizes, T, sname, kw, isa):
        """The routed experts' FFN on the host (cuda/host_ffn.c, which the CUDA backend gives a share of decode's
        VRAM misses) is the bits of the CUDA kernels' on the same inputs, in its portable C and its AVX2 path
        (where this CPU has AVX2; else both are the C): x with a group of zeros beside N(0, 1) values. (The
        kernels' own closeness to the CPU backend and to float64 is the op harness's experts cases.)"""
        rng = np.random.default_rng(H * I + len(sizes) + gs)
        xn, experts = build_experts(rng, dtype, gs, H, I, T, sizes, **kw)
        xn[0, :gs] = 0.0
        gpu = _core.op_experts(xn, experts, int8_act=True, **kw, backend="cuda")
        host = _core.op_host_experts(xn, experts, **kw, isa=isa)
        assert host is not None, "host_ffn declined the matrices"
        assert np.isfinite(gpu).all()
        bad = np.argwhere(host.view(np.uint32) != gpu.view(np.uint32))
        assert bad.size == 0, f"(row, column) {bad[:8].tolist()} differ from the CUDA kernels'"


@pytest.mark.parametrize("name", [n for n in ("cuda", "metal", "nonesuch") if n not in BACKENDS])
def test_backend_not_built_is_a_clear_error(name):
    """A backend this build lacks: ArgumentError naming it and the built ones, from the op-only instance
    and from op_experts' own."""
    from flashmoe.errors import ArgumentError
    x = np.ones((1, 8), np.float32)
    with pytest.raises(ArgumentError, match=f"backend '{name}'.*built: {','.join(BACKENDS)}"):
        _core.op_add(x, x, backend=name)
    w = build_weight(np.random.default_rng(0), F32, 8, 8, 0)
    with pytest.raises(ArgumentError, match=f"backend '{name}'"):
        _core.op_experts(x, [(w, w, w, np.zeros(1, np.int32))], backend=name)


def test_op_arguments_out_of_range_are_refused():
    """Indices the ops would follow out of their arrays are checked before the op runs."""
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="not in the cache"):
        _core.op_kv_write(randn(rng, 4, 8), randn(rng, 2, 8), 3)
    with pytest.raises(ValueError, match="out of range"):
        _core.op_moe_combine(randn(rng, 1, 8), randn(rng, 2, 8), np.array([[0, 2]], np.int32), randn(rng, 1, 2))
    w = build_weight(rng, F32, 8, 8, 0)
    with pytest.raises(ValueError, match="out of range"):
        _core.op_experts(randn(rng, 2, 8), [(w, w, w, np.array([2], np.int32))])
    with pytest.raises(ValueError, match="bytes expected"):
        _core.op_matmul(F32, randn(rng, 7, 8), None, None, 8, 8, 0, randn(rng, 1, 8))


@pytest.mark.parametrize("portable", [False, True])
def test_crc32_matches_zlib_at_every_length_and_alignment(portable):
    """The engine's CRC-32 against zlib: every length to 300 bytes, odd alignments, a running crc, a blob.
    The default is folded with carry-less multiplies (or arm64's CRC instructions) where the CPU has
    them, the table for short inputs and tails; portable is the table alone, the others' fallback."""
    crc32 = functools.partial(_core.crc32, portable=portable)
    rng = np.random.default_rng(7)
    buf = rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    for n in range(301):
        for start in (0, 1, 13):
            data = buf[start:start + n]
            for crc in (0, 0xDEADBEEF):
                assert crc32(data, crc) == zlib.crc32(data, crc), (n, start, crc)
    for n in (4096, 65536 + 7, len(buf) - 3):
        assert crc32(buf[3:3 + n]) == zlib.crc32(buf[3:3 + n])
    # chaining: the crc of a whole equals the crc of its second half continued from the first's
    assert crc32(buf[1000:], crc32(buf[:1000])) == zlib.crc32(buf)
