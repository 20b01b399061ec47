"""The layering of csrc/ (docs/ARCHITECTURE.md): the core, the models and the expert store reach the CPU
kernels only through the backend interface (csrc/backend/backend.h). A test of the sources, so the wheel
check (.ci/wheel_check.sh) leaves it out."""

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
