#!/usr/bin/env python3
"""Compile the C core (and the pybind11 module) for targets this machine cannot run:
aarch64-macos and x86_64-macos with PyPI's ziglang (it ships Darwin's libc headers), aarch64-linux-gnu
with Debian's cross gcc, and x86_64-linux-gnu (this machine's gcc, which the native build runs without -Werror). Warnings are errors. Nothing is linked or run: this catches what the native
build cannot (a macro of Darwin's headers, a Linux-only call, an #ifdef left unguarded).

The sources, the per-file ISA flags and the per-architecture selection come from CMakeLists.txt, so
that a file added there is checked here without editing this script; every .c under csrc/ must be
named there.

    python .ci/cross_compile.py [TARGET ...]     # default: all four; exits 1 if any compile fails
"""

import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ZIG = [sys.executable, "-m", "ziglang"]
MACOS = "14.0"  # the wheel's MACOSX_DEPLOYMENT_TARGET (pyproject.toml): APIs newer than it are flagged
# target -> (C compiler, C++ compiler, architecture for CMakeLists.txt's selection)
TARGETS = {
    "aarch64-macos": (ZIG + ["cc", "-target", f"aarch64-macos.{MACOS}"],
                      ZIG + ["c++", "-target", f"aarch64-macos.{MACOS}"], "aarch64"),
    "x86_64-macos": (ZIG + ["cc", "-target", f"x86_64-macos.{MACOS}"],
                     ZIG + ["c++", "-target", f"x86_64-macos.{MACOS}"], "x86_64"),
    "aarch64-linux-gnu": (["aarch64-linux-gnu-gcc"], ["aarch64-linux-gnu-g++"], "aarch64"),
    # The native build prints its warnings but does not fail on them: here it does.
    "x86_64-linux-gnu": (["x86_64-linux-gnu-gcc"], ["x86_64-linux-gnu-g++"], "x86_64"),
}
# What CMakeLists.txt gives every file of flashmoe_core (target_compile_options, C_STANDARD 11 without
# extensions off: CMake passes -std=gnu11, POSITION_INDEPENDENT_CODE: -fPIC, Release: -O3 -DNDEBUG).
COMMON = ["-std=gnu11", "-fPIC", "-O3", "-DNDEBUG", "-Wall", "-Wextra", "-Wno-unused-parameter",
          "-fno-math-errno", "-fno-trapping-math", "-Werror", "-Icsrc/include"]


def cmake_sources():
    """{file: [flags]} of every C source CMakeLists.txt compiles, per architecture ("all" for both)."""
    text = (ROOT / "CMakeLists.txt").read_text()
    flags = {f: opts.split(";") for f, opts in re.findall(
        r'set_source_files_properties\((\S+\.c) PROPERTIES COMPILE_OPTIONS\s+"([^"]+)"', text)}
    core = re.search(r"add_library\(flashmoe_core STATIC(.*?)\)", text, re.S).group(1).split()
    per_arch = {"all": core}
    for cond, body in re.findall(r'if\(CMAKE_SYSTEM_PROCESSOR MATCHES "([^"]+)"\)(.*?)(?=elseif|endif)', text, re.S):
        arch = "x86_64" if "x86_64" in cond else "aarch64"
        per_arch[arch] = re.search(r"target_sources\(flashmoe_core PRIVATE([^)]*)\)", body).group(1).split()
    named = {f for files in per_arch.values() for f in files}
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.c")}
    if on_disk - named:
        sys.exit(f"error: C sources not in CMakeLists.txt (add them there or here): {sorted(on_disk - named)}")
    return per_arch, flags


def jobs(target):
    cc, cxx, arch = TARGETS[target]
    per_arch, flags = cmake_sources()
    out = []
    for f in per_arch["all"] + per_arch.get(arch, []):
        isa = flags.get(f, [])
        if target == "aarch64-macos":  # zig's clang has no armv8.2-a+dotprod spelling; Apple's M1 has it
            isa = ["-mcpu=apple_m1" if x.startswith("-march=armv8.2-a") else x for x in isa]
        out.append((f, cc + COMMON + isa + ["-c", f]))
    # The pybind11 module, as pybind11_add_module compiles it (hidden visibility); -O0 to save time, and
    # Python.h is this host's (the same declarations on every target). Compiled, not -fsyntax-only:
    # zig's driver then fails to move an output it never made.
    try:
        import pybind11
        out.append(("csrc/python/module.cpp",
                    cxx + ["-std=c++17", "-fPIC", "-fvisibility=hidden", "-O0", "-Wall", "-Wextra",
                           "-Wno-unused-parameter", "-Werror", "-Icsrc/include", "-isystem", pybind11.get_include(),
                           "-isystem", sysconfig.get_paths()["include"], "-c", "csrc/python/module.cpp"]))
    except ImportError:
        print("note: pybind11 not installed: csrc/python/module.cpp not checked", file=sys.stderr)
    return out


def main(targets):
    failed, t0 = [], time.time()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        def run(target, name, cmd):
            cmd = cmd + ["-o", os.path.join(tmp, f"{target}-{name.replace('/', '_')}.o")]
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                               env={**os.environ, "ZIG_GLOBAL_CACHE_DIR": os.path.join(tmp, "zig-cache"),
                                    "ZIG_LOCAL_CACHE_DIR": os.path.join(tmp, "zig-cache")})
            return target, name, p
        futures = [pool.submit(run, t, n, c) for t in targets for n, c in jobs(t)]
        for fut in futures:
            target, name, p = fut.result()
            if p.returncode != 0:
                failed.append(f"{target}: {name}")
                print(f"FAIL {target}: {name}\n{p.stdout}{p.stderr}", file=sys.stderr)
    n = len(futures)
    print(f"cross-compile: {n - len(failed)}/{n} compiled for {', '.join(targets)} in {time.time() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    unknown = set(sys.argv[1:]) - set(TARGETS)
    if unknown:
        sys.exit(f"unknown targets {sorted(unknown)}; known: {', '.join(TARGETS)}")
    sys.exit(main(sys.argv[1:] or list(TARGETS)))
