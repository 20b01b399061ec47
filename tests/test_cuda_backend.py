"""The CUDA backend (csrc/backend/cuda/): built with nvcc wherever nvcc is, run wherever a GPU is.

The default wheel is CPU-only, so the module builds the CUDA variant of flashmoe once (CMake FLASHMOE_CUDA,
for sm_80 and sm_90: cuda_env says why) into a directory of its own, unless the flashmoe under test has the backend
already (a CUDA build on a GPU machine: then the tests run on it). Then, in subprocesses on that build:
- without a GPU (CI): the build has backend "cuda", the default stays the CPU, and asking for "cuda" is a
  clear DeviceError, after which the process loads a CPU model as usual;
- with a GPU: tests/test_ops.py's cases and tests/test_batch_invariance.py's checks on backend "cuda",
  none skipped; the tiny transformers-checked models at 16, 8 and 4 bits against the CPU backend; the
  same tokens and bits whatever the VRAM expert cache and the host's expert cache hold.

Needs nvcc (CI has it); skips without it, and fails instead where FLASHMOE_CI_REQUIRE names "nvcc". The tests
that need a GPU are marked gpu: CI has none, and their skip there is no failure (tests/conftest.py).
"""

import os
import shutil

import numpy as np
import pytest

import backend_runs
from backend_runs import RTOL, assert_op_harness_passes, build_variant, run_model, run_py
pytestmark = pytest.mark.ci_feature("nvcc")


def _nvcc():
    return shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc")


@pytest.fixture(scope="module")
def cuda_env(tmp_path_factory):
    """The environment of a process that imports a flashmoe with the CUDA backend. FLASHMOE_CUDA_IMMA=1: the int8
    prefill's tensor-core kernels on every call they take (matmul_mma.cu; by default only where they would fill
    half the GPU, which the tests' small shapes never do), so the op harness and the models test them."""
    import flashmoe
    if "cuda" in flashmoe.backends():
        return dict(os.environ, PYTHONDONTWRITEBYTECODE="1", FLASHMOE_CUDA_IMMA="1")
    nvcc = _nvcc()
    if not nvcc:
        pytest.skip("needs nvcc (the CUDA toolkit)")
    target = tmp_path_factory.mktemp("cuda_pkg")
    build_dir = os.environ.get("FLASHMOE_CUDA_BUILD_DIR") or str(tmp_path_factory.mktemp("cuda_build"))
    # sm_80 and sm_90: the kernels' two code paths (__CUDA_ARCH__ >= 800: the tensor cores; >= 900: programmatic
    # dependent launch); sm_86 and sm_89, in the default build's list, compile sm_80's. Two of four: ~50 s less of
    # CI's 20 minutes.
    build_variant(target, build_dir, ["FLASHMOE_CUDA=ON", "CMAKE_CUDA_ARCHITECTURES=80;90"],
                  dict(os.environ, CUDACXX=nvcc), "the CUDA backend")
    return dict(os.environ, PYTHONPATH=str(target), PYTHONDONTWRITEBYTECODE="1", FLASHMOE_CUDA_IMMA="1")


def has_gpu(env):
    rc, out = run_py(env, ["-c", "from flashmoe import _core; print(_core.backend_has_device('cuda'))"])
    assert rc == 0, out
    return out.split()[-1] == "True"


@pytest.fixture(scope="module")
def gpu_env(cuda_env):
    if not has_gpu(cuda_env):
        pytest.skip("no CUDA GPU here")
    return cuda_env


def test_build_has_cuda(cuda_env):
    rc, out = run_py(cuda_env, ["-c", "from flashmoe import _core; print(_core.backends())"])
    assert rc == 0, out
    assert "cuda" in out.split()[-1].split(","), out


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    from flashmoe.synth import write_random_model
    from test_engine_errors import TINY

    d = tmp_path_factory.mktemp("demo")
    write_random_model(d, TINY, bits=4, progress=False)
    return str(d)


