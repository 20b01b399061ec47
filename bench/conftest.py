"""The benchmark harness (pytest-benchmark): what CI runs; the scripts next to it are for deep studies.

    pip install ".[bench]"
    python -m pytest bench --benchmark-only --benchmark-json=out.json

The README's test command (`python -m pytest`, testpaths = tests) does not collect these. One session
writes a small random model of Qwen3.5-35B-A3B's real per-layer shapes (flashmoe.synth: hidden 2048,
256 experts with 8 active, expert ffn 512; 4 layers, 3 DeltaNet + 1 attention; vocabulary cut to 32768;
~2 GB, 4-bit) into a temporary directory (--bench-dir DIR keeps and reuses it), measures the machine's
two ceilings once, then times (bench/test_bench.py):

  - decode tokens/s with everything in RAM, against DRAM: ceiling tokens/s = DRAM GB/s / weight bytes a
    decode step reads (dense + 8 experts a layer + lm_head);
  - decode tokens/s under a memory budget of a quarter of the model (most experts stream from disk),
    against the disk: ceiling tokens/s = disk GB/s / expert bytes read per token;
  - prompt tokens/s in RAM (compute-bound: no ceiling applies; both are recorded so that machines can
    still be put side by side);
  - matvec kernel GB/s (4-bit and 8-bit weights, int8 activations, the kernel the engine picks), against
    DRAM.

The ceilings, measured in the same session: disk read GB/s of 8 threads reading whole expert blobs at
random offsets of the model's expert files with the page cache bypassed (O_DIRECT; F_NOCACHE on macOS),
as bench/decode.py's read_ceiling does (best of three 1 s samples; the decode under a budget adds one
taken right after it); DRAM GB/s of a numpy copy of 512 MiB (bytes read + written / s,
as many threads as the engine uses). Every benchmark's `extra_info` holds the ceilings, the ratio to its ceiling where one
applies, tokens/s, bytes read, the machine (platform, CPU model, cores) and the flashmoe commit when
known, so a JSON from a Mac and one from Linux compare as ratios, not as raw speeds.

Baselines: pytest-benchmark keeps runs under .benchmarks/ with --benchmark-save=NAME (or
--benchmark-autosave) and compares a new run with a saved one, failing on a regression past a threshold:

    python -m pytest bench --benchmark-only --benchmark-save=base            # on the old commit
    python -m pytest bench --benchmark-only --benchmark-compare=0001 --benchmark-compare-fail=median:15%
    pytest-benchmark compare a.json b.json --columns=median,ops   # two --benchmark-json files (a Mac's, Linux's)

Compare raw times only on one machine; across machines compare extra_info's ratios.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import platform
import subprocess
import sys
import time

import numpy as np
import pytest
from flashmoe import presets
from flashmoe.reader import read_header
from flashmoe.synth import write_random_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ceilings import disk_read_gbps  # noqa: E402  (bench/ceilings.py)

PRESET, LAYERS, VOCAB = "qwen3.5-35b-a3b", 4, 32768


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("benchmark"):
        raise pytest.UsageError("the harness needs pytest-benchmark: pip install '.[bench]'")
    if config.getoption("benchmark_disable"):  # the tests read the timings they make
        raise pytest.UsageError("the harness only measures: run it without --benchmark-disable")


def pytest_addoption(parser):
    parser.addoption("--bench-dir", default=None,
                     help="keep the harness's model in this directory and reuse it (default: a temporary one)")


# ------------------------------------------------------------------------------------ the model

@pytest.fixture(scope="session")
def bench_model(request, tmp_path_factory) -> tuple[str, dict]:
    """(path, header) of the session's model, written once."""
    base = request.config.getoption("--bench-dir") or str(tmp_path_factory.mktemp("flashmoe-bench"))
    cfg = presets.truncate(PRESET, LAYERS)
    cfg["vocab_size"] = VOCAB  # the real 248320 would make lm_head and the embedding most of the model
    path = os.path.join(base, f"{PRESET}-{LAYERS}L-v{VOCAB}-4bit")
    if not os.path.exists(os.path.join(path, "flashmoe.json")):
        write_random_model(path, cfg, bits=4, progress=False)
    return path, read_header(path)


def model_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# ------------------------------------------------------------------------------------ the ceilings

def dram_copy_gbps(threads: int, n_bytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes read + written per second by np.copyto of n_bytes, split over as many threads as the engine
    computes with (one core alone cannot saturate DRAM on many machines), best of `repeats`. Source and
    destination together (1 GiB) are larger than the last-level caches of the machines we use."""
    src = np.ones(n_bytes // 8)
    dst = np.empty_like(src)
    parts = list(zip(np.array_split(dst, threads), np.array_split(src, threads)))
    best = float("inf")
    with cf.ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats + 1):  # the first touches dst's pages
            t0 = time.perf_counter()
            list(pool.map(lambda p: np.copyto(*p), parts))
            best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best / 1e9


# ------------------------------------------------------------------------------------ the machine

def cpu_model() -> str:
    try:
        if sys.platform == "darwin":
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], check=False, capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("model name", "Model", "CPU part"):
                    return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def flashmoe_commit() -> str | None:
    """The commit under test: $GITHUB_SHA in GitHub Actions, else the checkout this file lives in."""
    if os.environ.get("GITHUB_SHA"):
        return os.environ["GITHUB_SHA"]
    git = ["git", "-C", os.path.dirname(os.path.abspath(__file__))]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], check=False, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], check=False,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None  # +dirty: changes not in that commit
    except (OSError, subprocess.SubprocessError):
        return None


@pytest.fixture(scope="session")
def measure_disk(bench_model):
    """One more disk ceiling sample (GB/s), for a benchmark to take right after it ran."""
    return lambda: disk_read_gbps(*bench_model, seconds=1.0)[0]


@pytest.fixture(scope="session")
def context(bench_model) -> dict:
    """What every benchmark's extra_info carries: the machine, the commit and the ceilings."""
    from flashmoe import _core

    path, header = bench_model
    # Three samples, the best kept (a ceiling): other work on the machine pulls single samples down.
    samples = [disk_read_gbps(path, header, seconds=1.0) for _ in range(3)]
    disk, mode = max(samples)
    return {
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu_model(),
                    "cores": os.cpu_count(), "kernels": _core.cpu_isas(), "threads": _core.get_threads()},
        "flashmoe_commit": flashmoe_commit(),
        "model": {"preset": PRESET, "layers": LAYERS, "vocab": VOCAB, "bits": 4, "bytes": model_bytes(path)},
        "ceilings": {"disk_read_gbps": round(disk, 3), "disk_read_mode": mode,
                     "disk_read_gbps_samples": [round(g, 3) for g, _ in samples],
                     "dram_copy_gbps": round(dram_copy_gbps(_core.get_threads()), 3)},
    }
