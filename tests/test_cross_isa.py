"""The CPU kernel variants of every ISA against the float64 numpy references, and against each other.

- test_ops_against_numpy: tests/c/run_ops.c, built natively and, for AArch64, with a cross compiler and
  run under qemu-user, runs the matmul, get_row, silu_mul, sigmoid_mul, conv1d_silu, rmsnorm and rope
  cases of tests/test_ops.py with every kernel variant the build has (NEON and NEON dot product under
  `qemu -cpu max`); each output must be within test_ops' tolerance of test_ops' numpy reference. (The
  native run checks the runner itself: test_ops covers the native variants through Python.)
- test_*_kernels_against_portable: tests/c/test_kernels.c, every SIMD matmul against the portable C one,
  and every variant's batch invariance (rows of a batch bitwise equal to the tokens alone, at 1 and 2
  threads: tests/test_batch_invariance.py's check, which reaches the NEON variants this way).

The AArch64 runs need aarch64-linux-gnu-gcc and qemu-aarch64 (Debian: gcc-aarch64-linux-gnu
libc6-dev-arm64-cross qemu-user); without them they skip, and fail instead where FLASHMOE_CI_REQUIRE names
"neon" (CI installs both).
"""

import platform
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import test_ops

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["csrc/backend/cpu/ops.c", "csrc/backend/cpu/threads.c", "csrc/core/util.c"]
FLAGS = ["-std=gnu11", "-O2", "-Icsrc/include"]
AVX2 = ["-mavx2", "-mfma", "-mf16c"]
AVX512 = AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni"]  # runs where present
OPS = ("matmul", "get_row", "silu_mul", "sigmoid_mul", "conv1d_silu", "rmsnorm", "rope")
NEON_TOOLS = "needs aarch64-linux-gnu-gcc and qemu-aarch64 (Debian: gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)"


def run_checked(cmd, **kw):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def native_cc():
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    return cc


def neon_tools():
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if cc is None or qemu is None:
        pytest.skip(NEON_TOOLS)
    return cc, qemu


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """build(kind, main): an executable of tests/c/<main> with the CPU backend, "native" (on x86-64 with
    its SIMD variants) or "neon" (AArch64, static, run under qemu); the backend's objects are compiled
    once per kind. Returns the command that runs it."""
    objects = {}
    tmp = tmp_path_factory.mktemp("cross")

    def objs(kind):
        if kind not in objects:
            out, sources = tmp / kind, [(src, []) for src in COMMON]
            out.mkdir()
            if kind == "neon":
                cc, _ = neon_tools()
                sources += [("csrc/backend/cpu/matmul_neon.c", []),
                            ("csrc/backend/cpu/matmul_neon_dot.c", ["-march=armv8.2-a+dotprod"])]
            else:
                cc = native_cc()
                if platform.machine() in ("x86_64", "AMD64"):
                    sources += [("csrc/backend/cpu/matmul_avx2.c", AVX2), ("csrc/backend/cpu/matmul_avx512.c", AVX512)]
            files = []
            for src, flags in sources:
                files.append(out / (Path(src).stem + ".o"))
                run_checked([cc, *FLAGS, *flags, "-c", src, "-o", files[-1]])
            objects[kind] = cc, files
        return objects[kind]

    def make(kind, main):
        cc, files = objs(kind)
        exe = tmp / kind / Path(main).stem
        run_checked([cc, *FLAGS, *(["-static"] if kind == "neon" else []), "-o", exe, f"tests/c/{main}", *files,
                     "-lpthread", "-lm"])
        # qemu -cpu max: an emulated CPU with the dot product, so both NEON variants run
        return [neon_tools()[1], "-cpu", "max", str(exe)] if kind == "neon" else [str(exe)]
    return make


# ---------------------------------------------------------------- the op cases, as run_ops.c reads them


def _array(a) -> bytes:
    raw = b"" if a is None else np.ascontiguousarray(a).tobytes()
    return struct.pack("<Q", len(raw)) + raw