NO_GPU = """
import sys, flashmoe
from flashmoe.errors import DeviceError
path = sys.argv[1]
assert flashmoe.load(path).backend == "cpu"
try:
    flashmoe.load(path, backend="cuda")
except DeviceError as e:
    print("DeviceError:", e)
m = flashmoe.load(path, backend="cpu")
print("tokens", m.generate_tokens([1, 2, 3], max_tokens=3, stop_token_ids=[]))
"""


def test_without_a_gpu_cuda_is_a_clear_error(cuda_env, demo_model):
    if has_gpu(cuda_env):
        pytest.skip("this machine has a CUDA GPU")
    env = dict(cuda_env)
    env.pop("FLASHMOE_BACKEND", None)
    rc, out = run_py(env, ["-c", NO_GPU, demo_model])
    assert rc == 0, out
    assert "DeviceError: cuda backend: no CUDA device" in out, out
    assert "tokens [" in out, out


# -------------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_op_harness_on_cuda(gpu_env):
    """Every case of tests/test_ops.py and every check of tests/test_batch_invariance.py on backend "cuda"
    (their ids hold "cuda"): passed, none skipped (a skip there is an op the CUDA table lacks)."""
    assert_op_harness_passes(gpu_env, "cuda", tail=8000)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return backend_runs.tiny_models(tmp_path_factory)


# With int8 activations two backends agree bitwise only where their fp32 inputs to each rounding do: CUDA's
# sums are in other orders than the CPU's, so now and then an activation lands on the other side of an int8
# rounding boundary, one step of 1/127 of its group's maximum. In these 64-wide models one such step moves
# the logits by up to 1.2e-2 of their maximum (seen on an H100: qwen3_5_moe at 8 bits, qwen3_next at 4);
# a formula error moves them by far more, and the op harness checks the int8 kernels' rounding exactly.
INT8_RTOL = 3e-2


@pytest.mark.gpu
@pytest.mark.torch
@pytest.mark.parametrize("bits,int8", [(16, False), (8, False), (4, False), (8, True), (4, True)],
                         ids=["16", "8", "4", "8-int8", "4-int8"])
@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_next"])
def test_model_on_cuda(gpu_env, tiny_models, tmp_path, arch, bits, int8):
    """The tiny transformers-checked models on backend "cuda" against the CPU backend: a 21-token prompt in
    one call (chunks of 32 tokens: one call of each op), in two calls cut at position 16, and token by
    token, and 6 greedy tokens after it. CUDA's batch invariance: the prompt in one call is bitwise the
    prompt in calls cut at a multiple of 16 (the gated delta rule's chunks, [0, 16) and [16, 21), are the
    same ones). Not bitwise its prompt token by token: as on the CPU, a prompt's gated delta rule is the
    chunked form, another fp32 function than the recurrent one that a 1-token call takes (backend.h).
    Against the CPU, prompt and steps each within RTOL (int8 activations: INT8_RTOL, which says why); the
    greedy tokens the same."""
    path = tiny_models(arch, bits)
    ids = np.random.default_rng(1).integers(0, 251, 21)
    opts = ("prefill_chunk=32", f"int8_activations={int8}")
    cpu = run_model(gpu_env, tmp_path, path, "cpu", ids, "cpu", *opts)
    gpu = run_model(gpu_env, tmp_path, path, "cuda", ids, "cuda", *opts)
    assert np.array_equal(gpu["prefill"].view(np.uint32), gpu["split"].view(np.uint32)), \
        "cuda: the prompt in one call differs from the prompt in calls cut at position 16"
    for key in ("prefill", "steps"):
        err = float(np.abs(gpu[key] - cpu[key]).max() / np.abs(cpu[key]).max())
        assert err <= (INT8_RTOL if int8 else RTOL), f"{key}: cuda vs cpu {err:.2e}"
    assert gpu["greedy"].tolist() == cpu["greedy"].tolist()


