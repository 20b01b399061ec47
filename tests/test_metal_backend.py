"""The Metal backend, whole, on the CPU: csrc/backend/metal/metal_ops.c (the backend's table: argument
structs, grids, bindings, command buffers) over the grid emulator's device layer
(tests/metal_emu/device_emu.cpp), with every metal/*.metal kernel compiled as C++ by clang-19.

The module builds that variant of flashmoe once (CMake FLASHMOE_METAL_EMU, under AddressSanitizer) into a
directory of its own, then runs, in subprocesses on it, with every dispatch run in three lane orders that
must leave the same bytes (FM_EMU_ORDERS=all):
- test_op_harness_on_metal: tests/test_ops.py's cases on backend "metal", the harness every backend
  answers to (its inputs, numpy references and tolerances), and tests/test_batch_invariance.py's checks
  that a token's bits do not depend on its call, none of them skipped;
- test_model_on_metal: the tiny transformers-checked models (tests/hf_fixtures.py) at 16, 8 and 4 bits,
  loaded with backend="metal": the prompt's logits in one call and token by token, and greedy tokens,
  against the CPU backend of the same build.

Needs clang-19 (Debian: clang-19); skips without it, and fails instead where FLASHMOE_CI_REQUIRE names
"clang19" (CI installs it). tests/test_metal_emu.py has the emulator's own tests. On a Mac whose flashmoe
was built with the Metal backend the same tests run on the GPU, with no emulator (the FM_EMU_* tests of
the emulated device's fault and limit injection skip there).
"""

import concurrent.futures
import os
import shutil
import subprocess

import numpy as np
import pytest

import backend_runs
from backend_runs import RTOL, assert_op_harness_passes, build_variant, run_model, run_py
pytestmark = pytest.mark.ci_feature("clang19")


def _asan_runtime():
    out = subprocess.run(["clang-19", "-print-file-name=libclang_rt.asan-x86_64.so"], capture_output=True, text=True)
    path = out.stdout.strip()
    return path if out.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


@pytest.fixture(scope="module")
def emu_env(tmp_path_factory):
    """The environment of a process that imports the emulated build (built here, once per module). Where
    this flashmoe has the Metal backend itself (a Mac), the tests run on it instead, on the GPU."""
    import flashmoe
    if "metal" in flashmoe.backends() and (os.environ.get("FLASHMOE_BACKEND") or "auto") in ("auto", "metal"):
        return dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    if not shutil.which("clang-19") or not shutil.which("clang++-19"):
        pytest.skip("needs clang-19 (Debian: apt-get install clang-19)")
    asan = _asan_runtime()
    if asan is None:
        pytest.skip("clang-19 has no AddressSanitizer runtime here")
    target = tmp_path_factory.mktemp("metal_emu_pkg")
    # FLASHMOE_METAL_EMU_BUILD_DIR: keep the CMake build between runs (a developer's loop; CI builds fresh)
    build_dir = os.environ.get("FLASHMOE_METAL_EMU_BUILD_DIR") or str(tmp_path_factory.mktemp("metal_emu_build"))
    env = dict(os.environ, CC="clang-19", CXX="clang++-19")
    # pybind11's -flto and ASan's module constructors do not link together with GNU ld
    build_variant(target, build_dir, ["FLASHMOE_METAL_EMU=ON", "FLASHMOE_METAL_EMU_ASAN=ON",
                                      "CMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF"], env,
                  "the emulated Metal backend", timeout=900)
    return dict(os.environ, PYTHONPATH=str(target), LD_PRELOAD=asan,
                # no fake stacks: a lane start would map one and its end unmap it (6x the time; emu.cpp)
                ASAN_OPTIONS="detect_leaks=0:detect_stack_use_after_return=0",
                FM_EMU_ORDERS="all", PYTHONDONTWRITEBYTECODE="1")


@pytest.fixture
def emulated(emu_env):
    """emu_env, where it is the emulated build (the fault and limit injection are the emulator's)."""
    if "PYTHONPATH" not in emu_env:
        pytest.skip("fault and limit injection exist on the emulated device only")
    return emu_env


def test_emulated_build_has_metal(emu_env):
    rc, out = run_py(emu_env, ["-c", "import flashmoe; from flashmoe import _core; "
                               "assert flashmoe.__file__.startswith(%r), flashmoe.__file__; print(_core.backends())"
                               % emu_env.get("PYTHONPATH", "")])
    assert rc == 0, out
    assert "metal" in out.split()[-1].split(","), out


def test_op_harness_on_metal(emu_env):
    """Every case of tests/test_ops.py and every batch-invariance check of tests/test_batch_invariance.py
    on backend "metal" (their ids hold "metal"): passed, none skipped (a skip there is an op the Metal
    table lacks)."""
    assert_op_harness_passes(emu_env, "metal")


# ---------------------------------------------------------------------------------- the whole model


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return backend_runs.tiny_models(tmp_path_factory)


