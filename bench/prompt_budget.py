"""A long prompt under a tight memory budget against the same prompt in RAM, next to the disk (issue 19).

    python bench/prompt_budget.py [--prompt 2048] [--share 0.25] [--tokens 16] [--preset qwen3.5-35b-a3b]
                                  [--layers 8] [--dir DIR] [--repeat 2]

The model is bench/decode.py's (the preset's real per-layer shapes, 4-bit, --layers deep). Each setting
runs in a fresh process started with a cold page cache (root), inside a memory cgroup of budget + the
interpreter's footprint + 32 MiB where a cgroup v1 memory controller is writable (as bench/decode.py), so
the page cache cannot hold the model for the engine. One prompt of --prompt random ids, then --tokens
greedy tokens. Settings:
  - in RAM: no budget; the prompt once cold (it reads every expert it uses), then again with everything
    cached: the second is THE in-RAM prompt speed;
  - a budget of --share of the model at the default chunk (the engine picks it) and at chunks of 64 and
    512, cold: the first prompt of a fresh process.
Printed per setting: chunk, prompt tok/s, its ratio to the in-RAM speed, GB read during the prompt, GB of
the distinct experts the prompt used, their ratio (read amplification, 1.0 = each read once), and whether
the prompt's last logits and the greedy tokens are bit-identical to the in-RAM run's. The CEILING, measured in
the same run (bench/ceilings.py: 8 threads of O_DIRECT reads of whole expert blobs at random, median of
samples before and after): the disk's GB/s, and the prompt tok/s if reading the distinct experts once at
that speed were all it took. Goal: tight-budget tok/s >= 0.8x in-RAM, or the disk ceiling if lower.
With --repeat N every setting runs N times, interleaved, and medians are printed. A JSON line at the end.
"""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cgroup_join import join_cgroup

    join_cgroup(sys.argv)

import argparse  # noqa: E402
import hashlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flashmoe.reader import model_bytes  # noqa: E402
from decode import BENCH_DIR, CGROUP_SLACK, _run_self, memory_cgroup_dir, model_path, read_ceiling, \
    run_child  # noqa: E402


