"""Streaming routed experts under a memory budget (no torch).

What is checked, on small synthetic models (flashmoe.synth):
  - a model 4-5x larger than its budget runs inside a cgroup memory limit (v1 or v2) of budget + the bare
    interpreter's footprint, with no OOM kill, and gives the same greedy tokens and logits, bit for bit,
    as an unbudgeted run;
  - outputs never depend on the budget, the cache policy, prefetch, the I/O thread count, the prefill
    chunk or the number of slots;
  - the minimum budget is exact and a smaller one raises MemoryBudgetError naming it;
  - the cache counters add up (hits + misses = expert acquisitions, bytes = reads x stride);
  - failed reads (short file, bad checksum) with many reads in flight raise errors naming the layer and
    the expert, reset the sequence, and leave the model usable; a failed prefetch that is never used
    raises nothing.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import flashmoe
from flashmoe.errors import FormatError, MemoryBudgetError, ReadError
from flashmoe.synth import DEMO_CONFIG, write_random_model

PREAMBLE = 16384  # expert blobs start here in each experts/L###.bin (docs/FORMAT.md)

# Every layer is MoE (qwen3_5_moe): 4 MoE layers x 32 experts of one 16 KiB stride, 4 active.
SMALL = {**DEMO_CONFIG, "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 4,
         "layer_types": ["linear_attention"] * 3 + ["full_attention"], "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 32, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
         "linear_key_head_dim": 16, "linear_value_head_dim": 16, "num_experts": 32, "num_experts_per_tok": 4,
         "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64}
CTX = 128
PROMPT = np.random.default_rng(7).integers(0, SMALL["vocab_size"], 24)
N_GEN = 8

# The cgroup model: 8 MoE layers x 64 experts of 224 KiB, 114.5 MiB on disk; its minimum budget at a
# 256-token context is 23.2 MiB (dense 2.3 + KV 0.2 + state 0.1 + scratch 18.8 + 8 experts 1.8): 4.9x.
BIG = {**DEMO_CONFIG, "vocab_size": 2048, "hidden_size": 256, "num_hidden_layers": 8,
       "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 2, "num_attention_heads": 2,
       "num_key_value_heads": 1, "head_dim": 64, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
       "linear_key_head_dim": 32, "linear_value_head_dim": 32, "num_experts": 64, "num_experts_per_tok": 8,
       "moe_intermediate_size": 512, "shared_expert_intermediate_size": 256}
BIG_CTX = 256


# ---------------------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "m"
    write_random_model(path, SMALL, bits=4, progress=False)
    return path


@pytest.fixture
def small_copy(small_dir, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(small_dir, dst)
    return dst


def header_of(path):
    return json.loads((path / "flashmoe.json").read_text())


def expert_file(path, layer):
    entry = next(e for e in header_of(path)["experts"]["layers"] if e["layer"] == layer)
    return path / entry["file"]


def minimum_budget(path, **opts):
    """The smallest budget: everything but the expert cache, plus one token's k experts, computed from
    Model.memory of an unbudgeted load with the same options (the context, the chunk size and the
    threads change it)."""
    m = flashmoe.load(path, **opts)
    mem, k = m.memory, m.config["num_experts_per_tok"]
    fixed = mem["dense_bytes"] + mem["kv_bytes"] + mem["state_bytes"] + mem["scratch_bytes"]
    return fixed, k * m.header["experts"]["stride"]


def budget_for(path, which, **opts):
    """"min": one token's k experts; "2x": twice that expert cache (2k slots); "all": None (unbudgeted).
    "2x" doubles the expert cache, not the whole budget: the fixed part (~17 MiB, mostly the scratch
    allowance) is so much larger than this model's 2 MiB of experts that twice the minimum budget would
    cache every expert, the same as "all"."""
    fixed, min_cache = minimum_budget(path, context_length=CTX, **opts)
    return {"min": fixed + min_cache, "2x": fixed + 2 * min_cache, "all": None}[which]


def run(path, **opts):
    """Greedy tokens, prefill logits [len(PROMPT), V] and decode logits [N_GEN - 1, V] (one token per
    step, the path generation takes), and the model."""
    m = flashmoe.load(path, context_length=CTX, **opts)
    tokens = np.array(m.generate_tokens(PROMPT, N_GEN, stop_token_ids=[]), dtype=np.int64)
    prefill = m.forward(PROMPT)
    decode = np.concatenate([m.forward([t], reset=False) for t in tokens[:-1]])
    return tokens, prefill, decode, m


@pytest.fixture(scope="module")
def references(small_dir):
    """Unbudgeted runs, one per prefill chunk size. The chunk is not a budget knob and may change the
    last bits: a quantized matmul of one row takes another path (per-group sums of x) than one of
    several, and how many of a chunk's tokens share an expert depends on the chunk."""
    cache = {}

    def get(chunk=128):
        if chunk not in cache:
            tokens, prefill, decode, m = run(small_dir, prefill_chunk=chunk)
            assert m.memory["expert_slots"] == m.memory["experts_total"]
            # greedy means argmax of the logits of the position before
            np.testing.assert_array_equal(tokens[0], prefill[-1].argmax())
            np.testing.assert_array_equal(tokens[1:], decode.argmax(axis=1))
            cache[chunk] = tokens, prefill, decode
        return cache[chunk]
    return get