@pytest.fixture(scope="module")
def model_runs(request, emu_env, tiny_models, tmp_path_factory):
    """test_model_on_metal's runs, CPU and Metal, of every case selected in this session, started together
    on a pool of as many workers as the machine has cores (each emulated run is one single-threaded process
    of ~20 s): (arch, bits, int8) -> a future of {backend: outputs}. A test waits for its own case; a failed
    run fails that test alone."""
    cases = sorted({(it.callspec.params["arch"], it.callspec.params["bits"], it.callspec.params["int8"])
                    for it in request.session.items if getattr(it, "originalname", "") == "test_model_on_metal"})
    paths = {(arch, bits): tiny_models(arch, bits) for arch, bits, _ in cases}  # here: converting uses torch
    ids = np.random.default_rng(1).integers(0, 251, 21)

    def run(case):
        arch, bits, int8 = case
        tmp = tmp_path_factory.mktemp(f"{arch}-{bits}-{int8}")
        return {backend: run_model(emu_env, tmp, paths[(arch, bits)], backend, ids, backend, "prefill_chunk=16",
                                   f"int8_activations={int8}") for backend in ("cpu", "metal")}

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        yield {case: pool.submit(run, case) for case in cases}


@pytest.mark.torch
@pytest.mark.parametrize("bits,int8", [(16, False), (8, False), (4, False), (8, True), (4, True)],
                         ids=["16", "8", "4", "8-int8", "4-int8"])
@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_next"])
def test_model_on_metal(model_runs, arch, bits, int8):
    """The tiny transformers-checked models on backend "metal" against the CPU backend: a 21-token prompt
    in one call (two chunks of 16) and token by token, and 6 greedy tokens after it.

    - Metal's own batch invariance: the prompt in one call gives the bits of the prompt token by token (its
      gated delta rule is the recurrent form for every call).
    - Against the CPU, with fp32 activations: both within RTOL. With int8 activations (the default), token
      by token within RTOL, and the one-call prompt not compared: the CPU's chunked gated delta rule
      (a prompt's form there, backend.h) is another fp32 function than the recurrent one, and the
      difference moves an int8 rounding across its boundary now and then, a step of 1e-3..1e-2 in these
      tiny models' logits (tests/test_models.py says more); token by token both backends compute the
      recurrent form.
    - The greedy tokens the same."""
    got = model_runs[(arch, bits, int8)].result()
    cpu, metal = got["cpu"], got["metal"]
    assert np.array_equal(metal["prefill"].view(np.uint32), metal["steps"].view(np.uint32)), \
        "metal: the prompt in one call differs from the prompt token by token"
    for key in ("steps",) if int8 else ("prefill", "steps"):
        err = float(np.abs(metal[key] - cpu[key]).max() / np.abs(cpu[key]).max())
        assert err <= RTOL, f"{key}: metal vs cpu {err:.2e}"
    assert metal["greedy"].tolist() == cpu["greedy"].tolist()


# ------------------------------------------------------------------------ the GPU's working-set limit

LIMIT_CHECK = """
import sys, flashmoe
from flashmoe.errors import FlashMoEError
path, budget = sys.argv[1], int(sys.argv[2]) or None
try:
    plan = flashmoe.memory_plan(path, backend="metal", memory_budget=budget)
    print("plan", plan["budget"], plan["minimum"])
except FlashMoEError as e:
    print("error", type(e).__name__, e)
"""


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    from flashmoe.synth import write_random_model
    path = tmp_path_factory.mktemp("demo")
    write_random_model(path, progress=False)
    return str(path)


def test_memory_plan_holds_to_the_gpu_working_set(emulated, demo_model):
    """The emulated device reports FM_EMU_WORKING_SET as the GPU's recommended working set: the default
    budget is cut to it, a budget over it or a model whose minimum exceeds it is a MemoryBudgetError that
    names the limit and the sysctl that raises it."""
    def plan(limit, budget=0):
        rc, out = run_py(dict(emulated, FM_EMU_WORKING_SET=str(limit)), ["-c", LIMIT_CHECK, demo_model, str(budget)])
        assert rc == 0, out
        return out.strip().splitlines()[-1].split(" ", 1)

    kind, text = plan(0)  # no limit: the default budget (half the RAM) stands
    assert kind == "plan", text
    default_budget, minimum = map(int, text.split())
    limit = minimum + (default_budget - minimum) // 3
    kind, text = plan(limit)
    assert kind == "plan" and int(text.split()[0]) == limit, text
    kind, text = plan(limit, budget=limit + (1 << 20))
    assert kind == "error" and "MemoryBudgetError" in text and "iogpu.wired_limit_mb" in text, text
    kind, text = plan(minimum - 1)
    assert kind == "error" and "MemoryBudgetError" in text and "the least this model needs" in text, text


# ------------------------------------------------------------------- a failed command buffer

