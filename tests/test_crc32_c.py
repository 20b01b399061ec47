"""The engine's CRC-32 variants in C (tests/c/test_crc32.c): natively (PCLMULQDQ folding on x86-64), and
for arm64 (the CRC32 instructions) built with the AArch64 cross compiler and run under qemu-user when
those are installed (CI installs them)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["tests/c/test_crc32.c", "csrc/core/crc32.c"]
FLAGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-Icsrc/include"]


def build_and_run(cc, exe, *run_prefix, extra=()):
    cmds = [[cc, *FLAGS, *extra, "-o", str(exe), *SOURCES, "-lpthread"], [*run_prefix, str(exe)]]
    for cmd in cmds:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip().endswith(" 0 failed"), proc.stdout
    return proc.stdout


def test_crc32_native(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not (ROOT / SOURCES[0]).exists():
        pytest.skip("no C compiler or no source tree")
    build_and_run(cc, tmp_path / "test_crc32")


def test_crc32_arm64_under_qemu(tmp_path):
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if cc is None or qemu is None:
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64 (Debian: gcc-aarch64-linux-gnu qemu-user)")
    build_and_run(cc, tmp_path / "test_crc32_arm64", qemu, "-cpu", "max", extra=["-static"])
