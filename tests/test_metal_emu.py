"""The Metal shaders (metal/*.metal) before they run: the emulator's launcher generator and the
address-space pass. The kernels themselves run in tests/test_metal_backend.py, through the Metal backend's
table on the emulated device (tests/metal_emu/README.md).

- test_emulator_refuses_kernel_scope_threadgroup_memory: a kernel-scope threadgroup array would be private
  to each lane in C++ (metal_compat.h), so tests/metal_emu/gen_launcher.py refuses it.
- test_address_spaces: every shader through `clang-19 -x clcpp -cl-std=clc++2021 -fsyntax-only` with
  Metal's address spaces as OpenCL's; a threadgroup pointer passed as a device one must be rejected, and so
  must a kernel-scope threadgroup variable.

Needs clang-19 (Debian: clang-19); skips without it, and fails instead where FLASHMOE_CI_REQUIRE names
"clang19" (CI installs it).
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EMU = ROOT / "tests" / "metal_emu"
BROKEN = EMU / "broken"
SHADERS = sorted((ROOT / "metal").glob("*.metal"))
INCLUDES = ["-I", str(ROOT / "metal"), "-I", str(EMU), "-I", str(EMU / "include")]
CXXFLAGS = ["-std=c++17", "-Wall", "-Werror",
            "-Wno-unknown-attributes",  # [[buffer(0)]] and the other Metal attributes: the launcher maps them
            "-Wno-register", *INCLUDES]  # (threadgroup is `register` there: metal_compat.h)

pytestmark = pytest.mark.ci_feature("clang19")
sys.path.insert(0, str(EMU))
import gen_launcher  # noqa: E402


def clang(name="clang++-19"):
    path = shutil.which(name)
    if path is None:
        pytest.skip("needs clang-19 (Debian: apt-get install clang-19)")
    return path


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
