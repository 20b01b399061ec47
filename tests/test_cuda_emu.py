"""The CUDA backend, whole, on the CPU: csrc/backend/cuda/cuda_ops.cu (the table: memory, streams, events),
cuda_experts.cu (the expert VRAM cache) and every kernel of csrc/backend/cuda/*.cu, compiled as C++ by clang-19 over
the emulator of tests/cuda_emu/ (README.md there: a fiber per lane, blocks one after another, __syncthreads and
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
  tiers (the VRAM cache of 1 and 3 slots, one expert a call, the host's share of the misses: ~60 s a model;
  with --slow both models);
- the VRAM expert cache after a failure: a host-to-device copy failed on purpose by the mock runtime
  (FM_CUDA_EMU_FAIL) in the middle of a batch of expert copies, or the copy of the host's experts' rows, then
  the model's bits and tokens those of a fresh one (~2 s each); a budget without room for the cache failing
  alike every call;
- the emulator's own tests (tests/cuda_emu/selftest.cu): right kernels give exact results, kernels broken on
  purpose are caught (a missing barrier reads NaN, a divergent barrier or shuffle, too much shared memory,
  a copy past an allocation, a race, a cp.async copy read before its wait); a stream captured into a graph runs nothing until the graph replays, and
  what a capture forbids is refused and invalidates it.

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
    # FLASHMOE_CUDA_IMMA=1: the int8 prefill's tensor-core kernels on every call they take (matmul_mma.cu; unset,
    # only where they would fill half a GPU, which the tests' small shapes never do)
    env = dict(os.environ, PYTHONPATH=str(target), PYTHONDONTWRITEBYTECODE="1", FLASHMOE_CUDA_IMMA="1")
    env.pop("FM_CUDA_EMU_ORDER", None)
    env.pop("FM_CUDA_EMU_FAIL", None)
    env.pop("FM_CUDA_EMU_CP", None)
    return env


def test_emulated_build_has_cuda(emu_env):
    rc, out = run_py(emu_env, ["-c", "import flashmoe; from flashmoe import _core; "
                               "assert flashmoe.__file__.startswith(%r), flashmoe.__file__; "
                               "print(_core.backends(), _core.backend_has_device('cuda'))" % emu_env["PYTHONPATH"]])
    assert rc == 0, out
    backends, has = out.split()[-2:]
    assert "cuda" in backends.split(",") and has == "True", out


@pytest.mark.parametrize("order,cp", [("forward", "late"), pytest.param("reverse", "now", marks=pytest.mark.slow)])
def test_op_harness_on_emulated_cuda(emu_env, order, cp):
    """Every case of tests/test_ops.py and every check of tests/test_batch_invariance.py on backend "cuda"
    (their ids hold "cuda"): passed, none skipped. FM_CUDA_EMU_CP=late lands each cp.async copy only at the wait
    that needs it (a missing wait reads stale bytes), now at its issue (a copy into a buffer still being read)."""
    assert_op_harness_passes(dict(emu_env, FM_CUDA_EMU_ORDER=order, FM_CUDA_EMU_CP=cp), "cuda", tail=8000)


IMMA_TRACE = """
import os, sys
import numpy as np
from flashmoe import _core
sys.path.insert(0, "tests")
from test_ops import Q4, Q8, build_experts, build_weight, randn
trace = os.environ["FM_CUDA_EMU_TRACE"]

def ran(mode, call):
    if mode == "auto":
        os.environ.pop("FLASHMOE_CUDA_IMMA", None)
    else:
        os.environ["FLASHMOE_CUDA_IMMA"] = mode
    open(trace, "w").close()
    call()
    return open(trace).read().split()

