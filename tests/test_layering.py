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
