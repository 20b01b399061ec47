"""The CUDA backend, whole, on the CPU: csrc/backend/cuda/cuda_ops.cu (the table: memory, streams, events,
the expert VRAM cache) and every kernel of csrc/backend/cuda/*.cu, compiled as C++ by clang-19 over the
emulator of tests/cuda_emu/ (README.md there: a fiber per lane, blocks one after another, __syncthreads and
warp shuffles as scheduling points, a mock runtime over host memory).

The module builds that variant of flashmoe once (CMake FLASHMOE_CUDA_EMU) into a directory of its own, then
runs, in subprocesses on it:
- test_op_harness_on_emulated_cuda: tests/test_ops.py's cases on backend "cuda" and
  tests/test_batch_invariance.py's checks, none skipped, lanes and blocks forward (about 30 s on one core);
  with --slow again in reverse order (FM_CUDA_EMU_ORDER): a race between lanes shows as a difference from
  the numpy reference or from another call's bits;
- test_model_on_emulated_cuda: the tiny transformers-checked models against the CPU backend of the same
  build, as tests/test_cuda_backend.py does on a GPU (16 bits and 4 bits with int8 activations; with --slow
  8 and 4 bits on fp32 and 8 on int8 too: ~4 s each), its GPU budget error and its test of the expert
  tiers (the VRAM cache of 1 and 3 slots, one expert a call: ~30 s a model; with --slow both models);
- the emulator's own tests (tests/cuda_emu/selftest.cu): right kernels give exact results, kernels broken on
  purpose are caught (a missing barrier reads NaN, a divergent barrier or shuffle, too much shared memory,
  a copy past an allocation, a race).

Needs clang-19 (Debian: clang-19); skips without it, and fails instead where FLASHMOE_CI_REQUIRE names
"clang19" (CI installs it).
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import backend_runs
from backend_runs import ROOT, assert_op_harness_passes, build_variant, run_py
pytestmark = pytest.mark.ci_feature("clang19")

EMU = ROOT / "tests" / "cuda_emu"


def _need_clang():
    if not shutil.which("clang-19") or not shutil.which("clang++-19"):
        pytest.skip("needs clang-19 (Debian: apt-get install clang-19)")


@pytest.fixture(scope="module")
def emu_env(tmp_path_factory):
    """The environment of a process that imports the emulated build (built here, once per module)."""
    _need_clang()
    target = tmp_path_factory.mktemp("cuda_emu_pkg")
    # FLASHMOE_CUDA_EMU_BUILD_DIR: keep the CMake build between runs (a developer's loop; CI builds fresh)
    build_dir = os.environ.get("FLASHMOE_CUDA_EMU_BUILD_DIR") or str(tmp_path_factory.mktemp("cuda_emu_build"))
    build_variant(target, build_dir, ["FLASHMOE_CUDA_EMU=ON"], dict(os.environ, CC="clang-19", CXX="clang++-19"),
                  "the emulated CUDA backend", timeout=900)
    env = dict(os.environ, PYTHONPATH=str(target), PYTHONDONTWRITEBYTECODE="1")
    env.pop("FM_CUDA_EMU_ORDER", None)
    return env


def test_emulated_build_has_cuda(emu_env):
    rc, out = run_py(emu_env, ["-c", "import flashmoe; from flashmoe import _core; "
                               "assert flashmoe.__file__.startswith(%r), flashmoe.__file__; "
                               "print(_core.backends(), _core.backend_has_device('cuda'))" % emu_env["PYTHONPATH"]])
    assert rc == 0, out
    backends, has = out.split()[-2:]
    assert "cuda" in backends.split(",") and has == "True", out


@pytest.mark.parametrize("order", ["forward", pytest.param("reverse", marks=pytest.mark.slow)])
def test_op_harness_on_emulated_cuda(emu_env, order):
    """Every case of tests/test_ops.py and every check of tests/test_batch_invariance.py on backend "cuda"
    (their ids hold "cuda"): passed, none skipped."""
    assert_op_harness_passes(dict(emu_env, FM_CUDA_EMU_ORDER=order), "cuda", tail=8000)


# ---------------------------------------------------------------------------------- the whole model


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return backend_runs.tiny_models(tmp_path_factory)


SLOW = pytest.mark.slow  # CI's time: the fp32 and the default (4-bit, int8) paths run there, the rest with --slow


@pytest.mark.torch
@pytest.mark.parametrize("bits,int8", [(16, False), pytest.param(8, False, marks=SLOW),
                                       pytest.param(4, False, marks=SLOW), pytest.param(8, True, marks=SLOW),
                                       (4, True)], ids=["16", "8", "4", "8-int8", "4-int8"])
@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_next"])
def test_model_on_emulated_cuda(emu_env, tiny_models, tmp_path, arch, bits, int8):
    """tests/test_cuda_backend.py's test_model_on_cuda on the emulator: the prompt in one call bitwise the
    prompt in calls cut at position 16; against the CPU within RTOL (int8 activations: INT8_RTOL there, which
    says why); the greedy tokens the same."""
    import test_cuda_backend
    test_cuda_backend.test_model_on_cuda(emu_env, tiny_models, tmp_path, arch, bits, int8)


# ---------------------------------------------------------------------------------- the emulator itself


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    """tests/cuda_emu/selftest.cu, rewritten and compiled with the emulator: the path of the program."""
    _need_clang()
    d = tmp_path_factory.mktemp("cuda_emu_selftest")
    src = d / "selftest.cpp"
    subprocess.run([sys.executable, str(EMU / "rewrite_cu.py"), str(EMU / "selftest.cu"), str(src)], check=True)
    exe = d / "selftest"
    proc = subprocess.run(["clang++-19", "-std=c++17", "-O1", "-ffp-contract=off", "-include",
                           str(EMU / "cuda_compat.h"), "-I", str(EMU), "-I", str(EMU / "include"), str(src),
                           str(EMU / "emu.cpp"), str(EMU / "cuda_runtime_emu.cpp"), "-o", str(exe)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


def _run(exe, case, **env):
    p = subprocess.run([str(exe), case], capture_output=True, text=True, timeout=60,
                       env=dict({k: v for k, v in os.environ.items() if k != "FM_CUDA_EMU_ORDER"}, **env))
    return p.returncode, p.stdout, p.stderr


def test_emulator_runs_right_kernels_exactly(selftest):
    rc, out, err = _run(selftest, "sum")
    assert rc == 0 and out.split() == ["sum", "-3", "ref", "-3"], out + err
    rc, out, err = _run(selftest, "misc")
    assert rc == 0, err
    got = [int(v) for v in out.split()[1:]]
    w = [3 * (31 - t) + 3 * (30 - t) for t in range(31)] + [0]  # after __shfl_down_sync
    assert got[:32] == [w[(t + 5) & 31] for t in range(32)], got
    assert got[32] == 0x77553311  # __byte_perm(0x33221100, 0x77665544, 0x7531)
    assert got[33] == 2 * 100 - 4  # __float2int_rn: ties to even
    assert got[34:] == [int(np.float32(2.0 ** -24).view(np.int32)), int(np.float32(-3.140625).view(np.int32))]


def test_emulator_catches_a_missing_barrier(selftest):
    """Shared memory starts as NaN each block: a lane that reads a slot before its writer ran reads NaN."""
    rc, out, err = _run(selftest, "sum_no_barrier")
    assert rc == 0 and out.split()[1] in ("nan", "-nan"), out + err


@pytest.mark.parametrize("case,message", [
    ("early_return", "divergent __syncthreads: 64 lanes returned while 64 wait"),
    ("shuffle_exited", "16 lanes returned while 16 wait at a warp function"),
    ("too_much_shared", "65536 bytes of static and 0 of dynamic shared memory"),
    ("copy_overrun", "516 bytes at offset 0 overrun a device allocation of 512 bytes"),
])
def test_emulator_ends_a_broken_kernel_saying_why(selftest, case, message):
    rc, out, err = _run(selftest, case)
    assert rc == 3 and "cuda-emu: error: " in err and message in err, (rc, out, err)


def test_emulator_orders_show_a_race(selftest):
    got = {o: _run(selftest, "last_writer", FM_CUDA_EMU_ORDER=o)[1].split()[-1] for o in ("forward", "reverse")}
    assert got == {"forward": "63", "reverse": "0"}, got


# ------------------------------------------------ tests/test_cuda_backend.py's GPU tests, on the emulator


@pytest.mark.torch
@pytest.mark.parametrize("arch", ["qwen3_5_moe", pytest.param("qwen3_next", marks=SLOW)])
def test_outputs_do_not_depend_on_the_expert_tiers_emulated(emu_env, tiny_models, tmp_path, arch, monkeypatch):
    """The VRAM expert cache (1 and 3 slots, copies through pinned host slots, events between the copy and
    compute streams) and one expert a call give the bits of everything resident (test_cuda_backend.py).
    Its memory plan comes from the emulated build (whose default backend is "cuda", with the CUDA table's
    scratch), not from this process's."""
    import json

    import flashmoe
    import test_cuda_backend

    def plan(path, **options):
        rc, out = run_py(emu_env, ["-c", "import json, sys, flashmoe; print(json.dumps(flashmoe.memory_plan("
                                   "sys.argv[1], **json.loads(sys.argv[2]))))", path, json.dumps(options)])
        assert rc == 0, out
        return json.loads(out.strip().splitlines()[-1])
    monkeypatch.setattr(flashmoe, "memory_plan", plan)
    test_cuda_backend.test_outputs_do_not_depend_on_the_expert_tiers(emu_env, tiny_models, tmp_path, arch)


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    from flashmoe.synth import write_random_model
    from test_engine_errors import TINY

    d = tmp_path_factory.mktemp("demo")
    write_random_model(d, TINY, bits=4, progress=False)
    return str(d)


def test_a_gpu_budget_too_small_is_a_clear_error_emulated(emu_env, demo_model):
    import test_cuda_backend
    test_cuda_backend.test_a_gpu_budget_too_small_is_a_clear_error(emu_env, demo_model)
