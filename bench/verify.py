"""What verify_checksums costs: decode under a memory budget with every expert read CRC-checked, or not.

    python bench/verify.py [--dir DIR] [--layers 8] [--budget-fraction 0.25] [--tokens 32] [--rounds 3]

The benchmark model of bench/decode.py (Qwen3.5-35B-A3B per-layer shapes, 4-bit, --layers deep; written
once under --dir), loaded with a budget of --budget-fraction of its size so that most experts are read
on every token, decoded greedily --tokens steps after a 16-token prompt, once with verify_checksums off
and once on, in fresh processes taking turns (--rounds). On a real disk (the default --dir, O_DIRECT)
the check runs on the I/O threads while the disk is busy; on tmpfs (--dir /dev/shm/...) reads are
memory copies, so the CRC's full CPU cost shows. Printed: decode tok/s and read GB/s per run, medians
and the ratio on/off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flashmoe.reader import model_bytes  # noqa: E402
from decode import BENCH_DIR, model_path, run_script  # noqa: E402  (bench/decode.py: the shared benchmark model)


def child(spec: dict) -> None:
    import numpy as np

    import flashmoe

    m = flashmoe.load(spec["path"], memory_budget=spec["budget"], verify_checksums=spec["verify"],
                      context_length=64, threads=2)
    ids = np.random.default_rng(0).integers(0, spec["vocab"], 16)
    m.generate_tokens(ids, max_tokens=4, stop_token_ids=[])  # warm-up
    m.reset_stats()
    m.generate_tokens(ids, max_tokens=spec["tokens"], stop_token_ids=[])
    s = m.stats
    print(json.dumps({"decode": s["last_generated_tokens"] / s["last_decode_seconds"], "read_gbps": s["read_gbps"],
                      "hit_rate": s["hit_rate"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3.5-35b-a3b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dir", default=BENCH_DIR)
    ap.add_argument("--budget-fraction", type=float, default=0.25)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    path, header = model_path(args)
    size = model_bytes(header)
    budget = int(size * args.budget_fraction)
    print(f"{path}: {size / 1e9:.2f} GB, budget {budget / 1e9:.2f} GB, {args.tokens} decode steps")
    res: dict[bool, list] = {False: [], True: []}
    for rnd in range(args.rounds):
        for verify in (False, True):
            spec = {"path": path, "budget": budget, "verify": verify, "tokens": args.tokens,
                    "vocab": header["config"]["vocab_size"]}
            row = run_script(__file__, spec)
            res[verify].append(row)
            print(f"  round {rnd + 1} verify={verify}: decode {row['decode']:.2f} tok/s, "
                  f"read {row['read_gbps']:.2f} GB/s, hit rate {row['hit_rate']:.2f}", flush=True)
    off, on = (statistics.median(r["decode"] for r in res[v]) for v in (False, True))
    print(f"verify off {off:.2f} tok/s, on {on:.2f} tok/s: x{on / off:.3f} (medians of {args.rounds})")
    print(json.dumps({"off": off, "on": on, "ratio": on / off}))


if __name__ == "__main__":
    main()