@pytest.mark.gpu
@pytest.mark.torch
@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_next"])
def test_outputs_do_not_depend_on_the_expert_tiers(gpu_env, tiny_models, tmp_path, arch):
    """Every expert resident in VRAM, against a VRAM cache of 1 and of 3 experts (FLASHMOE_CUDA_EXPERT_SLOTS)
    with the host's expert cache at its minimum (most experts then come from disk, through pinned host
    slots, into VRAM), against each expert's FFN in launches of its own (FLASHMOE_CUDA_GROUPED=0; the
    default is one call for all of a layer's experts), and with the host computing its share of the misses
    (the default), all of them (FLASHMOE_CUDA_HOST_EXPERTS=1) or none (0), and with a prompt's shared expert
    issued while its choices come to the host (FLASHMOE_CUDA_ROUTE_EARLY=1): the same bits for the prompt, token
    by token, and the greedy tokens. The model's experts are 64 wide so that the host takes them (host_ffn.c:
    groups of 32·k)."""
    path = tiny_models(arch, 4, moe_intermediate_size=64)
    ids = np.random.default_rng(2).integers(0, 251, 40)
    import flashmoe
    minimum = flashmoe.memory_plan(path, context_length=256)["minimum"]
    opts = ("prefill_chunk=16", "context_length=256")
    ref = run_model(gpu_env, tmp_path, path, "cuda", ids, "resident", *opts)
    slots3 = {"FLASHMOE_CUDA_EXPERT_SLOTS": "3"}
    for name, env, budget in (("1 VRAM slot", {"FLASHMOE_CUDA_EXPERT_SLOTS": "1"}, minimum),
                              ("3 VRAM slots", slots3, minimum),
                              ("one expert a call", {"FLASHMOE_CUDA_GROUPED": "0"}, None),
                              ("one expert a call, 3 VRAM slots", dict(slots3, FLASHMOE_CUDA_GROUPED="0"), minimum),
                              ("3 VRAM slots, every miss on the host", dict(slots3, FLASHMOE_CUDA_HOST_EXPERTS="1"),
                               minimum),
                              ("3 VRAM slots, none on the host", dict(slots3, FLASHMOE_CUDA_HOST_EXPERTS="0"), minimum),
                              ("routed early", {"FLASHMOE_CUDA_ROUTE_EARLY": "1"}, None),
                              ("3 VRAM slots, routed early", dict(slots3, FLASHMOE_CUDA_ROUTE_EARLY="1"), minimum)):
        got = run_model(gpu_env, tmp_path, path, "cuda", ids, name.replace(" ", "_").replace(",", ""), *opts,
                        *([f"memory_budget={budget}"] if budget else []), extra_env=env)
        for key in ("prefill", "steps", "greedy"):
            assert np.array_equal(np.asarray(got[key]).view(np.uint32 if key != "greedy" else np.int64),
                                  np.asarray(ref[key]).view(np.uint32 if key != "greedy" else np.int64)), \
                f"{name}: {key} differs from everything resident"
        n_slots, hits, misses, bytes_in, host = got["device"].tolist()
        mode = env.get("FLASHMOE_CUDA_HOST_EXPERTS")
        if "FLASHMOE_CUDA_EXPERT_SLOTS" in env:  # the tier was used, and small
            assert n_slots == int(env["FLASHMOE_CUDA_EXPERT_SLOTS"]) and misses > 0 and bytes_in > 0, got["device"]
            # the host's share: some misses (0.05 to 0.95 of them), all that decode has (the prompt's experts of
            # more than 4 tokens still copy), or none
            assert (host == 0) if mode == "0" else host > 0, got["device"]
            if mode == "1":
                assert host > misses, got["device"]
    assert ref["device"][0] > 3 and ref["device"][1] > 0, ref["device"]  # resident: hits once warm
    assert ref["device"][4] == 0, ref["device"]  # every expert fits: a miss is a one-time fill, always copied