@pytest.fixture(scope="module")
def reference(references):
    return references(128)


def assert_same_run(got, want):
    for name, g, w in zip(("greedy tokens", "prefill logits", "decode logits"), got, want):
        np.testing.assert_array_equal(g, w, err_msg=name)


def settled_stats(m, stride):
    """Model.stats, checked to be settled: forward drains reads still in flight (mispredicted
    prefetches) before it returns, so every read issued has landed and is counted."""
    s = m.stats
    assert s["bytes_read"] == (s["expert_misses"] + s["prefetches"]) * stride, s
    return s


# ------------------------------------------------------------------- 1. the honest run: a cgroup limit

def _mountinfo():
    """(fs type, super options, root, mount point) of each mount of this process's namespace."""
    out = []
    for ln in open("/proc/self/mountinfo").read().splitlines():
        left, _, right = ln.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(rfields) >= 3:
            out.append((rfields[0], rfields[2], fields[3].rstrip("/"), fields[4]))
    return out


def _in_mount(rel, root, mnt):
    """The directory of cgroup `rel` (as /proc/self/cgroup names it) in a hierarchy whose `root` is mounted
    at `mnt`, or None when the mount does not show it."""
    if root and not (rel == root or rel.startswith(root + "/")):
        return None
    return os.path.join(mnt, rel[len(root):].lstrip("/"))


class MemoryCgroup:
    """Where the test makes its child memory cgroup, with cgroup v1 (a child of this process's memory
    cgroup) or v2 (a sibling of this process's cgroup, or a child of the root when this process is in the
    root of its namespace: .ci/run enables the memory controller there). `parent` is the directory."""

    def __init__(self, version, parent):
        self.version, self.parent = version, parent

    def limit(self, cg, nbytes):
        if self.version == 1:
            _write(os.path.join(cg, "memory.limit_in_bytes"), nbytes)
            swap = os.path.join(cg, "memory.memsw.limit_in_bytes")
        else:
            _write(os.path.join(cg, "memory.max"), nbytes)
            swap, nbytes = os.path.join(cg, "memory.swap.max"), 0
        if os.path.exists(swap):
            try:  # no escape to swap where swap accounting exists
                _write(swap, nbytes)
            except OSError:
                pass

    def peak(self, cg):
        """The cgroup's peak usage in bytes, or None (cgroup v2 before Linux 5.19 has no memory.peak)."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        return _read_int(os.path.join(cg, name)) if os.path.exists(os.path.join(cg, name)) else None

    def oom(self, cg):
        """{"oom_kill": kills, "under_oom": 0/1 (v1) or "oom": times the limit could not be kept (v2)}."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        with open(os.path.join(cg, name)) as f:
            return {k: int(v) for k, v in (ln.split() for ln in f.read().splitlines() if ln)}


