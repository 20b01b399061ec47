"""README promises about memory and reads, each checked where it would fail if untrue:

- "Without a budget the engine takes half of physical RAM"; budgets as bytes or strings ("6GB" is 10^9
  bytes a GB, "6GiB" and "6G" 2^30);
- "Routed experts are read on demand, one 16 KiB-aligned pread per expert with O_DIRECT (the engine owns
  the cache, the page cache is bypassed), io_threads reads in flight".

The reads are watched from outside: tests/c/io_shim.c, preloaded into a child process, logs every open
and pread of the expert files and slows each read down, so that the reads in flight at once can be
counted; the page cache is read with mincore(2).
"""

import ctypes
import json
import mmap
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import flashmoe
from flashmoe.synth import DEMO_CONFIG, write_random_model

ROOT = Path(__file__).resolve().parent.parent
PREAMBLE = 16384
# 4 MoE layers x 32 experts of one 16 KiB stride, 4 active
SMALL = {**DEMO_CONFIG, "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 4,
         "layer_types": ["linear_attention"] * 3 + ["full_attention"], "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 32, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
         "linear_key_head_dim": 16, "linear_value_head_dim": 16, "num_experts": 32, "num_experts_per_tok": 4,
         "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64}
PROMPT = np.random.default_rng(7).integers(0, SMALL["vocab_size"], 24)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("io") / "m"
    write_random_model(path, SMALL, bits=4, progress=False)
    return path


# ------------------------------------------------------------------------------------------ budgets


def test_default_budget_is_half_of_physical_ram(model_dir):
    half = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    m = flashmoe.load(model_dir, context_length=128)
    assert m.memory["budget"] == half
    assert flashmoe.memory_plan(model_dir, context_length=128)["budget"] == half


@pytest.mark.parametrize("text,nbytes", [("6GB", 6 * 10**9), ("6GiB", 6 * 2**30), ("6G", 6 * 2**30),
                                         ("512MB", 512 * 10**6), ("1.5 GiB", 3 * 2**29), ("300MiB", 300 * 2**20),
                                         ("  2gb ", 2 * 10**9), (123456789, 123456789)])
def test_budget_strings(model_dir, text, nbytes):
    assert flashmoe.memory_plan(model_dir, context_length=128, memory_budget=text)["budget"] == nbytes


def test_a_budget_string_loads_with_that_budget(model_dir):
    """Loaded, the budget given as a string is the one the engine splits: a budget of the fixed part plus
    ~90 experts' slots, written in MiB and in MB, gives the slots each one holds (and they differ)."""
    opts = dict(context_length=128, prefill_chunk=128)
    fixed = flashmoe.memory_plan(model_dir, **opts)["minimum"] - SMALL["num_experts_per_tok"] * 16384
    mib = -(-(fixed + 90 * 16384) // 2**20)  # whole MiB above it
    slots = []
    for text, nbytes in ((f"{mib}MiB", mib * 2**20), (f"{mib}MB", mib * 10**6)):
        m = flashmoe.load(model_dir, memory_budget=text, **opts)
        assert m.memory["budget"] == nbytes
        assert m.memory["expert_slots"] == min((nbytes - fixed) // 16384, m.memory["experts_total"])
        slots.append(m.memory["expert_slots"])
    assert slots[0] > slots[1] >= SMALL["num_experts_per_tok"]  # 2^20 > 10^6: the units are not mixed up


# ----------------------------------------------------------------------------- the reads themselves


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not sys.platform.startswith("linux"):
        pytest.skip("the read watcher needs Linux and a C compiler")
    out = tmp_path_factory.mktemp("shim") / "io_shim.so"
    r = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(ROOT / "tests/c/io_shim.c"), "-ldl"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


CHILD = r"""
import json, os, sys
import numpy as np
import flashmoe
path, opts, prompt = sys.argv[1], json.loads(sys.argv[2]), np.array(json.loads(sys.argv[3]))
m = flashmoe.load(path, context_length=128, **opts)
for f in sorted(os.listdir(os.path.join(path, "experts"))):  # what loading read (and read ahead) goes
    fd = os.open(os.path.join(path, "experts", f), os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
m.forward(prompt)
m.generate_tokens(prompt[:3], 4, stop_token_ids=[])
print(json.dumps({k: v for k, v in m.stats.items() if k != "last"}))
"""


def watched_run(model_dir, shim, tmp_path, delay_us=0, **opts):
    """Run CHILD under the shim: (stats, opens {fd: (flags, path)}, reads [(fd, offset, bytes, address,
    in_flight)])."""
    log = tmp_path / f"io-{len(list(tmp_path.iterdir()))}.log"
    env = dict(os.environ, LD_PRELOAD=str(shim), FLASHMOE_SHIM_LOG=str(log), FLASHMOE_SHIM_DELAY_US=str(delay_us))
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(flashmoe.__file__))]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), json.dumps(opts), json.dumps(PROMPT.tolist())],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    opens, reads = {}, []
    for ln in log.read_text().splitlines():
        kind, rest = ln.split(" ", 1)
        if kind == "open":
            fd, flags, path = rest.split(" ", 2)
            opens[int(fd)] = (int(flags), path)
        else:
            reads.append(tuple(int(v) for v in rest.split()))
    return json.loads(r.stdout), opens, reads


