"""The Metal kernels (metal/*.metal) on the CPU, in the grid emulator of tests/metal_emu/ (README.md there).

- test_add / test_rmsnorm / test_matmul_q4: each kernel, built as C++ with clang-19 under AddressSanitizer
  and run through tests/metal_emu/ops.cpp (the host's dispatch: argument structs, metal/fm_metal_grid.h),
  against a float64 numpy reference at awkward shapes, and bitwise the same with the lanes (and
  threadgroups) run forward, reversed and shuffled.
- test_op_emulated: tests/test_ops.py's cases (CASES: its inputs, numpy references and tolerances, its
  check_outputs) for every op of the backend interface that has a Metal kernel, through the same
  emulator: the Metal backend held to the op harness of the other backends.
- test_route_hard_cases / test_route_batch_invariant / test_embed_batch_invariant_and_bad_ids: the router
  on near-ties, exact ties (-0.0 and +0.0 too), a dominant logit, equal logits and a wide spread, against the
  CPU backend's indices exactly; a token's route and embedding the same bits alone as among others.
- test_quantize_x_same_bits_as_cpu, test_matmul_batch_invariant, test_experts_int8_act: the int8
  activations bitwise as the CPU's (ties of rint included); a token's matmul row bitwise the same for T = 1
  (matvec kernel) and inside T = 5 and 33 (multi-token kernel) for every weight format; experts on int8
  activations bitwise the composition of the emulated ops.
- test_emulator_catches_*: the emulator's own tests. Each runs a kernel broken on purpose
  (tests/metal_emu/broken/) through the same check and requires it to fail: a missing barrier, a race on
  threadgroup memory, out-of-bounds device and threadgroup reads, a divergent barrier.
- test_address_spaces: every shader through `clang-19 -x clcpp -cl-std=clc++2021 -fsyntax-only` with
  Metal's address spaces as OpenCL's; a threadgroup pointer passed as a device one must be rejected.

Needs clang-19 (Debian: clang-19); skips without it, and fails instead where FLASHMOE_CI_REQUIRE names
"clang19" (CI installs it).
"""

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
EMU = ROOT / "tests" / "metal_emu"
BROKEN = EMU / "broken"
SHADERS = sorted((ROOT / "metal").glob("*.metal"))
ORDERS = ("forward", "reverse", "shuffled")
INCLUDES = ["-I", str(ROOT / "metal"), "-I", str(EMU), "-I", str(EMU / "include"),
            "-I", str(ROOT / "csrc" / "backend"), "-I", str(ROOT / "csrc" / "include")]  # (fm_mat, fm_expert_work)
CXXFLAGS = ["-std=c++17", "-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-Wall", "-Werror",
            "-Wno-unknown-attributes",  # [[buffer(0)]] and the other Metal attributes: the launcher maps them
            "-Wno-register", *INCLUDES]  # (threadgroup is `register` there: metal_compat.h)
ASAN_ENV = {"ASAN_OPTIONS": "detect_leaks=0:detect_stack_use_after_return=0"}  # no fake stacks (emu.cpp)

pytestmark = pytest.mark.ci_feature("clang19")
sys.path.insert(0, str(EMU))
import gen_launcher  # noqa: E402
import test_ops  # noqa: E402  (the op harness: CASES, case_args, check_outputs)


def clang(name="clang++-19"):
    path = shutil.which(name)
    if path is None:
        pytest.skip("needs clang-19 (Debian: apt-get install clang-19)")
    return path


def compile_(args, cwd):
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, args))}\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """build(*shaders): the emulator (tests/metal_emu/main.cpp) linked with the kernels of the given .metal
    files, by default metal/'s; a broken fixture replaces the real kernel of its name. Cached."""
    tmp = tmp_path_factory.mktemp("metal_emu")
    cxx = clang()
    common = [tmp / f"{n}.o" for n in ("emu", "ops", "main")]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda o: compile_([cxx, *CXXFLAGS, "-c", EMU / (o.stem + ".cpp"), "-o", o], tmp), common))
    shader_objs, exes = {}, {}

    def shader_obj(path):
        if path not in shader_objs:
            src = tmp / (path.parent.name + "_" + path.stem + ".launch.cpp")
            src.write_text(gen_launcher.launcher(path))
            obj = src.with_suffix(".o")
            compile_([cxx, *CXXFLAGS, "-include", EMU / "metal_compat.h", "-c", src, "-o", obj], tmp)
            shader_objs[path] = obj
        return shader_objs[path]

    def make(*replace):
        by_stem = {p.stem: p for p in SHADERS}
        for p in replace:  # a fixture named <kernel file>_<what> replaces that file
            by_stem[next(s for s in by_stem if p.stem.startswith(s + "_"))] = p
        key = tuple(sorted(by_stem.values()))
        if key not in exes:
            with ThreadPoolExecutor(2) as pool:
                objs = list(pool.map(shader_obj, key))
            exe = tmp / f"emu{len(exes)}"
            compile_([cxx, "-fsanitize=address", "-o", exe, *common, *objs], tmp)
            exes[key] = exe
        return exes[key]
    return make