def _write(path, value):
    with open(path, "w") as f:
        f.write(str(value))


def _memory_cgroup():
    """A MemoryCgroup for this process, or pytest.skip with the reason."""
    if not sys.platform.startswith("linux"):
        pytest.skip("cgroup test: Linux only")
    if os.geteuid() != 0:
        pytest.skip("cgroup test: needs root (a memory cgroup and drop_caches)")
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
        mounts = _mountinfo()
    except OSError as exc:
        pytest.skip(f"cgroup test: cannot read /proc: {exc}")
    # cgroup v1: a memory hierarchy (hybrid hosts have both; v1 holds the memory controller there)
    rel = next((ln.split(":", 2)[2] for ln in lines if "memory" in ln.split(":", 2)[1].split(",")), None)
    if rel is not None:
        for fstype, opts, root, mnt in mounts:
            if fstype == "cgroup" and "memory" in opts.split(","):
                path = _in_mount(rel, root, mnt)
                if path and os.path.isfile(os.path.join(path, "memory.limit_in_bytes")):
                    return MemoryCgroup(1, path)
        pytest.skip(f"cgroup test: the v1 memory cgroup {rel} is not mounted here")
    # cgroup v2
    rel = next((ln[3:] for ln in lines if ln.startswith("0::")), None)
    v2 = next(((root, mnt) for fstype, _, root, mnt in mounts if fstype == "cgroup2"), None)
    if rel is None or v2 is None:
        pytest.skip("cgroup test: no memory cgroup (neither a v1 memory hierarchy nor cgroup v2)")
    path = _in_mount(rel, *v2)
    if path is None:
        pytest.skip(f"cgroup test: this process's cgroup v2 {rel} is not under the mount {v2}")

    def controls(d, what):
        try:
            return "memory" in open(os.path.join(d, what)).read().split()
        except OSError:
            return False
    if os.path.normpath(path) != os.path.normpath(v2[1]) and controls(os.path.dirname(path), "cgroup.subtree_control"):
        return MemoryCgroup(2, os.path.dirname(path))
    if controls(path, "cgroup.subtree_control"):  # the root (of the namespace), with memory delegated
        return MemoryCgroup(2, path)
    pytest.skip(f"cgroup test: cgroup v2 without the memory controller enabled for a cgroup next to {rel} "
                f"(.ci/run enables it)")


# The child joins the cgroup first thing (memory charged before the move stays outside), then imports
# what a user imports, then runs. In "baseline" mode it stays out and reports its RSS after the imports.
CHILD = r"""
import os, sys
cg, mode = sys.argv[1], sys.argv[2]
if mode == "run":
    try:
        with open(os.path.join(cg, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    except OSError as exc:
        print(f"cannot join cgroup {cg}: {exc}", file=sys.stderr)
        sys.exit(77)
import json
import numpy as np
import flashmoe
import flashmoe.model
from flashmoe import _core

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

if mode == "baseline":
    print(json.dumps({"rss": status("VmRSS")}))
    sys.exit(0)
path, budget, ctx, n_gen, out = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
rss0 = status("VmRSS")
prompt = np.load(os.path.join(out, "prompt.npy"))
m = flashmoe.load(path, memory_budget=budget, context_length=ctx)
tokens = np.array(m.generate_tokens(prompt, n_gen, stop_token_ids=[]), dtype=np.int64)
logits = m.forward(np.concatenate([prompt, tokens]))
np.save(os.path.join(out, "tokens.npy"), tokens)
np.save(os.path.join(out, "logits.npy"), logits)
stats = {k: v for k, v in m.stats.items() if k != "last"}
cgroup = [l for l in open("/proc/self/cgroup").read().splitlines()
          if "memory" in l.split(":")[1].split(",") or l.startswith("0::")]
print(json.dumps({"rss_before_load": rss0, "hwm": status("VmHWM"), "memory": m.memory, "stats": stats,
                  "cgroup": cgroup}))
"""


def _child_env():
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(flashmoe.__file__))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _read_int(path):
    with open(path) as f:
        return int(f.read().split()[0])


