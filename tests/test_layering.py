"""The layering of csrc/ (docs/ARCHITECTURE.md): the core, the models and the expert store reach the CPU
kernels only through the backend interface (csrc/backend/backend.h); and the CUDA kernels' launch contract
(csrc/backend/cuda/launch.cuh). A test of the sources, so the wheel check (.ci/wheel_check.sh) leaves it out."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_core_and_models_include_no_cpu_backend_header():
    """csrc/core, csrc/models and csrc/io reach the CPU kernels only through csrc/backend/backend.h."""
    include = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)
    offenders = []
    for sub in ("core", "models", "io"):
        for name in os.listdir(os.path.join(ROOT, "csrc", sub)):
            with open(os.path.join(ROOT, "csrc", sub, name), encoding="utf-8") as f:
                text = f.read()
            offenders += [f"{sub}/{name}: {inc}" for inc in include.findall(text) if "backend/cpu" in inc
                          or inc in ("cpu.h", "threads.h", "matmul.h")]
            offenders += [f"{sub}/{name}: calls {c}" for c in re.findall(r"\bfm_cpu_(?!use_avx2)\w+", text)]
    assert not offenders


def test_the_default_backend_checks_every_op():
    """backend.c picks Metal by default only where its table fills in every op, and a model loads on a
    table only then: its list of the table's fields (fm_backend_missing_op()) must name every field of
    fm_backend_ops (backend.h), in order, but the optional ops at its end, which it must not name."""
    src = os.path.join(ROOT, "csrc", "backend")
    h = open(os.path.join(src, "backend.h"), encoding="utf-8").read()
    struct = h[h.index("typedef struct fm_backend_ops {"):h.index("} fm_backend_ops;")]
    required, optional = struct.split("/* ---- optional")
    fields, optional = (re.findall(r"\(\*(\w+)\)\(", part) for part in (required, optional))
    c = open(os.path.join(src, "backend.c"), encoding="utf-8").read()
    body = c[c.index("const struct { const void *fn;"):]
    listed = re.findall(r"OP\((\w+)\)", body[:body.index("#undef OP")])
    assert fields and listed == fields, (sorted(set(fields) - set(listed)), sorted(set(listed) - set(fields)))
    assert optional and not set(optional) & set(listed), optional


def test_every_cuda_kernel_waits_for_the_kernels_before_it():
    """csrc/backend/cuda/launch.cuh: with programmatic dependent launch a kernel starts before the one before it
    has ended, and only its fmc_pdl_wait() holds it until that one has completed and its writes are visible; so
    every __global__ function begins with it (then fmc_pdl_trigger(), which lets the next one launch), before
    any access to memory. And every launch is fmc_launch: no <<<>>> in csrc/backend/cuda/."""
    src = os.path.join(ROOT, "csrc", "backend", "cuda")
    kernels, offenders = [], []
    for name in sorted(os.listdir(src)):
        if not name.endswith((".cu", ".cuh", ".h")):
            continue
        with open(os.path.join(src, name), encoding="utf-8") as f:
            text = re.sub(r"/\*.*?\*/|//[^\n]*", "", f.read(), flags=re.S)
        if "<<<" in text:
            offenders.append(f"{name}: a <<<>>> launch")
        for m in re.finditer(r"\b__global__\b", text):
            brace = text.index("{", m.end())
            kernel = [k for k in re.findall(r"(\w+)\s*\(", text[m.end():brace]) if k != "__launch_bounds__"][0]
            kernels.append(kernel)
            if not re.match(r"\s*fmc_pdl_wait\(\),\s*fmc_pdl_trigger\(\);", text[brace + 1:]):
                offenders.append(f"{name}: {kernel} does not begin with fmc_pdl_wait(), fmc_pdl_trigger();")
    assert len(kernels) >= 28 and not offenders, (kernels, offenders)
