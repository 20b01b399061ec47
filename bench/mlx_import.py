"""Importing an MLX checkpoint: how fast, against the disk; and does the imported model decode as fast?

    python bench/mlx_import.py [--preset qwen3.5-35b-a3b] [--layers 4] [--tokens 32] [--runs 3] [--dir DIR]

1. A Qwen3.5-MoE checkpoint in mlx-lm's layout at the preset's real shapes (--layers deep; random words,
   bf16 scales, the 8-bit router: tests/mlx_fixtures.write_synthetic_mlx) is imported with a cold page
   cache (root: drop_caches). Printed: seconds and source GB/s, next to the ceiling measured in the same
   run: reading the source cold (one sequential pass) and writing + fsyncing as many bytes; an import
   reads and writes every byte once, so its ceiling is 1 / (1/read + 1/write).
2. The same shapes written natively (flashmoe synth: float16 scales, the bf16 router) and the import are
   loaded in RAM and decode --tokens greedy tokens after a 16-token prompt, alternating, --runs times:
   decode tok/s medians and their ratio. bf16 scales and the 8-bit router should cost nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import flashmoe  # noqa: E402
from flashmoe import presets  # noqa: E402
from flashmoe.synth import write_random_model  # noqa: E402


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def read_gbps(path: str) -> float:
    drop_caches()
    n, t0 = 0, time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(16 << 20):
            n += len(chunk)
    return n / (time.perf_counter() - t0) / 1e9


def write_gbps(d: str, n: int) -> float:
    path, block = os.path.join(d, "write-probe"), os.urandom(16 << 20)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(max(1, n // len(block))):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
        os.remove(path)
    return max(1, n // len(block)) * len(block) / (time.perf_counter() - t0) / 1e9


def decode_tps(path: str, tokens: int) -> tuple[float, int]:
    """(decode tok/s, expert misses during the decode): every expert is read in by a 512-token prompt
    first (O_DIRECT reads would otherwise time the disk, not the kernels)."""
    m = flashmoe.load(path, memory_budget="16GB")
    ids = np.random.default_rng(0).integers(0, m.config["vocab_size"], 512)
    tok = int(np.argmax(m.forward(ids)[-1]))
    m.reset_stats()
    t0 = time.perf_counter()
    for _ in range(tokens):
        tok = int(np.argmax(m.forward([tok], reset=False)[0]))
    tps = tokens / (time.perf_counter() - t0)
    misses = m.stats["expert_misses"]
    del m
    gc.collect()
    return tps, misses


def main() -> None:
    from mlx_fixtures import write_synthetic_mlx

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3.5-35b-a3b", choices=[p for p in presets.NAMES if "next" not in p])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed after)")
    args = ap.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="flashmoe-mlx-bench-")
    cfg = presets.truncate(presets.get(args.preset), args.layers)
    src, imp, nat = (os.path.join(work, n) for n in ("mlx", "imported", "native"))
    try:
        write_synthetic_mlx(src, cfg, bits=4, group_size=64)
        src_bytes = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
        cold = drop_caches()
        t0 = time.perf_counter()
        flashmoe.convert(src, imp, progress=False, overwrite=True)
        secs = time.perf_counter() - t0
        # The disk varies between runs: the ceiling is the best of two probes, one before the import's
        # write-back has settled and one after.
        rd = max(read_gbps(os.path.join(src, "model.safetensors")) for _ in range(2))
        wr = max(write_gbps(work, src_bytes) for _ in range(2))
        ceiling = 1 / (1 / rd + 1 / wr)
        print(f"{args.preset}, {args.layers} layers: {src_bytes / 1e9:.2f} GB MLX checkpoint imported in {secs:.1f} s "
              f"= {src_bytes / secs / 1e9:.2f} GB/s ({'cold' if cold else 'warm'} cache); disk: read {rd:.2f} GB/s, "
              f"write+fsync {wr:.2f} GB/s, so read+write ceiling {ceiling:.2f} GB/s -> {src_bytes / secs / 1e9 / ceiling:.0%}")
        shutil.rmtree(src)
        write_random_model(nat, cfg, bits=4, group_size=64, seed=0, progress=False)
        tps, misses = {"native": [], "imported": []}, 0
        for _ in range(args.runs):
            for name, path in (("native", nat), ("imported", imp)):
                t, miss = decode_tps(path, args.tokens)
                tps[name].append(t)
                misses += miss
        med = {k: statistics.median(v) for k, v in tps.items()}
        print(f"decode in RAM ({misses} expert misses in all decodes), {args.tokens} tokens x {args.runs} runs: "
              f"native (f16 scales, bf16 router) {med['native']:.2f} tok/s, MLX import (bf16 scales, q8 router) "
              f"{med['imported']:.2f} tok/s, ratio {med['imported'] / med['native']:.3f}")
        print(json.dumps({"preset": args.preset, "layers": args.layers, "source_gb": round(src_bytes / 1e9, 3),
                          "import_s": round(secs, 2), "read_gbps": round(rd, 2), "write_gbps": round(wr, 2),
                          "decode_tps": {k: [round(x, 2) for x in v] for k, v in tps.items()}, "decode_misses": misses}))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