for dtype, gs, rows in ((Q4, 32, 13), (Q8, 64, 13), (Q4, 32, 4224)):
    for T, int8, mode in ((1, True, "1"), (15, True, "1"), (16, True, "1"), (100, True, "1"), (16, True, "0"),
                          (100, False, "1"), (100, True, "auto")):
        if rows > 13 and mode != "auto":
            continue
        rng = np.random.default_rng(T)
        w = build_weight(rng, dtype, rows, 2 * gs, gs)
        x = randn(rng, T, 2 * gs)
        names = {n.split("<")[0] for n in ran(mode, lambda: _core.op_matmul(*w, x, int8, backend="cuda"))}
        print("mm", rows, T, int(int8), mode, int("fm_mm_imma" in names), int("fm_mm" in names))
for sizes in ((20, 3), (4,), (3, 1)):
    xn, experts = build_experts(np.random.default_rng(1), Q4, 32, 64, 96, 40, sizes)
    names = ran("1", lambda: _core.op_experts(xn, experts, int8_act=True, backend="cuda"))
    print("experts", len(sizes), sum(n.startswith("fm_mm_imma<") for n in names),
          sum(n.startswith("fm_mm<") for n in names))
"""


def test_int8_prefill_reaches_the_tensor_core_kernel(emu_env, tmp_path):
    """The int8-activation matmul runs matmul_mma.cu's kernel (fm_mm_imma, seen in FM_CUDA_EMU_TRACE) from 16
    tokens on with FLASHMOE_CUDA_IMMA=1, and fm_mm's dp4a kernel below, with FLASHMOE_CUDA_IMMA=0, and on fp32
    activations; unset, only where its blocks fill half the GPU (the emulator's 132 SMs: 4224 rows of 100
    tokens, not 13); a grouped call's experts of 4 tokens or more (FMC_IMMA_MIN_EXPERT_T) too, the others on fm_mm
    in launches of their own. The emulated harness runs with FLASHMOE_CUDA_IMMA=1 (emu_env), so the op harness's
    int8 cases of T >= 16 test the tensor-core kernels (test_ops.py: against float64 and bitwise against the dp4a
    kernel; test_batch_invariance.py: against the token alone), and the models' prompts of 16 tokens or more run
    them."""
    rc, out = run_py(dict(emu_env, FM_CUDA_EMU_TRACE=str(tmp_path / "trace")), ["-c", IMMA_TRACE])
    assert rc == 0, out[-4000:]
    rows = [line.split()[1:] for line in out.splitlines() if line.startswith("mm ")]
    small = [[T, i8, mode, "1" if i8 == "1" and mode == "1" and int(T) >= 16 else "0",
              "0" if i8 == "1" and mode == "1" and int(T) >= 16 else "1"]
             for T, i8, mode in (("1", "1", "1"), ("15", "1", "1"), ("16", "1", "1"), ("100", "1", "1"),
                                 ("16", "1", "0"), ("100", "0", "1"), ("100", "1", "auto"))]
    want = [["13"] + r for r in small] * 2 + [["4224", "100", "1", "auto", "1", "0"]]
    assert rows == want, out[-4000:]
    # a grouped call: gate·up and down each on tensor cores for the experts of 4 tokens or more, fm_mm for the rest
    experts = [line.split()[1:] for line in out.splitlines() if line.startswith("experts ")]
    assert experts == [["2", "2", "2"], ["1", "2", "0"], ["2", "0", "2"]], out[-4000:]


# ---------------------------------------------------------------------------------- the whole model


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return backend_runs.tiny_models(tmp_path_factory)


SLOW = pytest.mark.slow  # CI's time: the fp32 and the int8 paths (4- and 8-bit) run there, the rest with --slow


@pytest.mark.torch
@pytest.mark.parametrize("bits,int8", [(16, False), pytest.param(8, False, marks=SLOW),
                                       pytest.param(4, False, marks=SLOW), (8, True), (4, True)],
                         ids=["16", "8", "4", "8-int8", "4-int8"])
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
    ("graph_destroy_twice", "not a graph (destroyed already?)"),
    ("graph_early_return", "early_return: block (0,0,0): divergent __syncthreads"),  # found at the replay
    ("graph_freed_host", "the host side is no longer pinned"),
])
def test_emulator_ends_a_broken_kernel_saying_why(selftest, case, message):
    rc, out, err = _run(selftest, case)
    assert rc == 3 and "cuda-emu: error: " in err and message in err, (rc, out, err)


def test_emulator_lands_cp_async_copies_late_or_at_once(selftest):
    """FM_CUDA_EMU_CP=late: a cp.async copy lands at the first wait that requires its group, so a read before it
    sees the old bytes (-1); now (the default): at once. A lane that returns with a copy never waited for ends the
    process in late mode."""
    rc, out, err = _run(selftest, "cp_async", FM_CUDA_EMU_CP="late")
    # lane 5 reads a before any wait; a + b after waiting for all but the newest group (b still -1); b at the end
    assert rc == 0 and out.split() == ["cp_async", "-1", str(5 - 1), str(32 + 5)], out + err
    rc, out, err = _run(selftest, "cp_async")
    assert rc == 0 and out.split() == ["cp_async", "5", str(5 + 37), "37"], out + err
    rc, out, err = _run(selftest, "cp_async_no_wait", FM_CUDA_EMU_CP="late")
    assert rc == 3 and "returned with 2 cp.async copies never waited for" in err, (rc, out, err)


def test_emulator_orders_show_a_race(selftest):
    got = {o: _run(selftest, "last_writer", FM_CUDA_EMU_ORDER=o)[1].split()[-1] for o in ("forward", "reverse")}
    assert got == {"forward": "63", "reverse": "0"}, got


def test_emulator_replays_a_captured_graph(selftest):
    """A pinned-host copy, two kernels, a fill, a block sum and a copy back, captured: nothing runs (the device
    buffers and the pinned sum as they were); each replay reads the pinned input as it is then (c = 2 x + 1)."""
    for order in ("forward", "reverse"):
        rc, out, err = _run(selftest, "graph", FM_CUDA_EMU_ORDER=order)
        assert rc == 0 and "cuda-emu" not in err, out + err
        assert [line.split() for line in out.splitlines()] == [
            # EndCapture, IsCapturing during and after, a[0] b[63] c[0] and the pinned sum untouched
            ["captured", "cudaSuccess", "1", "0", "0", "0", "5", "-1"],
            ["replay", "cudaSuccess", "4096", "1", "127"],  # x = i: sum(2i + 1), c[0], c[63]
            ["replay", "cudaSuccess", "-1952", "1", "-62"],  # x = -i / 2
        ], out


UNSUPPORTED, INVALIDATED = "cudaErrorStreamCaptureUnsupported", "cudaErrorStreamCaptureInvalidated"


def test_emulator_refuses_what_a_capture_forbids(selftest):
    """Each forbidden call in a Global-mode capture: refused, the capture invalidated (the next launch refused,
    EndCapture gives no graph), said on stderr; Relaxed mode, another thread, the legacy stream; then the stream
    works as before."""
    rc, out, err = _run(selftest, "graph_refusals")
    assert rc == 0, out + err
    lines = [line.split() for line in out.splitlines()]
    forbidden = ["cudaStreamSynchronize", "cudaMemcpy", "cudaMalloc", "cudaMemcpyAsync_pageable", "cudaEventRecord",
                 "cudaStreamWaitEvent", "cudaDeviceSynchronize", "cudaGraphLaunch"]
    # the call's error, the status (2: invalidated), the next launch's error, EndCapture's, the graph
    assert lines[:len(forbidden)] == [[w, UNSUPPORTED, "2", INVALIDATED, INVALIDATED, "null"] for w in forbidden], out
    assert lines[len(forbidden):] == [
        ["relaxed", "cudaSuccess", "cudaSuccess", UNSUPPORTED, INVALIDATED],  # cudaMalloc, cudaFree, its stream's sync
        ["threads", UNSUPPORTED, "cudaSuccess"],  # another thread's cudaMalloc: Global, ThreadLocal
        ["legacy", "cudaErrorStreamCaptureImplicit", INVALIDATED, "cudaSuccess", "cudaSuccess"],  # blocking, not
        ["other_stream", "cudaSuccess", "-3", "cudaSuccess"],  # a graph launched on a stream not capturing runs
        ["after", "0", "-3"],
    ], out
    assert err.count("is invalidated: ") == len(forbidden) + 3, err


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


@pytest.mark.torch
def test_decode_steps_without_the_host_are_the_steps_with_it_emulated(emu_env, tiny_models, tmp_path):
    """Decode steps routed on the device and replayed from a recorded graph (the mock runtime's stream capture)
    give the bits of the same steps issued one by one and routed on the host (test_cuda_backend.py)."""
    import test_cuda_backend
    test_cuda_backend.test_decode_steps_without_the_host_are_the_steps_with_it(emu_env, tiny_models, tmp_path)


@pytest.mark.torch
def test_prompts_routed_on_the_device_are_the_prompts_routed_on_the_host_emulated(emu_env, tiny_models, tmp_path):
    """tests/test_cuda_backend.py's test on the emulated build (FLASHMOE_CUDA_IMMA=1 there: the tensor cores
    take every expert of 4 tokens or more), without the 8-token tiles (off by default) and the unfolded shared expert
    (the path of before, the decode test's too): CI's time."""
    import test_cuda_backend
    test_cuda_backend.test_prompts_routed_on_the_device_are_the_prompts_routed_on_the_host(emu_env, tiny_models,
                                                                                           tmp_path, narrow=False,
                                                                                           unfolded=False)


@pytest.mark.torch
def test_every_expert_is_in_vram_from_load_where_all_fit_emulated(emu_env, tiny_models, tmp_path):
    import test_cuda_backend
    test_cuda_backend.test_every_expert_is_in_vram_from_load_where_all_fit(emu_env, tiny_models, tmp_path)


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


# ------------------------------------------------------------- the VRAM expert cache after a failure

VRAM_FAULT = """
import sys, numpy as np, flashmoe
from flashmoe.errors import DeviceError
path, out = sys.argv[1:]
opts = dict(backend="cuda", prefill_chunk=16, context_length=256)
ids = [5, 17, 42, 99, 3, 250, 7, 8, 120, 33, 64, 2]
KEYS = ("device_expert_slots", "device_expert_hits", "device_expert_misses", "device_bytes_in")

def device(m):
    return [m.stats[k] for k in KEYS]

def run(m):
    return m.forward(ids), m.generate_tokens(ids, max_tokens=4, stop_token_ids=[])

m = flashmoe.load(path, **opts)
message = "no error"
try:
    m.forward(ids)
except DeviceError as e:
    message = "DeviceError: %s" % e
at_error = device(m)
logits, tokens = run(m)
after = device(m)
fresh = flashmoe.load(path, **opts)
fresh_logits, fresh_tokens = run(fresh)
np.savez(out, logits=logits, tokens=tokens, fresh_logits=fresh_logits, fresh_tokens=fresh_tokens,
         at_error=at_error, after=after, fresh=device(fresh), message=message)
"""


@pytest.mark.parametrize("grouped", ["1", "0"], ids=["grouped", "one-by-one"])
def test_the_vram_cache_after_a_failed_expert_copy_is_a_fresh_ones_emulated(emu_env, demo_model, tmp_path, grouped):
    """A VRAM cache of 3 slots; the mock runtime fails the forward's 2nd host-to-device copy of 2 KiB or more
    (FM_CUDA_EMU_FAIL; an expert is ~3 KiB, the uploads of ids, token lists and expert arrays less): the second
    expert copy, its first slot copied (and, where both were in the batch, still locked). The forward raises a
    DeviceError naming the expert copy. The model
    then computes, with the fault gone, the bits and tokens of a fresh one (no key left on the slot whose copy
    failed: it held no expert), its 3 slots reused, and its VRAM counters move as a fresh model's do."""
    env = dict(emu_env, FM_CUDA_EMU_FAIL="memcpy:2:2048", FLASHMOE_CUDA_EXPERT_SLOTS="3", FLASHMOE_CUDA_GROUPED=grouped)
    rc, log = run_py(env, ["-c", VRAM_FAULT, demo_model, str(tmp_path / "out.npz")])
    assert rc == 0, log[-4000:]
    r = np.load(tmp_path / "out.npz")
    assert str(r["message"]).startswith("DeviceError: cuda backend: expert copy: unknown error (injected"), r["message"]
    n_slots, hits, misses, bytes_in = r["at_error"].tolist()
    assert n_slots == 3 and 0 < misses <= 3 and bytes_in > 0, r["at_error"]  # the fault was in the first batch
    same = bool(np.array_equal(r["logits"].view(np.uint32), r["fresh_logits"].view(np.uint32)))
    assert same, "after the failure: logits differ from a fresh model's (max |diff| %g)" % \
        float(np.abs(r["logits"] - r["fresh_logits"]).max())
    assert r["tokens"].tolist() == r["fresh_tokens"].tolist()
    fresh = r["fresh"].tolist()
    assert fresh[0] == 3 and fresh[2] > 3, fresh  # more misses than slots: the slots were reused
    assert r["after"][0] == 3 and (r["after"] - r["at_error"])[1:].tolist() == fresh[1:], (r["after"], r["at_error"])


def test_the_host_share_after_a_failed_copy_of_its_rows_is_a_fresh_ones_emulated(emu_env, demo_model, tmp_path):
    """The host computing every decode-sized miss (FLASHMOE_CUDA_HOST_EXPERTS=1, 3 VRAM slots); the mock runtime
    fails the forward's 3rd host-to-device copy of 256 bytes or more: the copy of the host's experts' rows into
    the GPU's (the 1st is an expert copy of the prompt's, the 2nd an upload; the message says which it was). The
    forward raises a DeviceError naming it; the model then gives the bits and tokens of a fresh one, and its
    counters move as a fresh model's do."""
    env = dict(emu_env, FM_CUDA_EMU_FAIL="memcpy:3:256", FLASHMOE_CUDA_EXPERT_SLOTS="3",
               FLASHMOE_CUDA_HOST_EXPERTS="1")
    rc, log = run_py(env, ["-c", VRAM_FAULT, demo_model, str(tmp_path / "out.npz")])
    assert rc == 0, log[-4000:]
    r = np.load(tmp_path / "out.npz")
    assert str(r["message"]).startswith("DeviceError: cuda backend: host experts' rows: unknown error (injected"), \
        r["message"]
    assert np.array_equal(r["logits"].view(np.uint32), r["fresh_logits"].view(np.uint32)), \
        "after the failure: logits differ from a fresh model's"
    assert r["tokens"].tolist() == r["fresh_tokens"].tolist()
    assert (r["after"] - r["at_error"])[1:].tolist() == r["fresh"].tolist()[1:], (r["after"], r["at_error"], r["fresh"])


VRAM_NO_ROOM = """
import sys, flashmoe
from flashmoe.errors import MemoryBudgetError
m = flashmoe.load(sys.argv[1], backend="cuda", gpu_memory_budget=100 << 20)
for _ in range(2):
    try:
        m.forward([1, 2, 3])
        print("no error")
    except MemoryBudgetError as e:
        print("MemoryBudgetError:", e, flush=True)
"""


def test_a_budget_without_room_for_the_vram_cache_fails_alike_every_call_emulated(emu_env, demo_model):
    """100 MiB holds the tiny model's weights, state and scratch but not the cache's headroom: the first MoE
    layer fails to size the VRAM cache, a clear MemoryBudgetError; the next call tries again, as a fresh model
    would, and fails the same way (it once found a cache half made: a null key table)."""
    rc, out = run_py(emu_env, ["-c", VRAM_NO_ROOM, demo_model])
    assert rc == 0, out[-4000:]
    lines = [ln for ln in out.splitlines() if ln.startswith(("MemoryBudgetError", "no error"))]
    assert len(lines) == 2 and lines[0] == lines[1], out[-4000:]
    assert lines[0].startswith("MemoryBudgetError: cuda backend: gpu_memory_budget 100.0 MiB leaves no room for one "
                               "expert"), lines[0]
