"""Prompt (prefill) speed with everything in RAM, and builds side by side.

    python bench/prefill.py [--prompt 1024] [--chunk N] [--runs 3] [--rounds 3] [--decode 0]
                            [--pkg DIR ...] [--preset qwen3.5-35b-a3b] [--layers 8] [--threads 2] [--dir DIR]
                            [--budget-share 0.25] [--fp32-activations]

The model is the one bench/decode.py and bench/compare_llamacpp.py use (the preset's real per-layer
shapes, 4-bit, --layers deep), written once under --dir. Each round starts one fresh process per build;
it loads the model, reads one warm-up prompt (the experts then sit in the expert store), then times
--runs prompts of --prompt random token ids (prefill chunks of --chunk, by default the whole prompt in
one), and with --decode N also N greedy decode steps after each. A build is a directory holding a
`flashmoe` package (--pkg, repeatable: e.g. one built from an older commit; by default the installed
one). --budget-share loads under a memory budget of that share of the model (the experts then stream from
disk). The builds take turns round by round, because this machine's speed drifts by 10-40% from one
minute to the next; printed: every run, then per build the median over all rounds and the ratio to the
first build.
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

    opts = {"memory_budget": spec["budget"]} if spec.get("budget") else {}
    m = flashmoe.load(spec["path"], context_length=spec["context"], prefill_chunk=spec["chunk"],
                      threads=spec["threads"], int8_activations=not spec.get("fp32_act"), **opts)
    n = spec["prompt"]
    ids = np.random.default_rng(0).integers(0, spec["vocab"], n * (spec["runs"] + 1))
    m.generate_tokens(ids[:n], max_tokens=1, stop_token_ids=[])  # warm-up: experts in the store
    out = []
    for r in range(spec["runs"]):
        m.reset()
        m.reset_stats()
        m.generate_tokens(ids[(r + 1) * n:(r + 2) * n], max_tokens=max(1, spec["decode"]), stop_token_ids=[])
        s = m.stats
        row = {"prompt": s["last_prompt_tokens"] / s["last_prompt_seconds"]}
        if spec["decode"] > 1:
            row["decode"] = s["last_generated_tokens"] / s["last_decode_seconds"]
        out.append(row)
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=1024, help="tokens per prompt")
    ap.add_argument("--chunk", type=int, default=0, help="prefill chunk (default: the whole prompt)")
    ap.add_argument("--runs", type=int, default=3, help="timed prompts per process")
    ap.add_argument("--rounds", type=int, default=3, help="processes per build, taking turns")
    ap.add_argument("--decode", type=int, default=0, help="greedy decode steps after each prompt")
    ap.add_argument("--pkg", action="append", default=[], help="a directory holding a flashmoe package")
    ap.add_argument("--preset", default="qwen3.5-35b-a3b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-share", type=float, default=0.0,
                    help="memory budget as a share of the model's size (e.g. 0.25; default: everything in RAM)")
    ap.add_argument("--fp32-activations", action="store_true", help="int8_activations=False (default: int8)")
    ap.add_argument("--dir", default=BENCH_DIR)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    path, header = model_path(args)
    spec = {"path": path, "prompt": args.prompt, "chunk": args.chunk or args.prompt, "runs": args.runs,
            "decode": args.decode, "threads": args.threads, "vocab": header["config"]["vocab_size"],
            "context": args.prompt + max(args.decode, 1) + 16, "fp32_act": args.fp32_activations}
    if args.budget_share:
        size = model_bytes(header)
        spec["budget"] = int(size * args.budget_share)
    builds = args.pkg or [""]
    print(f"{path}: prompts of {args.prompt} tokens in chunks of {spec['chunk']}, {args.threads} threads, "
          f"{args.runs} per process, {args.rounds} rounds", flush=True)
    res: dict[str, list] = {b: [] for b in builds}
    for rnd in range(args.rounds):
        for b in builds:
            rows = run_script(__file__, spec, b)
            res[b] += rows
            print(f"  round {rnd + 1} {b or 'installed'}: prompt tok/s "
                  + " ".join(f"{r['prompt']:.1f}" for r in rows)
                  + ("; decode tok/s " + " ".join(f"{r['decode']:.1f}" for r in rows) if args.decode > 1 else ""),
                  flush=True)
    first = first_dec = None
    for b in builds:
        med = statistics.median(r["prompt"] for r in res[b])
        first = first or med
        line = f"{b or 'installed'}: prompt {med:.1f} tok/s (median of {len(res[b])}, x{med / first:.3f})"
        if args.decode > 1:
            dec = statistics.median(r["decode"] for r in res[b])
            first_dec = first_dec or dec
            line += f", decode {dec:.1f} tok/s (x{dec / first_dec:.3f})"
        print(line)


if __name__ == "__main__":
    main()