@pytest.mark.ci_feature("cgroup")
def test_runs_within_a_cgroup_memory_limit_and_matches_an_unbudgeted_run(tmp_path):
    memcg = _memory_cgroup()
    path = tmp_path / "big"
    write_random_model(path, BIG, bits=4, progress=False)
    fixed, min_cache = minimum_budget(path, context_length=BIG_CTX)
    budget = fixed + min_cache  # the minimum: one token's experts
    model_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert model_bytes >= 3 * budget, (model_bytes, budget)

    prompt = np.random.default_rng(3).integers(0, BIG["vocab_size"], 16)
    n_gen = 16
    np.save(tmp_path / "prompt.npy", prompt)
    ref = flashmoe.load(path, context_length=BIG_CTX)  # no budget: half of RAM, every expert cached
    assert ref.memory["expert_slots"] == ref.memory["experts_total"]
    ref_tokens = np.array(ref.generate_tokens(prompt, n_gen, stop_token_ids=[]), dtype=np.int64)
    ref_logits = ref.forward(np.concatenate([prompt, ref_tokens]))
    del ref

    env = _child_env()
    # The limit: the budget covers everything the engine allocates; on top of it the process needs what
    # the interpreter, numpy and the extension occupy before loading. Measure that in a child doing the
    # same imports (VmRSS, which also counts the mapped library pages a cold start charges as page
    # cache), and add 32 MiB of slack for what neither counts (allocator arenas, the .npy outputs,
    # page-table and slab charges).
    base = subprocess.run([sys.executable, "-c", CHILD, "-", "baseline"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert base.returncode == 0, base.stderr
    baseline = json.loads(base.stdout)["rss"]
    limit = budget + baseline + (32 << 20)

    cg = os.path.join(memcg.parent, f"flashmoe-test-{os.getpid()}")
    try:
        os.mkdir(cg)
    except OSError as exc:
        pytest.skip(f"cgroup test: cannot create {cg}: {exc}")
    proc = None
    try:
        try:
            memcg.limit(cg, limit)
        except OSError as exc:
            pytest.skip(f"cgroup test: cannot set the memory limit of {cg}: {exc}")
        os.sync()
        try:  # cold cache: the model's pages written above must come from the disk again
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3")
        except OSError as exc:
            pytest.skip(f"cgroup test: cannot drop page caches: {exc}")

        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", CHILD, cg, "run", str(path), str(budget), str(BIG_CTX),
                                 str(n_gen), str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=120)
        seconds = time.monotonic() - t0
        if proc.returncode == 77:
            pytest.skip(f"cgroup test: {err.strip()}")
        peak, oom = memcg.peak(cg), memcg.oom(cg)
        print(f"\ncgroup v{memcg.version} run: model {model_bytes / 2**20:.1f} MiB, budget {budget / 2**20:.1f} "
              f"MiB, baseline RSS {baseline / 2**20:.1f} MiB, limit {limit / 2**20:.1f} MiB, peak "
              f"{'?' if peak is None else f'{peak / 2**20:.1f} MiB'}, {oom}, {seconds:.1f} s")
        assert proc.returncode == 0, f"child exited {proc.returncode} (OOM kill is -9): {err[-3000:]}"
        info = json.loads(out.strip().splitlines()[-1])
        print(f"child: {info}")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        try:
            os.rmdir(cg)
        except OSError:
            pass

    assert any(line.endswith(f"/flashmoe-test-{os.getpid()}") for line in info["cgroup"]), info["cgroup"]
    assert info["memory"]["budget"] == budget and info["memory"]["expert_slots"] == BIG["num_experts_per_tok"]
    assert peak is None or peak <= limit
    assert oom.get("oom_kill", 0) == 0 and oom.get("under_oom", 0) == 0 and oom.get("oom", 0) == 0, oom
    # the engine's own peak stayed inside its budget: the process grew by less than the budget
    assert info["hwm"] - info["rss_before_load"] <= budget, info
    # the experts were streamed, not held: it read far more than the cache holds
    assert info["stats"]["bytes_read"] > 3 * info["memory"]["expert_cache_bytes"]
    np.testing.assert_array_equal(np.load(tmp_path / "tokens.npy"), ref_tokens)
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), ref_logits)