PROMPTS = """
import sys
import numpy as np
import flashmoe
path, out = sys.argv[1], sys.argv[2]
# segments of 128 tokens: the 100-token prompt's choices and shared rows (100 · (3 + 1)) fill more of ye than a
# segment's choices alone would (128 · 3), as the core sizes it where the backend folds the shared expert in
m = flashmoe.load(path, backend="cuda", context_length=128, prefill_chunk=16)
ids = np.random.default_rng(5).integers(0, 251, 120).tolist()
rows = [m.forward(ids[:100]),              # 100 tokens: experts of ~30 (10 experts, 3 a token)
        m.forward(ids[100:], reset=False),  # 20 more: experts of a few
        m.forward(ids[:12])]                # a new prompt of 12: many experts of under 4 tokens
try:
    m.forward([10 ** 6])
except ValueError:
    pass  # a bad argument changes nothing
rows.append(m.forward(ids[:12]))
folds = m.stats["device_shared_folds"]  # the four prompts' (no decode step yet)
greedy = m.generate_tokens(ids[:40], max_tokens=5, stop_token_ids=[])
np.savez(out, logits=np.concatenate(rows), greedy=np.asarray(greedy, np.int64), usage=m.expert_usage(),
         layers=m.stats["device_prompt_layers"], moe=m.config["num_hidden_layers"], folds=folds)
"""


@pytest.mark.gpu
@pytest.mark.torch
def test_prompts_routed_on_the_device_are_the_prompts_routed_on_the_host(gpu_env, tiny_models, tmp_path, narrow=True,
                                                                         unfolded=True):
    """Prompts whose choices the GPU groups by expert itself (the default where every expert is in VRAM: fmc_route_group,
    then one call for the layer's experts and the shared expert on every token, those of 4 tokens and more on tensor
    cores in the tiles it mapped, the others on fm_mm; in 8-token tiles, FLASHMOE_CUDA_IMMA_NARROW=1; all on fm_mm
    with FLASHMOE_CUDA_IMMA=0; the shared expert as ops of its own, FLASHMOE_CUDA_SHARED_FOLD=0) against the same
    prompts routed on the host (FLASHMOE_CUDA_DEVICE_PROMPTS=0):
    the same logits bit for bit over prompts of 100, 20 more, and 12 tokens (a bad call between), the same greedy
    tokens after a 40-token prompt, and the same expert counts; and the device's path taken in every MoE layer of
    every prompt (5 prompts, the model's 4 layers), with the shared expert folded in (4 prompts before the greedy
    run) where it is not turned off. (narrow, unfolded False: not those two runs, CI's time on the emulator.)"""
    # down's rows 32 bytes: the tensor cores take it; the shared expert of the routed experts' shape (the releases')
    path = tiny_models("qwen3_5_moe", 4, moe_intermediate_size=64, shared_expert_intermediate_size=64)
    runs = {"host": {"FLASHMOE_CUDA_DEVICE_PROMPTS": "0"}, "device": {},
            "device, 8-token tiles": {"FLASHMOE_CUDA_IMMA_NARROW": "1"}, "device, fm_mm only": {"FLASHMOE_CUDA_IMMA": "0"},
            "device, unfolded": {"FLASHMOE_CUDA_SHARED_FOLD": "0"}}
    if not narrow:
        del runs["device, 8-token tiles"]
    if not unfolded:
        del runs["device, unfolded"]
    got = {}
    for name, env in runs.items():
        rc, log = run_py(dict(gpu_env, **env), ["-c", PROMPTS, path, str(tmp_path / f"{name}.npz")])
        assert rc == 0, log[-4000:]
        got[name] = np.load(tmp_path / f"{name}.npz")
    host = got["host"]
    assert int(host["layers"]) == 0 and int(host["folds"]) == 0
    for name in list(runs)[1:]:
        assert np.array_equal(got[name]["logits"].view(np.uint32), host["logits"].view(np.uint32)), \
            f"{name}: the logits differ from the host's routing"
        assert got[name]["greedy"].tolist() == host["greedy"].tolist(), name
        assert np.array_equal(got[name]["usage"], host["usage"]), f"{name}: expert counts differ"
        moe = int(got[name]["moe"])
        assert int(got[name]["layers"]) == 5 * moe, (name, got[name]["layers"])
        assert int(got[name]["folds"]) == (0 if "unfolded" in name else 4 * moe), (name, got[name]["folds"])