def child(spec: dict) -> None:
    import numpy as np

    import flashmoe

    if spec.get("baseline"):
        from decode import _proc_status
        print(json.dumps({"rss": _proc_status("VmRSS")}))
        return
    opts = {"context_length": spec["prompt"] + spec["tokens"] + 8}
    if spec["budget"]:
        opts["memory_budget"] = spec["budget"]
    if spec["chunk"]:
        opts["prefill_chunk"] = spec["chunk"]
    m = flashmoe.load(spec["path"], **opts)
    ids = np.random.default_rng(0).integers(0, spec["vocab"], spec["prompt"])
    runs = []
    for _ in range(2 if spec["warm"] else 1):  # in RAM: the second run has every expert cached
        m.reset_stats()
        t0 = time.perf_counter()
        logits = m.forward(ids, all_logits=False)  # [1, V]: a prompt's all would be GBs
        wall = time.perf_counter() - t0
        s = m.stats
        runs.append({"tps": spec["prompt"] / wall, "bytes_read": s["bytes_read"],
                     "distinct": s["distinct_expert_bytes"], "io_wait": s["io_wait_seconds"], "wall": wall})
    tokens = m.generate_tokens(ids, spec["tokens"], stop_token_ids=[])
    print(json.dumps({"chunk": m.prefill_chunk, "cold": runs[0], "warm": runs[-1],
                      "logits": hashlib.sha256(np.ascontiguousarray(logits).tobytes()).hexdigest(),
                      "tokens": tokens, "memory": m.memory}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--share", type=float, default=0.25, help="the tight budget, a share of the model's size")
    ap.add_argument("--tokens", type=int, default=16, help="greedy tokens after the prompt")
    ap.add_argument("--preset", default="qwen3.5-35b-a3b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dir", default=BENCH_DIR)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    path, header = model_path(args)
    size = model_bytes(header)
    budget = int(size * args.share)
    cgroup = memory_cgroup_dir()
    interp = json.loads(_run_self({"baseline": 1}, __file__).stdout.splitlines()[-1])["rss"] if cgroup else 0
    settings = [("in RAM", 0, 0, True)] + [(f"budget {args.share:g}", budget, c, False) for c in (0, 64, 512)]
    base = {"path": path, "prompt": args.prompt, "tokens": args.tokens, "vocab": header["config"]["vocab_size"]}
    print(f"{path}: {size / 1e9:.2f} GB, {args.prompt}-token prompt, {args.tokens} greedy tokens; budget "
          f"{budget / 1e9:.2f} GB; cgroup limit {'budget + %.0f MiB' % ((interp + CGROUP_SLACK) / 2**20) if cgroup else 'none'}")
    ceil = [read_ceiling(path, header, seed=i) for i in range(2)]
    results = {name + str(c): [] for name, _, c, _ in settings}
    for _ in range(args.repeat):
        for name, b, chunk, warm in settings:
            limit = b + interp + CGROUP_SLACK if cgroup and b else None
            r = run_child({**base, "budget": b, "chunk": chunk, "warm": warm}, cgroup if limit else None, limit,
                          __file__)
            if "error" in r:
                sys.exit(f"{name}, chunk {chunk}: {r['error']}: {r.get('message')}")
            results[name + str(chunk)].append(r)
    ceil += [read_ceiling(path, header, seed=2 + i) for i in range(2)]
    gbps = statistics.median(ceil)
    ram = results["in RAM0"]
    ram_tps = statistics.median(r["warm"]["tps"] for r in ram)
    distinct = statistics.median(r["cold"]["distinct"] for r in ram)
    ceiling_tps = args.prompt / (distinct / (gbps * 1e9))
    print(f"disk ceiling {gbps:.2f} GB/s (samples {', '.join(f'{c:.2f}' for c in ceil)}): the distinct experts "
          f"({distinct / 1e9:.2f} GB) once at that speed = {ceiling_tps:.0f} tok/s")
    print(f"{'setting':>14} {'chunk':>6} {'prompt tok/s':>13} {'x in RAM':>9} {'x ceiling':>10} {'read GB':>8} "
          f"{'distinct GB':>12} {'read/dist':>10} {'io wait s':>10} {'bits':>8}")
    rows = []
    for name, _, chunk, warm in settings:
        rs = results[name + str(chunk)]
        key = "warm" if warm else "cold"
        tps = statistics.median(r[key]["tps"] for r in rs)
        read = statistics.median(r[key]["bytes_read"] for r in rs)
        dist = statistics.median(r["cold"]["distinct"] for r in rs)
        same = all(r["logits"] == ram[0]["logits"] and r["tokens"] == ram[0]["tokens"] for r in rs)
        print(f"{name + (' (warm)' if warm else ' (cold)'):>14} {rs[0]['chunk']:>6} {tps:>13.1f} "
              f"{tps / ram_tps:>9.2f} {tps / ceiling_tps:>10.2f} {read / 1e9:>8.2f} {dist / 1e9:>12.2f} "
              f"{(read / dist if dist else 0):>10.2f} {statistics.median(r[key]['io_wait'] for r in rs):>10.2f} "
              f"{'same' if same else 'DIFFER':>8}", flush=True)
        rows.append({"setting": name, "chunk": rs[0]["chunk"], "tps": tps, "x_ram": tps / ram_tps,
                     "bytes_read": read, "distinct": dist, "same": same, "runs": [r[key] for r in rs]})
    if ram[0]["cold"]["tps"]:
        print(f"(in RAM, first prompt from a cold disk: {statistics.median(r['cold']['tps'] for r in ram):.1f} tok/s)")
    print(json.dumps({"disk_gbps": gbps, "ceiling_tps": ceiling_tps, "ram_tps": ram_tps, "rows": rows}))


if __name__ == "__main__":
    main()