def run(exe, op, tmp_path, arrays, args):
    """The op in the three lane orders: {order: output}; the process's stderr on failure (AssertionError)."""
    for name, a in arrays.items():
        np.ascontiguousarray(a).tofile(tmp_path / f"{name}.bin")
    proc = subprocess.run([exe, op, tmp_path, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=ASAN_ENV)
    assert proc.returncode == 0, f"the emulator failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return {o: np.fromfile(tmp_path / f"out.{o}.bin", np.float32) for o in ORDERS}


def check(outs, ref, rtol, atol):
    """Every order bitwise the same as the forward one, and the forward one close to the reference."""
    for o in ORDERS[1:]:
        diff = np.flatnonzero(outs[o].view(np.uint32) != outs["forward"].view(np.uint32))
        assert diff.size == 0, f"lane orders disagree: forward vs {o} at {diff.size} elements (a race?), first {diff[:5]}"
    np.testing.assert_allclose(outs["forward"], ref.ravel(), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------- the kernels

def run_add(exe, tmp_path, n, seed=0):
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    return run(exe, "add", tmp_path, {"x": x, "y": y}, []), x + y


@pytest.mark.parametrize("n", [1, 1000, 4096])
def test_add(build, tmp_path, n):
    outs, ref = run_add(build(), tmp_path, n)
    check(outs, ref, 0, 0)  # one float add: exact


def rmsnorm_ref(x, w, eps, zc):
    x64 = x.astype(np.float64)
    inv = 1.0 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + eps)
    return x64 * inv * ((1.0 + w) if zc else w)


def run_rmsnorm(exe, tmp_path, T, n, zc, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((T, n)) * 3).astype(np.float32)
    w = (rng.standard_normal(n) * 0.5).astype(np.float32)
    return run(exe, "rmsnorm", tmp_path, {"x": x, "w": w}, [T, n, 1e-6, int(zc)]), rmsnorm_ref(x, w, 1e-6, zc)


# n: one partial simdgroup; not a multiple of the 256 threads; several per thread
@pytest.mark.parametrize("T,n,zc", [(1, 40, 1), (3, 1000, 0), (2, 4096, 1), (1, 1, 0)])
def test_rmsnorm(build, tmp_path, T, n, zc):
    outs, ref = run_rmsnorm(build(), tmp_path, T, n, zc)
    check(outs, ref, 2e-5, 1e-5)


def q4_case(rows, cols, gs, T, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (rows, cols), dtype=np.uint8)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)  # element 2j in the low nibble of byte j
    scales = (rng.random((rows, cols // gs)) * 0.02 + 0.005).astype(np.float16)
    biases = (rng.standard_normal((rows, cols // gs)) * 0.05).astype(np.float16)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    w = (q.reshape(rows, -1, gs) * scales[..., None].astype(np.float64) + biases[..., None]).reshape(rows, cols)
    arrays = {"w": packed, "w_scales": scales.view(np.uint16), "w_biases": biases.view(np.uint16), "x": x}
    return arrays, x.astype(np.float64) @ w.T, w


# rows: 1; not a multiple of the 8 rows per threadgroup; cols: a few groups, and more than one 512 step
@pytest.mark.parametrize("rows,cols,gs,T", [(1, 64, 64, 1), (37, 192, 64, 1), (13, 1024, 32, 3),
                                            (64, 640, 128, 2), (9, 1040, 16, 1)])
def test_matmul_q4(build, tmp_path, rows, cols, gs, T):
    arrays, ref, w = q4_case(rows, cols, gs, T)
    outs = run(build(), "matmul", tmp_path, arrays, [test_ops.Q4, rows, cols, gs, T, 0, 0])
    scale = np.abs(w).sum(axis=1).max() * np.abs(arrays["x"]).max()  # the size of the sums' terms
    check(outs, ref, 1e-5, 2e-6 * scale)


# ------------------------------------------------------------------- the op harness's cases (test_ops.py)

class Out(NamedTuple):
    """An output of an op of several outputs that is not float32 (route's indices: int32)."""
    shape: tuple
    dtype: type


def matrix_arrays(name, m):
    """The emulator's files of a matrix (dtype, data, scales, biases, rows, cols, gs): its data, and scales and
    biases where quantized."""
    dtype, data, scales, biases = m[:4]
    out = {name: np.ascontiguousarray(data)}
    if scales is not None:
        out[name + "_scales"], out[name + "_biases"] = np.asarray(scales, np.uint16), np.asarray(biases, np.uint16)
    return out


def experts_call(xn, experts, scale_bf16, int8_act=False):
    """The emulator's experts op for op_experts' arguments (xn, [(gate, up, down, tok)]); int8_act on every
    matrix (op_experts itself has no such argument)."""
    H, I = xn.shape[1], experts[0][0][4]
    arrays, scalars = {"x": xn}, [H, I, len(experts), int(scale_bf16)]
    for j, (gate, up, down, tok) in enumerate(experts):
        scalars.append(len(tok))
        arrays[f"e{j}_tok"] = np.asarray(tok, np.int32)
        for k, m in zip("gud", (gate, up, down)):
            arrays.update(matrix_arrays(f"e{j}_{k}_w", m))
            scalars += [m[0], m[6], int(int8_act)]
    return "experts", arrays, scalars, (sum(len(e[3]) for e in experts), H)


def emulated(c, args):
    """How test_ops case c runs on the emulated Metal kernels: (emulator op, input arrays, scalars, output
    shape, or a list of shapes for an op of several outputs, which the emulator writes one after another,
    each float32 or an Out of another 4-byte dtype), from the arguments of its _core.op_<name>."""
    if c.op == "add":
        x, y = args
        return "add", {"x": x, "y": y}, [], x.shape
    if c.op == "rmsnorm":
        x, w, eps, zc = args
        return "rmsnorm", {"x": x, "w": w}, [x.shape[0], x.shape[1], eps, int(zc)], x.shape
    if c.op in ("silu_mul", "sigmoid_mul"):
        gate, b = args
        return c.op, {"gate": gate, "b": b}, [gate.shape[0], gate.shape[1]], gate.shape
    if c.op == "l2norm":
        x, eps, scale = args
        return "l2norm", {"x": x}, [x.size // x.shape[-1], x.shape[-1], eps, scale], x.shape
    if c.op == "rope":
        x, rot, pos0, theta = args
        return "rope", {"x": x}, [*x.shape, rot, pos0, theta], x.shape
    if c.op == "matmul":
        (dtype, data, scales, biases, rows, cols, gs), x, int8 = args[:7], args[7], args[8:]
        return ("matmul", {**matrix_arrays("w", args[:7]), "x": x},
                [dtype, rows, cols, gs, x.shape[0], int(c.kwargs.get("scale_bf16", False)), int(any(int8))],
                (x.shape[0], rows))
    if c.op == "experts":
        xn, experts = args
        return experts_call(xn, experts, c.kwargs.get("scale_bf16", False))
    if c.op == "split_q_gate":
        (q2,) = args
        T, nh, hd2 = q2.shape
        return "split_q_gate", {"q2": q2}, [T, nh, hd2 // 2], [(T, nh, hd2 // 2)] * 2
    if c.op == "kv_write":
        cache, src, pos0 = args
        return "kv_write", {"cache": cache, "src": src}, [pos0, *src.shape], cache.shape
    if c.op == "gate_rows":
        x, g = args
        return "gate_rows", {"x": x, "g": g}, [*x.shape], x.shape
    if c.op == "deltanet_gates":
        b, a, A_log, dt_bias = args
        return "deltanet_gates", {"b": b, "a": a, "A_log": A_log, "dt_bias": dt_bias}, [*b.shape], [b.shape] * 2
    if c.op == "deltanet_split":
        conv, kd, vd = args
        T = conv.shape[0]
        return "deltanet_split", {"conv": conv}, [T, kd, vd], [(T, kd), (T, kd), (T, vd)]
    if c.op == "conv1d_silu":
        x, state, w = args
        return "conv1d_silu", {"x": x, "state": state, "w": w}, [*x.shape, w.shape[1]], [x.shape, state.shape]
    if c.op == "embed":
        dtype, data, scales, biases, rows, cols, gs, ids = args
        bits = {test_ops.F32: 32, test_ops.BF16: 16, test_ops.Q8: 8, test_ops.Q4: 4}[dtype]
        arrays = {"w": np.ascontiguousarray(data).view(np.uint8), "ids": np.asarray(ids, np.int32)}
        if bits <= 8:
            arrays.update(scales=np.asarray(scales, np.uint16), biases=np.asarray(biases, np.uint16))
        return "embed", arrays, [bits, rows, cols, gs, int(c.kwargs.get("scale_bf16", False))], (len(ids), cols)
    if c.op == "route":
        logits, k, norm = args
        T, E = logits.shape
        return "route", {"logits": logits}, [T, E, k, int(norm)], [Out((T, k), np.int32), (T, k)]
    if c.op == "moe_combine":
        out, ye, row, w = args
        return ("moe_combine", {"out": out, "ye": ye, "row": np.asarray(row, np.int32), "w": w},
                [*row.shape, out.shape[1]], out.shape)
    if c.op == "attention":
        q, kc, vc, pos0, scale = args
        return attention_call(q, kc, vc, pos0, scale)
    if c.op == "gated_delta_auto":
        q, k, v, g, beta, S = args
        return gated_delta_call(q, k, v, g, beta, S, c.kwargs.get("pos0", 0))
    raise AssertionError(c.op)


def attention_call(q, kc, vc, pos0, scale, split=-1):
    """split: the flash-decoding split (1), the one-pass kernel (0), the host's choice (-1)"""
    T, nh, hd = q.shape
    return ("attention", {"q": q, "k_cache": kc, "v_cache": vc}, [T, pos0, nh, kc.shape[1], hd, scale, split],
            q.shape)


def gated_delta_call(q, k, v, g, beta, S, pos0):
    (T, Hk, dk), (Hv, dv) = q.shape, v.shape[1:]
    return ("gated_delta", {"q": q, "k": k, "v": v, "g": g, "beta": beta, "S": S}, [T, pos0, Hk, Hv, dk, dv],
            [v.shape, S.shape])


def outputs(flat, shape):
    """The emulator's output (one float32 array) as the op's: one shape, or a list of shapes (each a shape of
    float32 or an Out of another 4-byte dtype), one after another."""
    if not isinstance(shape, list):
        return flat.reshape(shape)
    shape = [s if isinstance(s, Out) else Out(s, np.float32) for s in shape]
    sizes = [int(np.prod(s.shape)) for s in shape]
    assert flat.size == sum(sizes), (flat.size, sizes)
    return tuple(p.view(s.dtype).reshape(s.shape) for p, s in zip(np.split(flat, np.cumsum(sizes)[:-1]), shape))


EMULATED_OPS = ("add", "rmsnorm", "silu_mul", "sigmoid_mul", "l2norm", "rope", "matmul", "split_q_gate", "kv_write",
                "gate_rows", "deltanet_gates", "deltanet_split", "conv1d_silu", "moe_combine", "embed", "route",
                "attention", "gated_delta_auto", "experts")


def has_kernel(c):
    """Whether the Metal kernels take case c: every case of the ops in EMULATED_OPS (matmul: f32, bf16, q4 and
    q8 weights, fp32 or int8 activations). experts: the cases of one thread only; test_ops runs each again with
    2 threads for the CPU's side-by-side lanes, which mean nothing here (and would double a slow part)."""
    return c.op in EMULATED_OPS and not (c.op == "experts" and c.threads not in (None, 1))


EMULATED_CASES = [c for c in test_ops.CASES if has_kernel(c)]


@pytest.mark.parametrize("c", [pytest.param(c, id=f"{c.op}-{c.id}") for c in EMULATED_CASES])
def test_op_emulated(build, tmp_path, c):
    """test_ops' case c on the Metal kernels: the three lane orders bitwise equal, and the outputs against
    the case's own reference and tolerance (test_ops.check_outputs)."""
    args = test_ops.case_args(c)
    op, arrays, scalars, shape = emulated(c, args)
    outs = run(build(), op, tmp_path, arrays, scalars)
    for o in ORDERS[1:]:
        diff = np.flatnonzero(outs[o].view(np.uint32) != outs["forward"].view(np.uint32))
        assert diff.size == 0, f"lane orders disagree: forward vs {o} at {diff.size} elements (a race?), first {diff[:5]}"
    test_ops.check_outputs(outputs(outs["forward"], shape), c.ref(*args, **c.kwargs), c.tol)


# ------------------------------------------------------------------- route and embed beyond test_ops' cases

def hard_logits(rng, T, E, kind):
    """Router logits [T, E] that are hard for a top-k in fp32: near-ties a few ulp apart and exact ties
    (equal values, -0.0 and +0.0) around the top, one logit far above the rest (weight ~1), all equal
    (weights 1/E), a spread wide enough for exp to fall below the fixed point's 2^-40."""
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
    return x


# E: one element, fewer than a simdgroup, a lane with two, 512 (16 per lane); k up to FM_ROUTE_MAX_K
@pytest.mark.parametrize("E,k", [(1, 1), (2, 2), (5, 3), (33, 32), (64, 8), (512, 10), (512, 32)])
@pytest.mark.parametrize("kind", ["near", "peaked", "flat", "wide"])
@pytest.mark.parametrize("norm", [True, False])
def test_route_hard_cases(build, tmp_path, E, k, kind, norm):
    """Indices exactly the CPU backend's (_core.op_route), weights within TOL_PROB of test_ops' float64
    reference, the three lane orders bitwise equal."""
    from flashmoe import _core
    rng = np.random.default_rng(E * 1000 + k * 10 + len(kind) + norm)
    T = 4
    logits = hard_logits(rng, T, E, kind)
    outs = run(build(), "route", tmp_path, {"logits": logits}, [T, E, k, int(norm)])
    check(outs, outs["forward"], 0, 0)  # the orders agree
    idx, w = outs["forward"][:T * k].view(np.int32).reshape(T, k), outs["forward"][T * k:].reshape(T, k)
    cpu_idx, _ = _core.op_route(logits, k, norm, backend="cpu")
    np.testing.assert_array_equal(idx, cpu_idx)
    test_ops.check_outputs((idx, w), test_ops.ref_route(logits, k, norm), (0, test_ops.TOL_PROB))


def test_route_batch_invariant(build, tmp_path):
    """A token's indices and weights are the same bits alone (T = 1) as among 9 others."""
    rng = np.random.default_rng(7)
    T, E, k = 9, 512, 10
    logits = hard_logits(rng, T, E, "near")
    both = run(build(), "route", tmp_path, {"logits": logits}, [T, E, k, 1])["forward"]
    for t in (0, 4, 8):
        one = run(build(), "route", tmp_path, {"logits": logits[t:t + 1]}, [1, E, k, 1])["forward"]
        assert np.array_equal(one[:k].view(np.uint32), both[t * k:(t + 1) * k].view(np.uint32)), t
        assert np.array_equal(one[k:].view(np.uint32), both[T * k + t * k:T * k + (t + 1) * k].view(np.uint32)), t


def test_embed_batch_invariant_and_bad_ids(build, tmp_path):
    """q4 rows: each token's row the same bits alone as among others; an id outside [0, rows) gives a NaN row
    (and no read outside W: AddressSanitizer)."""
    args = test_ops.build_weight(np.random.default_rng(3), test_ops.Q4, 13, 192, 64)
    dtype, data, scales, biases, rows, cols, gs = args
    arrays = {"w": data, "scales": scales, "biases": biases}
    ids = np.array([3, 12, -1, 0, 13, 7], np.int32)
    many = run(build(), "embed", tmp_path, dict(arrays, ids=ids), [4, rows, cols, gs, 0])["forward"].reshape(6, cols)
    ref = test_ops.ref_dequant(*args).astype(np.float32)
    for t, i in enumerate(ids):
        if 0 <= i < rows:
            assert np.array_equal(many[t], ref[i]), t
            one = run(build(), "embed", tmp_path, dict(arrays, ids=ids[t:t + 1]), [4, rows, cols, gs, 0])["forward"]
            assert np.array_equal(one.view(np.uint32), many[t].view(np.uint32)), t
        else:
            assert np.isnan(many[t]).all(), t


def test_conv1d_same_bits_however_split(build, tmp_path):
    """conv1d_silu over 7 tokens in one call gives the same bits (outputs and final state) as in calls of 2, 1
    and 4 tokens with the state carried: each call's state update (T below and above K-1 = 3) is exact."""
    rng = np.random.default_rng(11)
    T, C, K = 7, 130, 4
    x, state, w = test_ops.randn(rng, T, C), test_ops.randn(rng, K - 1, C), test_ops.randn(rng, C, K, scale=0.5)

    def call(xs, st):
        o = run(build(), "conv1d_silu", tmp_path, {"x": xs, "state": st, "w": w}, [len(xs), C, K])["forward"]
        return o[:len(xs) * C].reshape(len(xs), C), o[len(xs) * C:].reshape(K - 1, C)

    whole, whole_state = call(x, state)
    outs, st = [], state
    for a, b in ((0, 2), (2, 3), (3, 7)):
        o, st = call(x[a:b], st)
        outs.append(o)
    assert np.array_equal(np.concatenate(outs).view(np.uint32), whole.view(np.uint32))
    assert np.array_equal(st.view(np.uint32), whole_state.view(np.uint32))


def run_call(exe, tmp_path, call):
    """An emulator call of emulated()'s form: its forward outputs, the three lane orders bitwise equal."""
    op, arrays, scalars, shape = call
    outs = run(exe, op, tmp_path, arrays, scalars)
    for o in ORDERS[1:]:
        assert np.array_equal(outs[o].view(np.uint32), outs["forward"].view(np.uint32)), f"forward vs {o}"
    return outputs(outs["forward"], shape)


# Batch invariance (backend.h): a token's bits do not depend on the call it is in. Attention: each query
# reduces its keys in an order fixed by its position (chunks of FM_ATTN_CHUNK = 256 keys; pos0 300 and 510
# make two and three chunks), so a query alone (T = 1, decode) gives the bits it gets inside a prefill, and
# the flash-decoding split (one threadgroup per chunk, then a merge) the bits of the one-pass kernel.
def attention_same_bits(exe, tmp_path, T, pos0, nh, nkv, hd, modes=(0, 1)):
    """A prefill of T queries from pos0 (the one-pass kernel) against the reference; then bitwise: the split
    kernels over the same call, a few of its queries alone (T = 1) in each mode, its tail as a call of its own."""
    q, kc, vc, _, scale = test_ops.build_attention(np.random.default_rng(T + pos0), T, pos0, nh, nkv, hd)
    whole = run_call(exe, tmp_path, attention_call(q, kc, vc, pos0, scale, split=0))
    test_ops.check_outputs(whole, test_ops.ref_attention(q, kc, vc, pos0, scale), (test_ops.TOL_DOT,))
    for mode in modes[1:]:
        split = run_call(exe, tmp_path, attention_call(q, kc, vc, pos0, scale, split=mode))
        assert np.array_equal(split.view(np.uint32), whole.view(np.uint32)), "split vs one pass"
    for t in sorted({0, T // 2, T - 1}):
        for mode in modes:
            alone = run_call(exe, tmp_path, attention_call(q[t:t + 1], kc, vc, pos0 + t, scale, split=mode))
            assert np.array_equal(alone[0].view(np.uint32), whole[t].view(np.uint32)), f"token {t}, split {mode}"
    a = T // 2 + 1  # and the prefill cut into two calls
    rest = run_call(exe, tmp_path, attention_call(q[a:], kc, vc, pos0 + a, scale, split=modes[0]))
    assert np.array_equal(rest.view(np.uint32), whole[a:].view(np.uint32)), "a call's tail"


@pytest.mark.parametrize("T,pos0,nh,nkv,hd", [(9, 13, 8, 2, 64), (5, 300, 2, 1, 40), (3, 510, 3, 3, 32)])
def test_attention_same_bits_alone_or_in_prefill(build, tmp_path, T, pos0, nh, nkv, hd):
    attention_same_bits(build(), tmp_path, T, pos0, nh, nkv, hd)


def test_attention_same_bits_catches_chunks_by_call(build, tmp_path):
    """The check above, on an attention whose chunks follow the call (broken/): within the tolerance, and
    caught by the bits."""
    exe = build(BROKEN / "attention_chunks_by_call.metal")
    with pytest.raises(AssertionError, match="token 0, split 0"):
        attention_same_bits(exe, tmp_path, 9, 13, 8, 2, 64, modes=(0,))


# Gated delta: the same bits in one call as in calls cut at multiples of FM_DELTANET_CHUNK (16) positions
# (the kernel is the recurrent form, so any cut does), and a decode step after them.
@pytest.mark.parametrize("T,pos0", [(40, 0), (37, 15)])
def test_gated_delta_same_bits_however_split(build, tmp_path, T, pos0):
    exe = build()
    q, k, v, g, beta, S = test_ops.build_gated_delta(np.random.default_rng(T * 100 + pos0), T, 2, 4, 32, 24)

    def run_calls(cuts):
        state, outs = S, []
        for a, b in zip([0, *cuts], [*cuts, T]):
            o, state = run_call(exe, tmp_path, gated_delta_call(q[a:b], k[a:b], v[a:b], g[a:b], beta[a:b], state,
                                                                pos0 + a))
            outs.append(o)
        return np.concatenate(outs), state

    whole, whole_state = run_calls([])
    test_ops.check_outputs((whole, whole_state), test_ops.ref_gated_delta(q, k, v, g, beta, S),
                           (test_ops.TOL_DOT, test_ops.TOL_DOT))
    cuts = [c - pos0 for c in range(16, pos0 + T, 16) if c > pos0]
    for calls in (cuts, cuts[:1], [T - 1]):  # at every multiple of 16, at the first only, a last decode step
        out, state = run_calls(calls)
        assert np.array_equal(out.view(np.uint32), whole.view(np.uint32)), calls
        assert np.array_equal(state.view(np.uint32), whole_state.view(np.uint32)), calls


# ------------------------------------------------------- matmul: int8 rounding, batch invariance, experts

def x_with_ties(rng, T, cols, gs):
    """x whose groups hit rint's ties: group 0 of token 0 has max 127 (so x · 127/m = x) and values k + 0.5,
    which must round half to even as the CPU's rintf does; group 1 is zero (m = 0)."""
    x = test_ops.randn(rng, T, cols)
    x[0, :gs] = (np.arange(gs) % 9 - 4).astype(np.float32) + np.float32(0.5)
    x[0, 0] = 127.0
    x[0, gs:2 * gs] = 0.0
    return x


@pytest.mark.parametrize("gs,T", [(32, 3), (64, 2), (128, 1), (256, 2)])
def test_quantize_x_same_bits_as_cpu(build, tmp_path, gs, T):
    """The int8 activations bitwise as the CPU computes them (test_ops.quantize_x_ref, which test_ops holds
    to the C code): the same xq (every rounding decision), xd and Σ xq."""
    cols = 4 * gs
    x = x_with_ties(np.random.default_rng(gs + T), T, cols, gs)
    outs = run(build(), "quantize_x", tmp_path, {"x": x}, [T, cols, gs])
    xq, d = test_ops.quantize_x_ref(x, gs)
    ref = np.concatenate([xq.ravel(), d.ravel(), xq.sum(axis=2).ravel()]).astype(np.float32) + np.float32(0)  # (-0: 0)
    check(outs, ref, 0, 0)
    assert np.array_equal(outs["forward"].view(np.uint32), ref.view(np.uint32))


# (name, dtype, group size, cols, int8_act): cols over more than one step of the lanes where the kernel allows
INVARIANCE = [("f32", test_ops.F32, 0, 300, False), ("bf16", test_ops.BF16, 0, 130, False),
              ("q4g32", test_ops.Q4, 32, 640, False), ("q8g64", test_ops.Q8, 64, 640, False),
              ("q4g64-int8", test_ops.Q4, 64, 1152, True), ("q8g32-int8", test_ops.Q8, 32, 1088, True)]


def invariance_failures(exe, tmp_path, name, dtype, gs, cols, int8):
    """Where a token's row differs between T = 1 and inside T = 5 / 33 (empty when batch invariant); the T = 33
    call is checked against test_ops' reference."""
    rng = np.random.default_rng(cols)
    w = test_ops.build_weight(rng, dtype, 13, cols, gs)
    x = test_ops.randn(rng, 33, cols)

    def matmul(xs):
        op, arrays, scalars, shape = emulated(test_ops.Case("matmul", name, None, None, ()),
                                              (*w, xs, True) if int8 else (*w, xs))
        outs = run(exe, op, tmp_path, arrays, scalars)
        for o in ORDERS[1:]:
            assert np.array_equal(outs[o].view(np.uint32), outs["forward"].view(np.uint32)), o
        return outs["forward"].reshape(shape).view(np.uint32)

    y33, y5, y5b = matmul(x), matmul(x[:5]), matmul(x[2:7])
    ref = (test_ops.ref_matmul_int8(*w, x, True) if int8 else test_ops.ref_matmul(*w, x))
    test_ops.check_outputs(y33.view(np.float32), ref, (test_ops.TOL_DOT,))
    failures = []
    for t in (0, 3, 4, 32):
        alone = matmul(x[t:t + 1])[0]
        for inside, what in ((y33[t], "T=33"), (y5[t] if t < 5 else None, "T=5"),
                             (y5b[t - 2] if 2 <= t < 7 else None, "T=5 from token 2")):
            if inside is not None and not np.array_equal(alone, inside):
                failures.append(f"token {t}: T=1 and {what} differ")
    return failures


@pytest.mark.parametrize("name,dtype,gs,cols,int8", INVARIANCE, ids=[v[0] for v in INVARIANCE])
def test_matmul_batch_invariant(build, tmp_path, name, dtype, gs, cols, int8):
    """Batch invariance (backend.h): a token's output row is bitwise the same computed alone (T = 1: the
    matvec kernel) and inside calls of T = 5 and 33 (the multi-token kernel, tiles of FM_MM_TOKENS = 8, 33 =
    4 tiles and a 1-token one), at different places in the call."""
    assert invariance_failures(build(), tmp_path, name, dtype, gs, cols, int8) == []


def test_batch_invariance_test_catches_a_reordered_sum(build, tmp_path):
    """The check above has teeth: a multi-token f32 kernel that sums a lane's columns in the reverse order
    (within tolerance, but not the matvec's bits) fails it."""
    exe = build(BROKEN / "mv_dense_reordered.metal")
    assert invariance_failures(exe, tmp_path, *INVARIANCE[0]) != []


@pytest.mark.parametrize("name,dtype,gs,H,I", [("q4g32", test_ops.Q4, 32, 192, 96), ("q8g64", test_ops.Q8, 64, 192, 128)],
                         ids=["q4g32", "q8g64"])
def test_experts_int8_act(build, tmp_path, name, dtype, gs, H, I):
    """experts with int8 activations on every matrix (op_experts has no such case): bitwise the composition of
    the emulated ops (test_op_emulated holds each to test_ops' references): for each expert, the matmul of its
    tokens' rows, silu_mul, the down matmul; the experts op gathers, and reads a single token in place."""
    rng = np.random.default_rng(H + I)
    xn, experts = test_ops.build_experts(rng, dtype, gs, H, I, 20, (7, 1, 20, 3, 12))
    op, arrays, scalars, shape = experts_call(xn, experts, False, int8_act=True)
    outs = run(build(), op, tmp_path, arrays, scalars)
    for o in ORDERS[1:]:
        assert np.array_equal(outs[o].view(np.uint32), outs["forward"].view(np.uint32)), o
    ye = outs["forward"].reshape(shape)

    def matmul(m, x):
        _, arr, sc, shp = emulated(test_ops.Case("matmul", name, None, None, ()), (*m, x, True))
        return run(build(), "matmul", tmp_path, arr, sc)["forward"].reshape(shp)

    row = 0
    for gate, up, down, tok in experts:
        x = np.ascontiguousarray(xn[tok])
        g, u = matmul(gate, x), matmul(up, x)
        h = run(build(), "silu_mul", tmp_path, {"gate": g, "b": u}, list(g.shape))["forward"].reshape(g.shape)
        y = matmul(down, h)
        assert np.array_equal(ye[row:row + len(tok)].view(np.uint32), y.view(np.uint32)), f"expert of {len(tok)} tokens"
        row += len(tok)


# ------------------------------------------------------------------- the emulator's tests: broken kernels

def test_emulator_catches_missing_barrier(build, tmp_path):
    """Without the barrier, simdgroup 0 reads partial sums no lane wrote yet: poison (NaN) or stale."""
    outs, ref = run_rmsnorm(build(BROKEN / "rmsnorm_no_barrier.metal"), tmp_path, 3, 1000, 0)
    assert np.isnan(outs["forward"]).any(), "the poison did not show"
    with pytest.raises(AssertionError):
        check(outs, ref, 2e-5, 1e-5)


def test_emulator_catches_threadgroup_race(build, tmp_path):
    outs, ref = run_rmsnorm(build(BROKEN / "rmsnorm_race.metal"), tmp_path, 4, 4096, 0)
    with pytest.raises(AssertionError, match="lane orders disagree"):
        check(outs, ref, 2e-5, 1e-5)


def test_emulator_catches_out_of_bounds_device_read(build, tmp_path):
    with pytest.raises(AssertionError, match="AddressSanitizer: heap-buffer-overflow"):
        run_add(build(BROKEN / "add_oob.metal"), tmp_path, 1000)


def test_emulator_catches_threadgroup_overflow(build, tmp_path):
    with pytest.raises(AssertionError, match="AddressSanitizer: heap-buffer-overflow"):
        run_rmsnorm(build(BROKEN / "rmsnorm_tg_overflow.metal"), tmp_path, 2, 1000, 0)


def test_emulator_catches_divergent_barrier(build, tmp_path):
    with pytest.raises(AssertionError, match="divergent barrier"):
        run_rmsnorm(build(BROKEN / "rmsnorm_early_return.metal"), tmp_path, 2, 40, 0)


def test_emulator_refuses_kernel_scope_threadgroup_memory():
    """It would be private to each lane here (metal_compat.h): refused rather than silently wrong."""
    with pytest.raises(ValueError, match="kernel-scope threadgroup variable"):
        gen_launcher.launcher(BROKEN / "kernel_scope_threadgroup.metal")


# --------------------------------------------------------------------------- the address-space pass

def address_space_pass(shader):
    args = [clang("clang-19"), "-x", "clcpp", "-cl-std=clc++2021", "-fsyntax-only", "-DFM_METAL_AS_PASS",
            "-Wno-unknown-attributes", "-include", str(EMU / "metal_compat.h"), *INCLUDES, str(shader)]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("shader", SHADERS, ids=[p.name for p in SHADERS])
def test_address_spaces(shader):
    proc = address_space_pass(shader)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_address_space_pass_rejects_threadgroup_as_device(tmp_path):
    shader = BROKEN / "as_threadgroup_to_device.metal"
    cxx = subprocess.run([clang(), *CXXFLAGS, "-x", "c++", "-include", str(EMU / "metal_compat.h"), "-fsyntax-only",
                          str(shader)], capture_output=True, text=True, timeout=120)
    assert cxx.returncode == 0, "the C++ pass accepts it (it has no address spaces): " + cxx.stderr[-2000:]
    proc = address_space_pass(shader)
    assert proc.returncode != 0 and "cannot pass pointer to address space '__local'" in proc.stderr, proc.stderr


def test_address_space_pass_rejects_kernel_scope_threadgroup():
    proc = address_space_pass(BROKEN / "kernel_scope_threadgroup.metal")
    assert proc.returncode != 0 and "local address space" in proc.stderr, proc.stderr