# ---------------------------------------------------------------- 2. outputs never depend on the budget

@pytest.mark.parametrize("io_threads", [1, 8])
@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("policy", ["lru", "lfru", "pagecache"])
@pytest.mark.parametrize("budget", ["min", "2x", "all"])
@pytest.mark.parametrize("chunk", [5, 128])  # 5 < len(PROMPT): the prompt runs in 5 chunks
def test_outputs_identical_across_budgets_policies_prefetch_threads(small_dir, references, budget, policy,
                                                                    prefetch, io_threads, chunk):
    b = budget_for(small_dir, budget, prefill_chunk=chunk)
    tokens, prefill, decode, m = run(small_dir, memory_budget=b, cache_policy=policy, prefetch=prefetch,
                                     io_threads=io_threads, prefill_chunk=chunk)
    if budget != "all":
        k = SMALL["num_experts_per_tok"]
        slots = {"min": k, "2x": 2 * k}[budget]
        assert m.memory["expert_slots"] == slots
    assert_same_run((tokens, prefill, decode), references(chunk))


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("policy", ["lru", "lfru", "pagecache"])
def test_outputs_identical_with_a_single_expert_slot(small_dir, references, policy, prefetch):
    """One slot, fewer than the k experts of a token: each expert is read, used and evicted in turn."""
    tokens, prefill, decode, m = run(small_dir, expert_cache_slots=1, cache_policy=policy, prefetch=prefetch,
                                     prefill_chunk=5)
    assert m.memory["expert_slots"] == 1
    assert_same_run((tokens, prefill, decode), references(5))


def test_outputs_identical_across_compute_threads(small_dir, reference):
    """The compute pool splits a matmul's rows over threads; each row's sum stays the same."""
    from flashmoe import _core

    before = _core.get_threads()
    try:
        for n in (1, 3):
            got = run(small_dir, threads=n, memory_budget=budget_for(small_dir, "min", threads=n))[:3]
            assert_same_run(got, reference)
    finally:
        _core.set_threads(before)


def test_prefill_chunk_changes_logits_only_in_the_last_bits(small_dir):
    # fp32 activations: with int8 ones a chunk of <= 8 tokens takes the int8 kernels for every matmul
    # and a longer one only for its experts (ops.h), a ~1% change that is not what this test is about.
    want = run(small_dir, prefill_chunk=128, int8_activations=False)[1]
    for chunk in (1, 5):
        got = run(small_dir, prefill_chunk=chunk, int8_activations=False)[1]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


# ----------------------------------------------------------------------------- 3. the minimum budget

@pytest.mark.parametrize("ctx", [CTX, 1000])
def test_minimum_budget_is_exact(small_dir, ctx):
    fixed, min_cache = minimum_budget(small_dir, context_length=ctx)
    m = flashmoe.load(small_dir, context_length=ctx, memory_budget=fixed + min_cache)
    mem = m.memory
    assert mem["expert_slots"] == SMALL["num_experts_per_tok"]
    assert (mem["dense_bytes"] + mem["kv_bytes"] + mem["state_bytes"] + mem["scratch_bytes"]
            + mem["expert_cache_bytes"]) <= mem["budget"] == fixed + min_cache
    unbudgeted = flashmoe.load(small_dir, context_length=ctx)
    np.testing.assert_array_equal(m.generate_tokens(PROMPT, 2, stop_token_ids=[]),
                                  unbudgeted.generate_tokens(PROMPT, 2, stop_token_ids=[]))
    with pytest.raises(MemoryBudgetError):
        flashmoe.load(small_dir, context_length=ctx, memory_budget=fixed + min_cache - 1)


def _named_minimum(message):
    """The minimum a MemoryBudgetError names, in bytes (exact bytes if given, else MiB as printed)."""
    got = re.search(r"need at least ([\d,]+) bytes", message)
    if got:
        return int(got.group(1).replace(",", ""))
    got = re.search(r"need at least ([\d.]+) ?MiB", message)
    assert got, f"the error does not name the minimum: {message}"
    return int(float(got.group(1)) * 2**20)


