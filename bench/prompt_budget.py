"""A prompt under a tight memory budget: disk bytes read against the distinct experts it needs, and whether
the output depends on the budget or the prefill chunk (issue 19's two findings, measured).

    python bench/prompt_budget.py [--prompt 512] [--share 0.25] [--tokens 16] [--preset qwen3.5-35b-a3b]
                                  [--layers 8] [--dir DIR]

The model is bench/decode.py's (the preset's real per-layer shapes, 4-bit, --layers deep). Each setting
runs in a fresh process after dropping the page cache (root): one prompt of --prompt random ids, then
--tokens greedy tokens. Settings: everything in RAM with the default chunk; in RAM in chunks of 128; a
budget of --share of the model with the default chunk (which the engine picks from the budget) and in
chunks of --prompt. Printed per setting: the chunk, prompt tok/s, bytes read during the prompt, the bytes
of the distinct experts the prompt used (experts with a use in Model.expert_usage() x blob size) and the
ratio of the two (1.0 = every expert read once), and whether the greedy tokens equal the first setting's.
A JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flashmoe.reader import model_bytes  # noqa: E402
from decode import BENCH_DIR, drop_page_cache, model_path, run_script  # noqa: E402


def child(spec: dict) -> None:
    import numpy as np

    import flashmoe

    opts = {"context_length": spec["prompt"] + spec["tokens"] + 8}
    if spec["budget"]:
        opts["memory_budget"] = spec["budget"]
    if spec["chunk"]:
        opts["prefill_chunk"] = spec["chunk"]
    m = flashmoe.load(spec["path"], **opts)
    ids = np.random.default_rng(0).integers(0, spec["vocab"], spec["prompt"])
    m.reset_stats()
    logits = m.forward(ids)
    prompt = m.stats
    used = int((m.expert_usage() > 0).sum())
    toks = [int(np.argmax(logits[-1]))]
    for _ in range(spec["tokens"] - 1):
        toks.append(int(np.argmax(m.forward([toks[-1]], reset=False)[0])))
    print(json.dumps({"chunk": m.prefill_chunk, "tps": prompt["tokens_per_second"],
                      "bytes_read": prompt["bytes_read"], "distinct": used, "tokens": toks}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--share", type=float, default=0.25, help="the tight budget, a share of the model's size")
    ap.add_argument("--tokens", type=int, default=16, help="greedy tokens after the prompt")
    ap.add_argument("--preset", default="qwen3.5-35b-a3b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dir", default=BENCH_DIR)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    path, header = model_path(args)
    size = model_bytes(header)
    blob = header["experts"]["stride"]
    budget = int(size * args.share)
    settings = [("in RAM", 0, 0), ("in RAM, chunks of 128", 0, 128),
                (f"budget {args.share:g} of the model", budget, 0),
                (f"budget {args.share:g}, chunks of {args.prompt}", budget, args.prompt)]
    base = {"path": path, "prompt": args.prompt, "tokens": args.tokens, "vocab": header["config"]["vocab_size"]}
    cold = drop_page_cache()
    print(f"{path}: {size / 1e9:.2f} GB, {args.prompt}-token prompt, {args.tokens} greedy tokens; "
          f"{'cold' if cold else 'warm'} page cache per run")
    print(f"{'setting':>32} {'chunk':>6} {'prompt tok/s':>13} {'read GB':>8} {'distinct GB':>12} {'read/dist':>10} "
          f"{'tokens':>8}")
    rows, first = [], None
    for name, b, chunk in settings:
        drop_page_cache()
        r = run_script(__file__, {**base, "budget": b, "chunk": chunk})
        first = first or r["tokens"]
        distinct = r["distinct"] * blob
        same = "same" if r["tokens"] == first else "DIFFER"
        print(f"{name:>32} {r['chunk']:>6} {r['tps']:>13.1f} {r['bytes_read'] / 1e9:>8.2f} {distinct / 1e9:>12.2f} "
              f"{r['bytes_read'] / distinct:>10.2f} {same:>8}", flush=True)
        rows.append({"setting": name, **r})
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
