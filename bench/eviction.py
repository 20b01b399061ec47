"""The expert store's bookkeeping per miss at the 397B shape's slot counts, builds side by side.

    python bench/eviction.py [--slots 4096] [--tokens 64] [--rounds 3] [--pkg DIR ...] [--dir DIR]

A model with the 397B's expert layout (60 layers, 512 experts, 10 routed per token) but tiny matrices
(hidden 64, expert FFN 32: a 48 KiB blob) so that compute and reading cost next to nothing, written to
/dev/shm (tmpfs: no O_DIRECT, so reads are copies from memory) and loaded with --slots expert slots of
its 30,720 experts under the default LFRU policy: most acquisitions are misses that evict. What is left
is the store's own work per miss: picking the victim (a scan of every slot before the heap), the read's
queueing and wake-ups, the copy. Printed: decode tok/s and
microseconds per miss for each build (--pkg: a directory holding a `flashmoe` package, e.g. one built
from an older commit; by default the installed one), taking turns round by round; medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import run_script  # noqa: E402  (bench/decode.py)

CONFIG = {"hidden_size": 64, "num_hidden_layers": 60, "num_experts": 512, "num_experts_per_tok": 10,
          "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "vocab_size": 512,
          "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "linear_num_key_heads": 2,
          "linear_num_value_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16}


def child(spec: dict) -> None:
    import numpy as np

    import flashmoe

    m = flashmoe.load(spec["path"], expert_cache_slots=spec["slots"], threads=1, context_length=spec["tokens"] + 64)
    ids = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], 16)
    m.generate_tokens(ids, max_tokens=spec["tokens"] // 2, stop_token_ids=[])  # warm: every slot filled
    m.reset_stats()
    m.generate_tokens(ids, max_tokens=spec["tokens"], stop_token_ids=[])
    s = m.stats
    print(json.dumps({"decode": s["last_generated_tokens"] / s["last_decode_seconds"],
                      "us_per_miss": 1e6 * s["compute_seconds"] / max(1, s["expert_misses"]),
                      "misses": s["expert_misses"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=4096, help="expert cache slots (397B at ~30 GB: ~4,500)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pkg", action="append", default=[])
    ap.add_argument("--dir", default="/dev/shm/flashmoe-bench-eviction")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    path = os.path.join(args.dir, "m")
    if not os.path.exists(os.path.join(path, "flashmoe.json")):
        from flashmoe.synth import DEMO_CONFIG, write_random_model

        cfg = {**DEMO_CONFIG, **CONFIG,
               "layer_types": ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(60)]}
        write_random_model(path, cfg, bits=4, progress=False)
    spec = {"path": path, "slots": args.slots, "tokens": args.tokens}
    builds = args.pkg or [""]
    print(f"{path}: 60 layers x 512 experts, top-10, {args.slots} slots, LFRU, {args.tokens} tokens")
    res: dict[str, list] = {b: [] for b in builds}
    for rnd in range(args.rounds):
        for b in builds:
            row = run_script(__file__, spec, b)
            res[b].append(row)
            print(f"  round {rnd + 1} {b or 'installed'}: decode {row['decode']:.1f} tok/s, "
                  f"{row['us_per_miss']:.2f} us per miss ({row['misses']} misses)", flush=True)
    first = None
    for b in builds:
        us = statistics.median(r["us_per_miss"] for r in res[b])
        first = first or us
        print(f"{b or 'installed'}: {statistics.median(r['decode'] for r in res[b]):.1f} tok/s, "
              f"{us:.2f} us per miss (median of {len(res[b])}, x{us / first:.3f})")
    print(json.dumps({b or "installed": statistics.median(r["us_per_miss"] for r in res[b]) for b in builds}))


if __name__ == "__main__":
    main()