STEPS = """
import json, sys
import numpy as np
import flashmoe
path, out = sys.argv[1], sys.argv[2]
m = flashmoe.load(path, backend="cuda", context_length=512, prefill_chunk=16)
prompt = np.random.default_rng(3).integers(0, 251, 250).tolist()

def decode(tok, n):  # one token a call: the decode step a backend may record and replay
    rows = []
    for _ in range(n):
        rows.append(m.forward([tok], reset=False)[0])
        tok = int(np.argmax(rows[-1]))
    return rows

rows = decode(int(np.argmax(m.forward(prompt, all_logits=False)[0])), 5)  # positions 250..254
try:
    m.forward([10 ** 6], reset=False)
except ValueError:
    pass  # a bad argument changes nothing: the steps go on as before
rows += decode(int(np.argmax(rows[-1])), 7)  # 255..261: across attention's key blocks of 256
rows += decode(int(np.argmax(m.forward(prompt[:5], all_logits=False)[0])), 6)  # from position 5 again
st = m.stats
np.savez(out, logits=np.stack(rows), usage=m.expert_usage(),
         stats=np.asarray([st["device_step_replays"], st["device_step_recordings"], st["device_expert_misses"],
                           st["device_shared_folds"]]))
"""


def decode_steps(env, tmp_path, path, name, extra_env):
    rc, log = run_py(dict(env, **extra_env), ["-c", STEPS, path, str(tmp_path / f"{name}.npz")])
    assert rc == 0, log[-4000:]
    return np.load(tmp_path / f"{name}.npz")


@pytest.mark.gpu
@pytest.mark.torch
def test_decode_steps_without_the_host_are_the_steps_with_it(gpu_env, tiny_models, tmp_path):
    """Decode steps with every expert in VRAM, routed on the device (moe_device) with the shared expert folded
    into the routed experts' call, and replayed from a recorded CUDA graph (the default), against the same
    steps routed on the device but issued one by one (FLASHMOE_CUDA_GRAPHS=0), with the shared expert as ops of
    its own (FLASHMOE_CUDA_SHARED_FOLD=0), routed on the host (FLASHMOE_CUDA_DEVICE_ROUTE=0), and with every
    kernel launched plainly (FLASHMOE_CUDA_PDL=0; by default sm_90 and newer launch each kernel before the one
    before it ends: launch.cuh): the same logits, bit for bit, and the same expert counts, over steps that cross
    attention's key block at position 256 (where a new recording is needed), after a rejected call, and after a
    new prompt restarts the sequence.
    The model's shared expert has the routed experts' shape (as Qwen3.5's and Qwen3-Next's releases do; the
    other tests' tiny models have a larger one, which is never folded)."""
    path = tiny_models("qwen3_5_moe", 4, shared_expert_intermediate_size=48)  # == moe_intermediate_size
    got = {name: decode_steps(gpu_env, tmp_path, path, name, env)
           for name, env in (("replayed", {}), ("issued", {"FLASHMOE_CUDA_GRAPHS": "0"}),
                             ("unfolded", {"FLASHMOE_CUDA_SHARED_FOLD": "0"}),
                             ("host", {"FLASHMOE_CUDA_DEVICE_ROUTE": "0"}), ("plain", {"FLASHMOE_CUDA_PDL": "0"}))}
    for name in ("issued", "unfolded", "host", "plain"):
        assert np.array_equal(got[name]["logits"].view(np.uint32), got["replayed"]["logits"].view(np.uint32)), \
            f"{name}: the logits differ from the replayed steps'"
        assert np.array_equal(got[name]["usage"], got["replayed"]["usage"]), f"{name}: expert counts differ"
    replays, recordings, _, folds = got["replayed"]["stats"].tolist()
    # 18 steps: recorded after the first step without the host, again at 256 and after the new prompt
    assert recordings >= 3 and replays >= 10, got["replayed"]["stats"]
    assert got["issued"]["stats"][:2].tolist() == [0, 0] and got["host"]["stats"][:2].tolist() == [0, 0]
    assert got["unfolded"]["stats"][:2].tolist() == [replays, recordings], got["unfolded"]["stats"]
    assert got["plain"]["stats"][[0, 1, 3]].tolist() == [replays, recordings, folds], got["plain"]["stats"]
    # the fold taken in every MoE layer (the model's 4) of the steps routed on the device, replayed or issued
    assert folds >= 4 * 10 and folds % 4 == 0 and got["issued"]["stats"][3] == folds, (got["replayed"]["stats"],
                                                                                       got["issued"]["stats"])
    assert got["unfolded"]["stats"][3] == 0 and got["host"]["stats"][3] == 0


