"""The Metal backend's Objective-C device layer (csrc/backend/metal/metal_host.m) and the shader source it
embeds, checked where no Mac exists.

- test_objc_syntax: metal_host.m through `clang-19 -x objective-c -fobjc-arc -fblocks -fsyntax-only`
  (warnings as errors) against tests/metal_objc/: the few Foundation and Metal declarations it calls,
  copied from Apple's documentation (tests/metal_objc/README.md). Selectors, argument and return types,
  ARC's rules and blocks are checked; a declaration written wrong both there and here is not.
- test_objc_check_catches_*: the same check on a copy of metal_host.m with one call broken on purpose
  must fail, naming what is wrong.
- test_objc_availability (zig, for macOS 14 arm64, as .ci/cross_compile.py compiles it): an API newer than
  macOS 14 used outside `@available` must fail to compile.
- test_embedded_shaders_*: csrc/backend/metal/embed_shaders.py takes every metal/*.metal; each unit it
  makes (fm_metal_args.h in front of the file, as metal_host.m compiles it) compiles as C++ under the
  emulator's compatibility header; the generated C compiles; every kernel of FM_MTL_KERNELS is defined
  by exactly one file.

Needs clang-19 (Debian: clang-19); skips without it, and fails instead where FLASHMOE_CI_REQUIRE names
"clang19" (CI installs it). test_objc_availability needs ziglang (pip), which .ci/run installs for its
cross compile; it skips without it unless FLASHMOE_CI_REQUIRE is "all".
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOST = ROOT / "csrc" / "backend" / "metal" / "metal_host.m"
EMBED = ROOT / "csrc" / "backend" / "metal" / "embed_shaders.py"
DECLS = ROOT / "tests" / "metal_objc"
EMU = ROOT / "tests" / "metal_emu"
INCLUDES = ["-I", str(DECLS), "-I", str(ROOT / "csrc" / "include"), "-I", str(ROOT / "metal"),
            "-I", str(HOST.parent)]
# -fobjc-runtime: Apple's runtime (clang's default on Linux is GNUstep's, which has no ARC here).
OBJC = ["-x", "objective-c", "-fobjc-arc", "-fblocks", "-fobjc-runtime=macosx-14.0", "-std=gnu11",
        "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror"]

CLANG19 = pytest.mark.ci_feature("clang19")  # every test but the zig one (ziglang is .ci/run's, not ci.yml's)


def clang(name="clang-19"):
    path = shutil.which(name)
    if path is None:
        pytest.skip("needs clang-19 (Debian: apt-get install clang-19)")
    return path


def objc_check(src: Path):
    return subprocess.run([clang(), *OBJC, "-fsyntax-only", *INCLUDES, str(src)], capture_output=True,
                          text=True, timeout=120)


@CLANG19
def test_objc_syntax():
    p = objc_check(HOST)
    assert p.returncode == 0, p.stderr[-4000:]


# (what is broken, the call as written, the broken call, a word the error must name)
BREAKS = [
    ("selector", "[d->enc setBuffer:", "[d->enc setBuffers:", "setBuffers"),
    ("argument type", "threadsPerThreadgroup:MTLSizeMake(g->threads[0], g->threads[1], g->threads[2])",
     "threadsPerThreadgroup:g->threads[0]", "MTLSize"),
    ("enum constant", "status == MTLCommandBufferStatusError", "status == MTLCommandBufferStatusFailed",
     "MTLCommandBufferStatusFailed"),
    ("ARC bridge", "(__bridge_retained void *)buf", "(void *)buf", "bridge"),
    ("block signature", "addCompletedHandler:^(id<MTLCommandBuffer> done)", "addCompletedHandler:^(int done)",
     "MTLCommandBufferHandler"),
]


@CLANG19
@pytest.mark.parametrize("what,good,bad,word", BREAKS, ids=[b[0].replace(" ", "_") for b in BREAKS])
def test_objc_check_catches_a_broken_call(tmp_path, what, good, bad, word):
    text = HOST.read_text()
    assert text.count(good) >= 1, f"metal_host.m no longer has {good!r}: update this test"
    broken = tmp_path / "metal_host.m"
    broken.write_text(text.replace(good, bad, 1))
    p = objc_check(broken)
    assert p.returncode != 0, f"a broken {what} passed the check"
    assert word in p.stderr, p.stderr[-3000:]


def test_objc_availability(tmp_path):
    """mathMode is macOS 15 API: outside `if (@available(macOS 15.0, *))` the macOS 14 build fails."""
    if importlib.util.find_spec("ziglang") is None:
        pytest.skip("needs ziglang (pip install ziglang), as .ci/cross_compile.py")
    zig = [sys.executable, "-m", "ziglang", "cc", "-target", "aarch64-macos.14.0"]
    flags = [f for f in OBJC if not f.startswith("-fobjc-runtime")]  # zig targets Apple's runtime already
    cache = str(tmp_path / "zig")
    env = {**os.environ, "ZIG_GLOBAL_CACHE_DIR": cache, "ZIG_LOCAL_CACHE_DIR": cache}
    ok = subprocess.run([*zig, *flags, *INCLUDES, "-c", str(HOST), "-o", str(tmp_path / "ok.o")],
                        capture_output=True, text=True, timeout=300, env=env)
    assert ok.returncode == 0, ok.stderr[-4000:]
    text = HOST.read_text()
    guard = "if (@available(macOS 15.0, *)) {"
    assert guard in text
    broken = tmp_path / "metal_host.m"
    broken.write_text(text.replace(guard, "if (1) {", 1))
    bad = subprocess.run([*zig, *flags, *INCLUDES, "-c", str(broken), "-o", str(tmp_path / "bad.o")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode != 0 and "only available on macOS 15.0" in bad.stderr, bad.stderr[-3000:]


# ---------------------------------------------------------------- the embedded shader source

def kernel_names():
    """FM_MTL_KERNELS' names, from metal_device.h."""
    text = (HOST.parent / "metal_device.h").read_text()
    block = text[text.index("#define FM_MTL_KERNELS(X)"):]
    block = block[:block.index("\n\n")]
    return re.findall(r'X\(\w+,\s*"(\w+)"\)', block)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    out = tmp_path_factory.mktemp("embed")
    p = subprocess.run([sys.executable, str(EMBED), str(ROOT / "metal"), "--c", str(out / "shaders.c"),
                        "--metal-dir", str(out / "units")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return out


def test_embedded_shaders_take_every_file(embedded):
    files = sorted(p.name for p in (ROOT / "metal").glob("*.metal"))
    assert sorted(p.name for p in (embedded / "units").glob("*.metal")) == files
    c = (embedded / "shaders.c").read_text()
    assert f"const int fm_mtl_shader_count = {len(files)};" in c
    for unit in (embedded / "units").glob("*.metal"):
        text = unit.read_text()
        assert text.count("#include <metal_stdlib>") == 1 and '#include "fm_metal_args.h"' not in text
        assert "typedef struct" in text  # fm_metal_args.h's structs are in front


@CLANG19
def test_embedded_shaders_compile(embedded, tmp_path):
    """Each unit alone (no -I metal: it needs nothing outside itself) as C++ under the emulator's header,
    and the generated C file."""
    cxx = clang("clang++-19")
    for unit in sorted((embedded / "units").glob("*.metal")):
        p = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", "-Wno-unknown-attributes",
                            "-Wno-register", "-I", str(EMU), "-I", str(EMU / "include"), "-include",
                            str(EMU / "metal_compat.h"), "-x", "c++", str(unit)],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, f"{unit.name}\n{p.stderr[-3000:]}"
    p = subprocess.run([clang(), "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-c",
                        str(embedded / "shaders.c"), "-o", str(tmp_path / "shaders.o")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]


def test_every_kernel_is_defined_once():
    names = kernel_names()
    assert names, "FM_MTL_KERNELS not found in metal_device.h"
    where = {}
    for f in sorted((ROOT / "metal").glob("*.metal")):
        for name in re.findall(r"\bkernel\s+void\s+(\w+)\s*\(", f.read_text()):
            where.setdefault(name, []).append(f.name)
    missing = [n for n in names if n not in where]
    twice = {n: fs for n, fs in where.items() if len(fs) > 1}
    assert not missing, f"FM_MTL_KERNELS names kernels no .metal file defines: {missing}"
    assert not twice, f"kernels defined in more than one file: {twice}"


@CLANG19
def test_buffer_table(tmp_path):
    """metal_host.m's table of buffers (metal_ranges.h: sorted ranges, binary search for any interior
    address, overlap refusal) against a brute force, under AddressSanitizer."""
    exe = tmp_path / "test_metal_ranges"
    p = subprocess.run([clang(), "-std=gnu11", "-O1", "-g", "-fsanitize=address,undefined", "-Wall",
                        "-Wextra", "-Werror", "-I", str(HOST.parent),
                        str(ROOT / "tests" / "c" / "test_metal_ranges.c"), "-o", str(exe)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"})
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