def o_direct_works(path):
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("budget", ["all", "small"])
def test_one_aligned_o_direct_read_per_expert(model_dir, shim, tmp_path, budget):
    opts = {} if budget == "all" else {"expert_cache_slots": 6}
    stats, opens, reads = watched_run(model_dir, shim, tmp_path, **opts)
    stride = flashmoe.load(model_dir, context_length=128).header["experts"]["stride"]
    blobs = [r for r in reads if r[1] >= PREAMBLE]  # not the loader's preamble checks at offset 0
    assert all(r[1] == 0 and r[2] == PREAMBLE for r in reads if r[1] < PREAMBLE), reads
    # one read per expert brought in: each miss and each prefetch is one pread of one whole blob
    assert len(blobs) == stats["expert_misses"] + stats["prefetches"] > 0, (len(blobs), stats)
    assert stats["bytes_read"] == len(blobs) * stride
    for fd, offset, nbytes, address, _ in blobs:
        assert nbytes == stride and (offset - PREAMBLE) % stride == 0, (offset, nbytes)
        assert offset % 16384 == 0 and address % 16384 == 0, (offset, address)  # 16 KiB-aligned
    direct = o_direct_works(str(next(iter(opens.values()))[1]))
    if direct:  # where the file system takes O_DIRECT, every blob is read through it
        assert stats["direct_io"] is True
        assert all(opens[r[0]][0] & os.O_DIRECT for r in blobs), {fd: hex(f) for fd, (f, _) in opens.items()}
    else:
        assert stats["direct_io"] is False


@pytest.mark.parametrize("io_threads", [1, 3])
def test_reads_in_flight_reach_io_threads_and_no_more(model_dir, shim, tmp_path, io_threads):
    """Each read takes 5 ms more than it would: a prompt chunk queues ~25 reads per layer at once, so
    the I/O threads are all busy at some point, and never more reads than threads are in flight."""
    stats, _, reads = watched_run(model_dir, shim, tmp_path, delay_us=5000, io_threads=io_threads)
    blobs = [r for r in reads if r[1] >= PREAMBLE]
    assert len(blobs) >= 4 * io_threads
    assert max(r[4] for r in blobs) == io_threads, sorted({r[4] for r in blobs})


# ----------------------------------------------------------------------------------- the page cache


def resident_pages(path, start):
    """Pages of the file from `start` on that are in the page cache (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path) - start
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
        assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
        libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec)


def drop_from_page_cache(model_dir):
    for f in sorted((model_dir / "experts").iterdir()):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        assert resident_pages(f, PREAMBLE) == 0, f


@pytest.mark.parametrize("policy", ["lfru", "lru", "pagecache"])
def test_expert_reads_bypass_the_page_cache(model_dir, shim, tmp_path, policy):
    """After a run that read most experts, none of their pages is in the page cache, O_DIRECT or not
    (without it the engine drops what it read); with cache_policy="pagecache" they are, which shows that
    the measurement sees the reads. (The child drops the pages that loading brought in: the loader's
    buffered reads of each file's preamble make the kernel read ahead into the first blobs.)"""
    drop_from_page_cache(model_dir)
    stats, _, _ = watched_run(model_dir, shim, tmp_path, cache_policy=policy, expert_cache_slots=8)
    assert stats["expert_misses"] > 20
    pages = sum(resident_pages(f, PREAMBLE) for f in (model_dir / "experts").iterdir())
    if policy == "pagecache":
        assert pages > 0
    else:
        assert pages == 0, pages
