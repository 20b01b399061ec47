"""What the tests of a GPU backend share (tests/test_metal_backend.py, tests/test_cuda_backend.py): a
flashmoe variant built from these sources into a directory of its own, processes run on it, the op harness
on the backend, the tiny transformers-checked models, and one model run on one backend (run_model.py)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
RTOL = 1e-3  # as tests/test_models.py against transformers: fp32 on both sides, summation orders apart


def build_variant(target, build_dir, defines, env, what, timeout=1500):
    """pip install these sources into `target` with the CMake `defines` (name=value), or fail saying `what`."""
    cmake = [a for d in defines for a in ("-C", f"cmake.define.{d}")]
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(ROOT), *cmake, "-C", f"build-dir={build_dir}"],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"building {what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def run_py(env, args, timeout=1200):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    return proc.returncode, proc.stdout + proc.stderr


def assert_op_harness_passes(env, backend, tail=6000):
    """Every case of tests/test_ops.py and every check of tests/test_batch_invariance.py on `backend` (their
    ids hold its name): passed, none skipped (a skip there is an op the backend's table lacks)."""
    rc, out = run_py(env, ["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_ops.py",
                           "tests/test_batch_invariance.py", "-k", backend])
    assert rc == 0, out[-tail:]
    summary = out.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, out[-tail:]
    assert int(summary.split(" passed")[0].split()[-1]) >= 300, summary


def tiny_models(tmp_path_factory):
    """(arch, bits, **config overrides) -> packed tiny model directory (tests/hf_fixtures.py's transformers
    models), each converted once; for a module-scoped fixture."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from hf_fixtures import make_hf_model, save_checkpoint

    import flashmoe
    cache = {}

    def get(arch, bits, **overrides):
        key = (arch, bits, *sorted(overrides.items()))
        if key not in cache:
            ckpt = save_checkpoint(make_hf_model(arch, seed=0, **overrides), tmp_path_factory.mktemp("hf"))
            cache[key] = str(tmp_path_factory.mktemp(f"packed{bits}"))
            flashmoe.convert(ckpt, cache[key], bits=bits, progress=False, overwrite=True)
        return cache[key]
    return get


def run_model(env, tmp_path, path, backend, ids, name, *options, extra_env=None):
    """run_model.py on `backend` in a process of env (+ extra_env): its prefill, steps, greedy and device."""
    np.save(tmp_path / "ids.npy", ids)
    out = tmp_path / f"{name}.npz"
    rc, log = run_py(dict(env, **(extra_env or {})), [str(ROOT / "tests" / "run_model.py"), path, backend,
                                                       str(tmp_path / "ids.npy"), str(out), *options])
    assert rc == 0, log[-4000:]
    return np.load(out)