CTXS = [64, CTX, 512, 1000, 2048, 4096]  # minimums that print rounded down (64, 512, 2048, 4096) and up


@pytest.mark.parametrize("too_small", ["1", "half", "one byte short"])
def test_budget_below_minimum_raises_naming_the_minimum(small_dir, too_small):
    for ctx in CTXS:
        fixed, min_cache = minimum_budget(small_dir, context_length=ctx)
        need = fixed + min_cache
        b = {"1": 1, "half": need // 2, "one byte short": need - 1}[too_small]
        with pytest.raises(MemoryBudgetError, match="too small") as exc:
            flashmoe.load(small_dir, context_length=ctx, memory_budget=b)
        named = _named_minimum(str(exc.value))
        assert abs(named - need) <= 0.05 * 2**20 + 1, (str(exc.value), need)  # right to the precision shown


def test_memory_plan_names_the_same_minimum_without_loading(small_dir):
    for ctx in CTXS:
        fixed, min_cache = minimum_budget(small_dir, context_length=ctx)
        plan = flashmoe.memory_plan(small_dir, context_length=ctx)
        assert plan["minimum"] == fixed + min_cache
        assert flashmoe.memory_plan(small_dir, context_length=ctx, memory_budget=plan["minimum"])["expert_slots"] == K
        with pytest.raises(MemoryBudgetError):
            flashmoe.memory_plan(small_dir, context_length=ctx, memory_budget=plan["minimum"] - 1)


def test_loading_with_the_named_minimum_works(small_dir):
    for ctx in CTXS:
        with pytest.raises(MemoryBudgetError) as exc:
            flashmoe.load(small_dir, context_length=ctx, memory_budget=1)
        named = _named_minimum(str(exc.value))
        m = flashmoe.load(small_dir, context_length=ctx, memory_budget=named)
        assert m.memory["expert_slots"] >= SMALL["num_experts_per_tok"]


# ----------------------------------------------------------------------------------- 4. the cache

MOE_LAYERS = SMALL["num_hidden_layers"]
K = SMALL["num_experts_per_tok"]
STRIDE = 16384


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("policy", ["lru", "lfru"])
def test_budget_holding_every_expert_reads_a_repeated_prompt_from_memory(small_dir, policy, prefetch):
    fixed, _ = minimum_budget(small_dir, context_length=CTX)
    n_all = MOE_LAYERS * SMALL["num_experts"]
    m = flashmoe.load(small_dir, context_length=CTX, memory_budget=fixed + n_all * STRIDE,
                      cache_policy=policy, prefetch=prefetch)
    assert m.memory["expert_slots"] == m.memory["experts_total"] == n_all
    first = m.forward(PROMPT)
    assert m.stats["last"]["expert_misses"] > 0
    np.testing.assert_array_equal(m.forward(PROMPT), first)
    last = m.stats["last"]
    assert last["hit_rate"] == 1.0 and last["expert_misses"] == 0, last
    assert last["bytes_read"] == 0 and last["prefetches"] == 0, last


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("policy", ["lru", "lfru"])
def test_mid_budget_repeated_text_hits_more_than_the_first_pass(small_dir, policy, prefetch):
    """Half of the experts fit. Decoding the same 12 tokens again finds more of them resident."""
    fixed, _ = minimum_budget(small_dir, context_length=CTX)
    slots = MOE_LAYERS * SMALL["num_experts"] // 2
    m = flashmoe.load(small_dir, context_length=CTX, memory_budget=fixed + slots * STRIDE,
                      cache_policy=policy, prefetch=prefetch)
    assert m.memory["expert_slots"] == slots
    text = PROMPT[:12]
    hits = []
    for _ in range(2):
        m.forward(text[:1])
        for t in text[1:]:
            m.forward([t], reset=False)
        hits.append(m.stats["expert_hits"] - sum(hits))
    assert hits[1] > hits[0], hits


@pytest.mark.parametrize("io_threads", [1, 8])
@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("policy", ["lru", "lfru", "pagecache"])
@pytest.mark.parametrize("budget", ["min", "2x", "all", "one slot"])
def test_counters_add_up(small_dir, budget, policy, prefetch, io_threads):
    """hits + misses count one acquisition per (layer, expert) per chunk; expert_usage counts token-uses.
    For a single-token step both are moe_layers x k. For a chunk, acquisitions are the distinct
    (layer, expert) pairs its tokens chose, which is where expert_usage grew during the call."""
    opts = dict(cache_policy=policy, prefetch=prefetch, io_threads=io_threads, prefill_chunk=8)
    if budget == "one slot":
        opts["expert_cache_slots"] = 1
    else:
        opts["memory_budget"] = budget_for(small_dir, budget, prefill_chunk=8)
    m = flashmoe.load(small_dir, context_length=CTX, **opts)
    stride = m.header["experts"]["stride"]
    assert stride == STRIDE

    # decode only: N single-token steps
    n = 10
    m.generate_tokens(PROMPT[:1], n, stop_token_ids=[])
    s = settled_stats(m, stride)
    usage = m.expert_usage()
    assert usage.shape == (SMALL["num_hidden_layers"], SMALL["num_experts"])
    assert s["tokens"] == n
    assert s["expert_hits"] + s["expert_misses"] == n * MOE_LAYERS * K == usage.sum()
    assert s["bytes_read"] == (s["expert_misses"] + s["prefetches"]) * stride, s

    # chunks of 8 tokens, one chunk per call
    for i in range(0, len(PROMPT), 8):
        before = m.expert_usage()
        m.forward(PROMPT[i:i + 8], reset=i == 0)
        last = m.stats["last"]
        grew = m.expert_usage() - before
        assert grew.sum() == 8 * MOE_LAYERS * K
        assert last["expert_hits"] + last["expert_misses"] == np.count_nonzero(grew), (last, grew)
    s = settled_stats(m, stride)
    assert s["bytes_read"] == (s["expert_misses"] + s["prefetches"]) * stride, s
    if policy == "pagecache":
        assert s["expert_hits"] == 0 and s["prefetches"] == 0 and s["prefetch_hits"] == 0, s
    assert s["prefetch_hits"] <= min(s["prefetches"], s["expert_hits"])
    if not prefetch:
        assert s["prefetches"] == 0, s

    m.reset_stats()
    assert m.expert_usage().sum() == 0 and m.stats["expert_hits"] + m.stats["expert_misses"] == 0


# ------------------------------------------------------------------------- 5. failed reads mid-stream

@pytest.mark.parametrize("budget", ["min", "all"])
@pytest.mark.parametrize("layer", [1, 3])
def test_truncated_expert_file_while_streaming(small_copy, reference, layer, budget):
    """Half of one layer's experts cut off after load; with every expert fitting, ~30 reads of that layer
    are queued at once on 8 threads, with prefetch reading ahead into it from the layer before."""
    m = flashmoe.load(small_copy, context_length=CTX, io_threads=8, prefetch=True,
                      memory_budget=budget_for(small_copy, budget))
    ref = flashmoe.load(small_copy, context_length=CTX)
    ref.forward(PROMPT)
    used = ref.expert_usage()[layer]
    path = expert_file(small_copy, layer)
    data = path.read_bytes()
    keep = SMALL["num_experts"] // 2
    os.truncate(path, PREAMBLE + keep * STRIDE + STRIDE // 2)  # experts >= 16 short or empty
    assert used[keep:].sum() > 0
    # The first failed read: a short one, or a whole one of a file that has changed since load (the
    # truncation set its times).
    with pytest.raises((ReadError, FormatError), match=rf"layer {layer} expert \d+: (short read|.* changed on disk)") as exc:
        m.forward(PROMPT)
    e = int(re.search(r"expert (\d+)", str(exc.value)).group(1))
    assert used[e] > 0 and (e >= keep or "changed" in str(exc.value)), (str(exc.value), used)
    assert m.position == 0
    with pytest.raises((ReadError, FormatError)):  # still broken: still an error, never garbage
        m.forward(PROMPT)
    path.write_bytes(data)  # written back in place: changed since load, refused until loaded again
    with pytest.raises(FormatError, match=rf"layer {layer} expert \d+: .* changed on disk"):
        m.forward(PROMPT)
    m = flashmoe.load(small_copy, context_length=CTX, io_threads=8, prefetch=True,
                      memory_budget=budget_for(small_copy, budget))
    np.testing.assert_array_equal(m.forward(PROMPT), reference[1])
    np.testing.assert_array_equal(m.generate_tokens(PROMPT, N_GEN, stop_token_ids=[]), reference[0])


@pytest.mark.parametrize("layer", [0, 2])
def test_corrupt_blob_while_streaming_with_checksums(small_copy, reference, layer):
    ref = flashmoe.load(small_copy, context_length=CTX)
    ref.forward(PROMPT)
    used = ref.expert_usage()[layer]
    path = expert_file(small_copy, layer)
    data = path.read_bytes()
    bad = bytearray(data)
    for e in range(SMALL["num_experts"]):  # one flipped byte inside every expert of the layer
        bad[PREAMBLE + e * STRIDE + 100] ^= 0xFF
    path.write_bytes(bytes(bad))
    m = flashmoe.load(small_copy, context_length=CTX, io_threads=8, prefetch=True, verify_checksums=True)
    with pytest.raises(FormatError, match=rf"layer {layer} expert \d+: checksum mismatch") as exc:
        m.forward(PROMPT)
    e = int(re.search(r"expert (\d+)", str(exc.value)).group(1))
    assert used[e] > 0, (str(exc.value), used)
    assert m.position == 0
    path.write_bytes(data)
    np.testing.assert_array_equal(m.forward(PROMPT), reference[1])
    np.testing.assert_array_equal(m.generate_tokens(PROMPT, N_GEN, stop_token_ids=[]), reference[0])


def test_failed_prefetch_that_is_never_used_does_not_raise(small_copy):
    """Corrupt every expert a short run never routes to (known from an intact run of the same calls).
    Every bad blob read is then a prefetch the router did not confirm; with all experts fitting nothing
    is evicted, so exactly prefetches - prefetch_hits of them were read and failed their checksum, and
    must be ignored."""
    prompt, n_gen = PROMPT[:3], 4
    ref = flashmoe.load(small_copy, context_length=CTX)
    ref_tokens = ref.generate_tokens(prompt, n_gen, stop_token_ids=[])
    ref_logits = ref.forward(prompt)
    usage = ref.expert_usage()
    n_bad = 0
    for entry in header_of(small_copy)["experts"]["layers"]:
        path = small_copy / entry["file"]
        bad = bytearray(path.read_bytes())
        for e in np.flatnonzero(usage[entry["layer"]] == 0):
            bad[PREAMBLE + int(e) * STRIDE + 100] ^= 0xFF
            n_bad += 1
        path.write_bytes(bytes(bad))
    assert n_bad > 0
    m = flashmoe.load(small_copy, context_length=CTX, io_threads=8, prefetch=True, verify_checksums=True)
    assert m.memory["expert_slots"] == m.memory["experts_total"]
    tokens = m.generate_tokens(prompt, n_gen, stop_token_ids=[])
    logits = m.forward(prompt)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_array_equal(logits, ref_logits)
    np.testing.assert_array_equal(m.expert_usage(), usage)
    s = m.stats
    assert s["prefetches"] - s["prefetch_hits"] > 0, s  # some predictions were wrong: bad blobs were read
    # a corrupt expert that the router does pick (the full prompt uses nearly all) is still an error
    with pytest.raises(FormatError, match=r"layer \d+ expert \d+: checksum mismatch") as exc:
        m.forward(PROMPT)
    layer, e = map(int, re.search(r"layer (\d+) expert (\d+)", str(exc.value)).groups())
    assert usage[layer, e] == 0, str(exc.value)