PRELOAD = """
import sys
import numpy as np
import flashmoe
path, out = sys.argv[1], sys.argv[2]
m = flashmoe.load(path, backend="cuda", context_length=64)
rows, tok = [], 7
for _ in range(4):  # a one-token prompt, then decode steps: far from every expert used once
    rows.append(m.forward([tok], reset=not rows)[0])
    tok = int(np.argmax(rows[-1]))
st = m.stats
cfg = m.config
np.savez(out, logits=np.stack(rows), usage=m.expert_usage(), experts=cfg["num_hidden_layers"] * cfg["num_experts"],
         stats=np.asarray([st["device_expert_slots"], st["device_expert_misses"], st["device_step_recordings"],
                           st["device_step_replays"]]),
         seconds=np.asarray([st["device_launch_seconds"], st["device_wait_seconds"]]))
"""


@pytest.mark.gpu
@pytest.mark.torch
def test_every_expert_is_in_vram_from_load_where_all_fit(gpu_env, tiny_models, tmp_path):
    """Where the GPU budget holds every expert, load copies them all into VRAM: the first decode steps after a
    one-token prompt (which used a few experts of each layer) already route on the device and replay, with no
    expert copied after load, and give the bits of routing on the host (FLASHMOE_CUDA_DEVICE_ROUTE=0, which
    preloads nothing and copies each expert at its first use). Before, a layer routed on the host until every
    one of its experts had been used once."""
    path = tiny_models("qwen3_5_moe", 4)
    got = {}
    for name, env in (("preloaded", {}), ("host", {"FLASHMOE_CUDA_DEVICE_ROUTE": "0"})):
        rc, log = run_py(dict(gpu_env, **env), ["-c", PRELOAD, path, str(tmp_path / f"{name}.npz")])
        assert rc == 0, log[-4000:]
        got[name] = np.load(tmp_path / f"{name}.npz")
    assert np.array_equal(got["host"]["logits"].view(np.uint32), got["preloaded"]["logits"].view(np.uint32))
    assert np.array_equal(got["host"]["usage"], got["preloaded"]["usage"])
    slots, misses, recordings, replays = got["preloaded"]["stats"].tolist()
    assert slots == int(got["preloaded"]["experts"]), got["preloaded"]["stats"]
    assert misses == 0 and recordings >= 1 and replays >= 1, got["preloaded"]["stats"]
    assert got["host"]["stats"][1] > 0  # the host-routed run copied experts as it went
    # the host's time launching the replayed steps, and waiting for the GPU; no replay, no launch time
    launch, wait = got["preloaded"]["seconds"].tolist()
    assert launch > 0 and wait > 0 and got["host"]["seconds"][0] == 0, (got["preloaded"]["seconds"],
                                                                       got["host"]["seconds"])


GPU_BUDGET = """
import sys, flashmoe
from flashmoe.errors import MemoryBudgetError
path = sys.argv[1]
try:
    flashmoe.load(path, backend="cuda", gpu_memory_budget=4096).forward([1, 2])
except MemoryBudgetError as e:
    print("MemoryBudgetError:", e)
m = flashmoe.load(path, backend="cuda")
print("tokens", m.generate_tokens([1, 2, 3], max_tokens=3, stop_token_ids=[]))
"""


@pytest.mark.gpu
def test_a_gpu_budget_too_small_is_a_clear_error(gpu_env, demo_model):
    rc, out = run_py(gpu_env, ["-c", GPU_BUDGET, demo_model])
    assert rc == 0, out
    assert "MemoryBudgetError: cuda backend:" in out and "gpu_memory_budget" in out, out
    assert "tokens [" in out, out