FAULT_CHECK = """
import sys
import numpy as np
import flashmoe
from flashmoe import _core
from flashmoe.errors import DeviceError
x = np.ones((2, 10), np.float32)
if sys.argv[1] == "op":
    for i in range(3):  # FM_EMU_FAIL_DISPATCH=2: the second call's command buffer fails
        try:
            y = _core.op_add(x, x, backend="metal")
            print("ok", float(y.sum()))
        except DeviceError as e:
            print("DeviceError", e)
else:
    path, ids = sys.argv[2], list(range(3, 40))
    m = flashmoe.load(path, backend="metal", prefill_chunk=16)
    try:
        m.forward(ids)
        print("no error")
    except DeviceError as e:
        print("DeviceError", e)
    after = m.forward(ids)
    fresh = flashmoe.load(path, backend="metal", prefill_chunk=16).forward(ids)
    print("same" if np.array_equal(after, fresh) else "differs")
"""


def test_failed_command_buffer_is_an_error(emulated):
    """A command buffer whose status is an error (FM_EMU_FAIL_DISPATCH: the emulated device fails the one
    holding that dispatch) raises DeviceError naming it, never returns its output; the next call works."""
    rc, out = run_py(dict(emulated, FM_EMU_FAIL_DISPATCH="2"), ["-c", FAULT_CHECK, "op"])
    assert rc == 0, out
    lines = [ln for ln in out.splitlines() if ln.startswith(("ok", "DeviceError"))]
    assert lines[0] == "ok 40.0" and lines[2] == "ok 40.0", out
    assert lines[1].startswith("DeviceError") and "command buffer" in lines[1], out


FAULTS_AT = [5, 60]


@pytest.fixture(scope="module")
def fault_runs(emu_env, demo_model):
    """test_model_after_a_gpu_fault_is_a_fresh_model's processes (~28 s each, one core), all started at once:
    dispatch -> a future of run_py's (rc, out). The emulated device's fault injection (as `emulated`)."""
    if "PYTHONPATH" not in emu_env:
        pytest.skip("fault and limit injection exist on the emulated device only")
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        yield {at: pool.submit(run_py, dict(emu_env, FM_EMU_FAIL_DISPATCH=str(at), FM_EMU_ORDERS="forward"),
                               ["-c", FAULT_CHECK, "model", demo_model]) for at in FAULTS_AT}


@pytest.mark.parametrize("at", FAULTS_AT)
def test_model_after_a_gpu_fault_is_a_fresh_model(fault_runs, at):
    """A GPU fault inside a prompt (at its 5th or 60th dispatch): DeviceError, and the model's next call
    gives bitwise what a freshly loaded model gives (the sequence was reset, no slot left pinned)."""
    rc, out = fault_runs[at].result()
    assert rc == 0, out[-3000:]
    assert "DeviceError" in out and "command buffer" in out and "same" in out.splitlines()[-1], out[-3000:]


# --------------------------------------------- the emulator's checks, through the whole backend

OPS = ["tests/test_ops.py", "-k", "metal and (rmsnorm or add)"]


@pytest.mark.parametrize("replace, orders, tests, expect", [
    ("fm_rmsnorm=fm_rmsnorm__rmsnorm_race", "all", OPS, "lanes forward and reverse leave different bytes"),
    ("fm_rmsnorm=fm_rmsnorm__rmsnorm_no_barrier", "all", OPS, "leave different bytes"),
    ("fm_rmsnorm=fm_rmsnorm__rmsnorm_no_barrier", "forward", OPS, "nan"),  # the poison reaches the output
    ("fm_add=fm_add__add_oob", "all", OPS, "AddressSanitizer: heap-buffer-overflow"),
    ("fm_rmsnorm=fm_rmsnorm__rmsnorm_tg_overflow", "all", OPS, "AddressSanitizer: heap-buffer-overflow"),
    ("fm_rmsnorm=fm_rmsnorm__rmsnorm_early_return", "all", OPS, "divergent barrier"),
    # within test_ops' tolerance, but a query's keys cut by the call: the same-bits check must see it
    ("fm_attention=fm_attention__attention_chunks_by_call", "all",
     ["tests/test_batch_invariance.py", "-k", "metal and attention"], "alone differs"),
    # an f32 prefill matmul that sums a lane's columns in reverse: not the matvec's bits
    ("fm_mm_f32=fm_mm_f32__mv_dense_reordered", "forward",
     ["tests/test_batch_invariance.py", "-k", "metal and matmul_row and f32"], "differ from the token alone"),
], ids=["race", "missing-barrier", "missing-barrier-poison", "device-oob", "threadgroup-oob", "divergent-barrier",
        "batch-variant-attention", "batch-variant-matmul"])
def test_emulated_backend_catches_a_broken_kernel(emulated, replace, orders, tests, expect):
    """A kernel broken on purpose (tests/metal_emu/broken/, built in beside the real ones) swapped in for
    the real one (FM_EMU_REPLACE): the tests of its op on backend "metal" must fail, and say why."""
    rc, out = run_py(dict(emulated, FM_EMU_REPLACE=replace, FM_EMU_ORDERS=orders),
                     ["-m", "pytest", "-q", "-x", "-s", "-p", "no:cacheprovider", *tests])
    assert rc != 0 and expect.lower() in out.lower(), out[-3000:]