def encode(op, args, kwargs) -> bytes:
    """One run_ops.c record for test_ops' arguments (and keyword arguments) of op."""
    ints, floats = [], []
    if op in ("matmul", "get_row"):
        dtype, data, scales, biases, rows, cols, gs = args[:7]
        sb = int(bool(kwargs.get("scale_bf16", False)))
        if op == "matmul":
            x = np.asarray(args[7], np.float32)
            ints = [dtype, rows, cols, gs, x.size // cols, int(len(args) > 8 and bool(args[8])), sb]
            arrays = [data, scales, biases, x]
        else:
            ints, arrays = [dtype, rows, cols, gs, args[7], sb], [data, scales, biases]
    elif op in ("silu_mul", "sigmoid_mul"):
        ints, arrays = [args[0].size], [np.asarray(args[0], np.float32), np.asarray(args[1], np.float32)]
    elif op == "conv1d_silu":
        x, state, w = args
        ints, arrays = [x.shape[0], x.shape[1], w.shape[1]], [x, state, w]
    elif op == "rmsnorm":
        x, w, eps, zc = args
        ints, floats, arrays = [x.size // w.size, w.size, int(zc)], [eps], [x, w]
    elif op == "rope":
        x, rot, pos0, theta = args
        ints, floats, arrays = [*x.shape, rot, pos0], [theta], [x]
    else:
        raise ValueError(op)
    head = op.encode().ljust(16, b"\0") + struct.pack("<8i", *(ints + [0] * (8 - len(ints))))
    head += struct.pack("<4f", *(floats + [0.0] * (4 - len(floats))))
    return head + struct.pack("<i", len(arrays)) + b"".join(_array(a) for a in arrays)


def decode(buf: bytes, pos: int):
    """(outputs as float32 arrays, next position) of one case in run_ops.c's output file."""
    (n,) = struct.unpack_from("<i", buf, pos)
    pos += 4
    outs = []
    for _ in range(n):
        (size,) = struct.unpack_from("<Q", buf, pos)
        outs.append(np.frombuffer(buf, np.float32, size // 4, pos + 8).copy())
        pos += 8 + size
    return outs, pos


@pytest.mark.parametrize("kind", ["native", pytest.param("neon", marks=pytest.mark.ci_feature("neon"))])
def test_ops_against_numpy(build, kind, tmp_path):
    cmd = build(kind, "run_ops.c")
    cases = [c for c in test_ops.CASES if c.op in OPS]
    args = [c.build(np.random.default_rng(zlib.crc32(f"{c.op}-{c.id}".encode()))) for c in cases]
    (tmp_path / "cases.bin").write_bytes(b"".join(encode(c.op, a, c.kwargs) for c, a in zip(cases, args)))
    out = run_checked(cmd + [str(tmp_path / "cases.bin"), str(tmp_path / "out.bin")])
    variants = [ln.split()[-1] for ln in out.splitlines() if ln.startswith("kernel variant ")]
    want = {"native": {"scalar"} | ({"avx2"} if platform.machine() in ("x86_64", "AMD64") else set()),
            "neon": {"scalar", "neon", "neondot"}}[kind]
    assert want <= set(variants), out
    buf, pos, bad = (tmp_path / "out.bin").read_bytes(), 0, []
    refs = [c.ref(*a, **c.kwargs) for c, a in zip(cases, args)]
    for variant in variants:
        for c, ref in zip(cases, refs):
            outs, pos = decode(buf, pos)
            refs_c = ref if isinstance(ref, tuple) else (ref,)
            assert len(outs) == len(refs_c) == len(c.tol), c.id
            for i, (o, r, tol) in enumerate(zip(outs, refs_c, c.tol)):
                err = test_ops.normalised_error(o.reshape(np.shape(r)), r)
                if not err <= tol:
                    bad.append(f"{variant} {c.op}-{c.id} output {i}: normalised error {err:.3g} > {tol:g}")
    assert pos == len(buf)
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------- SIMD against portable, in C


def test_native_kernels_against_portable(build):
    out = run_checked(build("native", "test_kernels.c"))
    assert "batch invariance scalar" in out, out
    assert out.strip().endswith(" 0 failed"), out


@pytest.mark.ci_feature("neon")
def test_neon_kernels_against_portable_under_qemu(build):
    out = run_checked(build("neon", "test_kernels.c"))
    assert "kernel variant neon\n" in out and "kernel variant neondot" in out, out
    assert "batch invariance neon\n" in out and "batch invariance neondot" in out, out
    assert out.strip().endswith(" 0 failed"), out
