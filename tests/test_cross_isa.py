"""The SIMD matmul kernels against the portable ones in C (tests/c/test_kernels.c): natively (AVX2 on
x86-64), and NEON built with an AArch64 cross compiler and run under qemu-user when those are installed
(Debian: gcc-aarch64-linux-gnu qemu-user); skipped otherwise."""

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["tests/c/test_kernels.c", "csrc/backend/cpu/ops.c", "csrc/core/threads.c", "csrc/core/util.c"]
FLAGS = ["-std=gnu11", "-O2", "-Icsrc/include"]
AVX2 = ["-mavx2", "-mfma", "-mf16c"]
AVX512 = AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni"]  # runs where present


def run_checked(cmd, **kw):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_native_kernels_against_portable(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not (ROOT / "tests/c/test_kernels.c").exists():
        pytest.skip("no C compiler or no source tree")
    objs = []
    if platform.machine() in ("x86_64", "AMD64"):
        for name, flags in (("avx2", AVX2), ("avx512", AVX512)):
            obj = tmp_path / f"matmul_{name}.o"
            run_checked([cc, *FLAGS, *flags, "-c", f"csrc/backend/cpu/matmul_{name}.c", "-o", obj])
            objs.append(obj)
    exe = tmp_path / "test_kernels"
    run_checked([cc, *FLAGS, "-o", exe, *COMMON, *objs, "-lpthread", "-lm"])
    out = run_checked([exe])
    assert out.strip().endswith(" 0 failed"), out


def test_neon_kernels_under_qemu(tmp_path):
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if cc is None or qemu is None:
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64 (Debian: gcc-aarch64-linux-gnu qemu-user)")
    exe, dot = tmp_path / "test_kernels_arm64", tmp_path / "matmul_neon_dot.o"
    run_checked([cc, *FLAGS, "-march=armv8.2-a+dotprod", "-c", "csrc/backend/cpu/matmul_neon_dot.c", "-o", dot])
    run_checked([cc, *FLAGS, "-static", "-o", exe, *COMMON, "csrc/backend/cpu/matmul_neon.c", dot, "-lpthread", "-lm"])
    out = run_checked([qemu, "-cpu", "max", exe])  # an emulated CPU with the dot product: both variants run
    assert "kernel variant neon\n" in out and "kernel variant neondot" in out, out
    assert out.strip().endswith(" 0 failed"), out
