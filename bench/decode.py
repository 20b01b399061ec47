"""Decode speed with the routed experts streamed from disk under a hard memory budget, next to the disk.

    python bench/decode.py [--preset qwen3.5-35b-a3b] [--layers N] [--budget 1.5GB] [--tokens 32]
                           [--prompt 64] [--policy lfru] [--no-prefetch] [--no-sweep] [--quick] [--dir DIR]

The model is a random one of the preset's real per-layer shapes (flashmoe.synth), truncated in depth so
that it is at least 4x the budget (unless --layers says otherwise); it is written once under --dir and
reused. Every run is a fresh process, started with a cold page cache (sync; drop_caches) and, where a
cgroup v1 memory controller is writable (root), inside a memory limit of budget + what the bare
interpreter occupies + 32 MiB, so the OS page cache cannot quietly hold the model. The prompt (random
ids, --prompt tokens) warms the expert cache; then --tokens tokens are decoded and measured.

Printed, for the main run (--policy, --budget):
  - decode tokens/s (wall clock of the decode), expert hit rate, misses per token;
  - cold expert bytes per token: (misses + hits on prefetched slots) x blob size, what the disk had to
    deliver for the experts used; bytes read per token (also counts prefetches never used);
  - I/O wait share: io_wait_seconds / wall (compute blocked on reads), disk busy share;
  - routing per layer from Model.expert_usage(): distinct experts touched and the entropy of the usage
    counts, next to what uniform routing gives: N tokens each picking k of E experts at random touch
    E * (1 - (1 - k/E)^N) distinct experts on average, and the usage entropy tends to log2(E) bits as
    N grows (its expected value at this N is simulated and printed);
  - the CEILING, measured in the same run (median of two samples before and two after): 8 threads of
    O_DIRECT reads of whole expert blobs at random (layer, expert) offsets of the same files, in GB/s;
    ceiling tokens/s = ceiling GB/s / cold expert bytes per token, and the ratio decode tokens/s /
    ceiling tokens/s (goal >= 0.85). Compute alone, tokens / (compute_seconds - io_wait_seconds), is
    printed too, and the ratio to the lower of the two bounds;
  - then a sweep: budget 10%, 25%, 50%, 100% of the model's size x policy lru, lfru, pagecache: tokens/s
    and hit rate (a budget below the engine's minimum is reported as such).

Random routers route nearly uniformly: the worst case for any expert cache (real routers reuse experts).
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
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from flashmoe import presets  # noqa: E402
from flashmoe.model import parse_size  # noqa: E402
from flashmoe.reader import model_bytes, read_header  # noqa: E402
from flashmoe.synth import write_random_model  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ceilings import disk_read_gbps  # noqa: E402  (bench/ceilings.py)

POLICIES = ("lru", "lfru", "pagecache")
SWEEP_FRACTIONS = (0.10, 0.25, 0.50, 1.00)
CGROUP_SLACK = 32 << 20
UNIFORM_NOTE = ("random routers route nearly uniformly: the worst case for any expert cache "
                "(a cache of a fraction f of the experts hits ~f of the time)")


# ------------------------------------------------------------------------------------ the environment

def drop_page_cache() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def memory_cgroup_dir() -> str | None:
    """The directory of this process's cgroup v1 memory cgroup, if it is mounted and writable."""
    try:
        rel = next(ln.split(":", 2)[2] for ln in open("/proc/self/cgroup").read().splitlines()
                   if "memory" in ln.split(":", 2)[1].split(","))
        for ln in open("/proc/self/mountinfo").read().splitlines():
            left, _, right = ln.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(rfields) >= 3 and rfields[0] == "cgroup" and "memory" in rfields[2].split(","):
                root, mnt = fields[3], fields[4]
                if root == "/" or rel == root or rel.startswith(root + "/"):
                    path = os.path.join(mnt, os.path.relpath(rel, root) if root != "/" else rel.lstrip("/"))
                    path = os.path.normpath(path)
                    if os.access(os.path.join(path, "memory.limit_in_bytes"), os.W_OK):
                        return path
    except (OSError, StopIteration):
        pass
    return None


BENCH_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "flashmoe-bench")  # where the benchmark models live


def model_path(args) -> tuple[str, dict]:
    """The benchmark model: written once under args.dir, reused after."""
    cfg = presets.truncate(args.preset, args.layers)
    path = os.path.join(args.dir, f"{args.preset}-{args.layers}L-4bit")
    if not os.path.exists(os.path.join(path, "flashmoe.json")):
        need = presets.model_bytes(cfg)["total"]
        os.makedirs(args.dir, exist_ok=True)
        free = shutil.disk_usage(args.dir).free
        if need > free - (2 << 30):
            sys.exit(f"{path} needs {need / 1e9:.1f} GB, {args.dir} has {free / 1e9:.1f} GB free: "
                     f"use --layers or --dir")
        print(f"writing {path} ({need / 1e9:.2f} GB) ...", flush=True)
        t0 = time.perf_counter()
        write_random_model(path, cfg, bits=4, progress=sys.stderr.isatty())
        print(f"  {time.perf_counter() - t0:.1f} s", flush=True)
    return path, read_header(path)


def auto_layers(preset: str, budget: int) -> int:
    """The fewest layers (at least 4) that make the model >= 4x the budget."""
    n_max = presets.get(preset)["num_hidden_layers"]
    for n in range(4, n_max + 1):
        if presets.model_bytes(presets.truncate(preset, n))["total"] >= 4 * budget:
            return n
    return n_max


# ------------------------------------------------------------------------------------ the disk ceiling

def read_ceiling(path: str, header: dict, threads: int = 8, seconds: float = 3.0, seed: int = 0) -> float:
    """GB/s of `threads` threads reading whole expert blobs with O_DIRECT at random (layer, expert)."""
    return disk_read_gbps(path, header, threads, seconds, seed)[0]


# ------------------------------------------------------------------------------------ one measured run

def child_main(spec: dict) -> None:
    """Runs in a fresh process (in its cgroup already): load, warm with the prompt, decode, print JSON."""
    import flashmoe
    from flashmoe import _core  # noqa: F401  (the extension: part of the interpreter's footprint)
    from flashmoe.errors import MemoryBudgetError

    if spec.get("baseline"):  # only the imports: what the limit must allow besides the budget
        print(json.dumps({"rss": _proc_status("VmRSS")}))
        return
    try:
        model = flashmoe.load(spec["path"], memory_budget=spec["budget"], cache_policy=spec["policy"],
                              prefetch=spec["prefetch"], context_length=spec["context"])
    except MemoryBudgetError as exc:
        print(json.dumps({"error": "below minimum", "message": str(exc)}))
        return
    cfg = model.config
    prompt = np.random.default_rng(spec["seed"]).integers(0, cfg["vocab_size"], spec["prompt"])
    model.generate_tokens(prompt[:-1], max_tokens=1, stop_token_ids=[])  # prefill; fills the expert cache
    model.reset_stats()
    t0 = time.perf_counter()
    model.generate_tokens(prompt[-1:], max_tokens=spec["tokens"], temperature=1.0, seed=spec["seed"],
                   stop_token_ids=[], reset=False)
    wall = time.perf_counter() - t0
    stats = model.stats
    print(json.dumps({"wall": wall, "stats": {k: v for k, v in stats.items() if k != "last"},
                      "usage": model.expert_usage().tolist(), "memory": model.memory,
                      "peak_rss": _proc_status("VmHWM")}))


def _proc_status(key: str) -> int:
    """A /proc/self/status memory line in bytes (VmHWM is this process's peak RSS; getrusage's
    ru_maxrss would carry the parent's peak across fork and exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def run_child(spec: dict, cgroup_parent: str | None, limit: int | None, script: str = __file__) -> dict:
    """One run of `script --child SPEC` (this one by default) in a fresh process with a cold page cache,
    inside a memory cgroup when there is one: its last line of stdout, as JSON."""
    cold = drop_page_cache()
    cg = None
    if cgroup_parent and limit:
        cg = os.path.join(cgroup_parent, f"flashmoe-bench-{os.getpid()}-{time.monotonic_ns()}")
        os.mkdir(cg)
        with open(os.path.join(cg, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit))
    try:
        proc = _run_self(dict(spec, cgroup=cg), script)
    finally:
        if cg:
            try:
                os.rmdir(cg)
            except OSError:
                pass
    if proc.returncode != 0:
        what = "killed (OOM at the cgroup limit)" if proc.returncode == -9 else f"exit {proc.returncode}"
        return {"error": what, "message": (proc.stderr.strip().splitlines() or [""])[-1]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out.update(cold_page_cache=cold, cgroup_limit=limit if cg else None)
    return out


def run_script(script: str, spec: dict, pkg: str = "") -> dict:
    """Run `python script --child SPEC` in a fresh process, with the flashmoe package of directory pkg
    first on the path (an older build, side by side; "" for the installed one): its last line of stdout,
    read as JSON. Exits with the child's stderr when it fails."""
    env = dict(os.environ)
    if pkg:
        env["PYTHONPATH"] = os.path.abspath(pkg) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, os.path.abspath(script), "--child", json.dumps(spec)], env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{pkg or 'installed'}: the run failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _run_self(spec: dict, script: str = __file__) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.abspath(script), "--child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=3600)


# ------------------------------------------------------------------------------------ what it means

def uniform_reference(n_experts: int, k: int, n_tokens: int, trials: int = 200, seed: int = 0):
    """Expected distinct experts and usage entropy (bits) per layer when each token picks k of E at random."""
    distinct = n_experts * (1 - (1 - k / n_experts) ** n_tokens)
    rng = np.random.default_rng(seed)
    picks = np.argsort(rng.random((trials, n_tokens, n_experts)), axis=2)[:, :, :k].reshape(trials, -1)
    counts = np.stack([np.bincount(p, minlength=n_experts) for p in picks])
    return distinct, float(np.mean(_entropy(counts)))


def _entropy(counts) -> np.ndarray:
    p = counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1)
    return -np.sum(p * np.log2(np.where(p > 0, p, 1)), axis=-1)


def summarize(run: dict, header: dict) -> dict:
    """The numbers of one run, per decode token."""
    s, blob = run["stats"], header["experts"]["blob_size"]
    n = max(1, s["tokens"])
    usage = np.asarray(run["usage"])
    moe = usage[usage.sum(axis=1) > 0]
    compute_only = s["compute_seconds"] - s["io_wait_seconds"]  # compute_seconds is the forward's wall time
    return {
        "tok_s": s["tokens"] / run["wall"], "tokens": s["tokens"], "hit_rate": s["hit_rate"],
        "misses_per_token": s["expert_misses"] / n,
        "cold_bytes_per_token": (s["expert_misses"] + s["prefetch_hits"]) * blob / n,
        "read_bytes_per_token": s["bytes_read"] / n, "prefetches": s["prefetches"],
        "prefetch_hits": s["prefetch_hits"], "io_wait_share": s["io_wait_seconds"] / run["wall"],
        "io_busy_share": s["io_busy_seconds"] / run["wall"], "read_gbps": s["read_gbps"],
        "compute_tok_s": s["tokens"] / compute_only if compute_only > 0 else 0.0,
        "distinct_per_layer": (moe > 0).sum(axis=1).tolist(), "entropy_bits": _entropy(moe).round(3).tolist(),
        "direct_io": s["direct_io"], "peak_rss": run["peak_rss"], "memory": run["memory"],
        "cold_page_cache": run["cold_page_cache"], "cgroup_limit": run["cgroup_limit"],
    }


def fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


# ------------------------------------------------------------------------------------ main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="qwen3.5-35b-a3b", choices=presets.NAMES)
    ap.add_argument("--layers", type=int, help="layers of the preset to keep (default: model >= 4x budget)")
    ap.add_argument("--budget", default="1.5GB", help="memory budget of the main run (default 1.5GB)")
    ap.add_argument("--policy", default="lfru", choices=POLICIES, help="cache policy of the main run")
    ap.add_argument("--no-prefetch", dest="prefetch", action="store_false")
    ap.add_argument("--tokens", type=int, default=32, help="decoded tokens per run")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens (they warm the expert cache)")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the budget x policy sweep")
    ap.add_argument("--quick", action="store_true", help="a 120 MB model, few tokens: a smoke test")
    ap.add_argument("--dir", default=BENCH_DIR)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return
    if args.quick:
        args.preset, args.tokens, args.prompt = "small", 8, 16
        args.budget = str(presets.model_bytes(presets.get("small"))["total"] // 4)
    budget = parse_size(args.budget)
    args.layers = args.layers or auto_layers(args.preset, budget)
    path, header = model_path(args)
    size = model_bytes(header)
    bench = Bench(path, header, size, args)

    # The disk swings run to run: two ceiling samples before the main run and two after, their median.
    ceiling = [read_ceiling(path, header, seed=i) for i in (0, 1)]
    run = bench.run(budget, args.policy)
    ceiling += [read_ceiling(path, header, seed=i) for i in (2, 3)]
    print_setup(header, size, budget, args, bench.limit(budget))
    result = {"preset": args.preset, "layers": args.layers, "model_bytes": size, "budget": budget,
              "policy": args.policy, "prefetch": args.prefetch, "tokens": args.tokens, "prompt": args.prompt,
              "ceiling_gbps": [round(c, 3) for c in ceiling], "main": run,
              "machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    if "error" in run:
        print(f"main run: {run['error']}: {run.get('message')}")
    else:
        m = result["main"] = summarize(run, header)
        result.update(print_main(m, float(np.median(ceiling)), ceiling, header["config"], args.tokens))
    if args.sweep:
        result["sweep"] = sweep(bench, size, header)
    print(json.dumps(result))


class Bench:
    """Runs of one model: each a fresh process with a cold page cache, inside a memory cgroup of
    budget + the interpreter's own footprint (measured once) + 32 MiB when a cgroup v1 is writable."""

    def __init__(self, path: str, header: dict, size: int, args):
        self.cgroup = memory_cgroup_dir()
        self.interp = 0
        if self.cgroup:
            self.interp = json.loads(_run_self({"baseline": 1}).stdout.splitlines()[-1])["rss"]
        context = -(-(args.prompt + args.tokens + 1) // 256) * 256
        self.spec = {"path": path, "prompt": args.prompt, "tokens": args.tokens, "seed": 0,
                     "prefetch": args.prefetch, "context": context}

    def limit(self, budget: int) -> int | None:
        return budget + self.interp + CGROUP_SLACK if self.cgroup else None

    def run(self, budget: int, policy: str) -> dict:
        return run_child(dict(self.spec, budget=budget, policy=policy), self.cgroup, self.limit(budget))


def print_setup(header: dict, size: int, budget: int, args, limit) -> None:
    cfg, ex = header["config"], header["experts"]
    n, n_full = cfg["num_hidden_layers"], cfg["layer_types"].count("full_attention")
    print(f"\nmodel: random {args.preset}, {n} layers ({n - n_full} DeltaNet + {n_full} attention), 4-bit, "
          f"{fmt_bytes(size)} (dense {fmt_bytes(header['dense']['size'])}, "
          f"{len(ex['layers']) * cfg['num_experts']} experts of {fmt_bytes(ex['blob_size'])})")
    print(f"budget {fmt_bytes(budget)} = {budget / size:.0%} of the model; policy {args.policy}, prefetch "
          f"{'on' if args.prefetch else 'off'}; {args.prompt}-token prompt, {args.tokens} decoded tokens; "
          f"cgroup limit {fmt_bytes(limit) if limit else 'none (no writable cgroup v1 memory controller)'}")


def print_main(m: dict, ceil: float, ceiling: list, cfg: dict, n_tokens: int) -> dict:
    k, n_exp = cfg["num_experts_per_tok"], cfg["num_experts"]
    print(f"decode: {m['tok_s']:.2f} tok/s (compute alone, I/O wait taken out: {m['compute_tok_s']:.2f})")
    print(f"experts: hit rate {m['hit_rate']:.3f}, {m['misses_per_token']:.1f} misses/token of "
          f"{k * len(m['distinct_per_layer'])} routed; cold {fmt_bytes(m['cold_bytes_per_token'])}/token, "
          f"read {fmt_bytes(m['read_bytes_per_token'])}/token ({m['prefetches']} prefetches, "
          f"{m['prefetch_hits']} used)")
    print(f"time: I/O wait {m['io_wait_share']:.0%} of wall, disk busy {m['io_busy_share']:.0%}, "
          f"{m['read_gbps']:.2f} GB/s while busy; O_DIRECT {'on' if m['direct_io'] else 'off'}; "
          f"page cache {'cold' if m['cold_page_cache'] else 'NOT dropped (not root?)'}")
    mem = m["memory"]
    print(f"memory: budget {fmt_bytes(mem['budget'])} = dense {fmt_bytes(mem['dense_bytes'])} + KV "
          f"{fmt_bytes(mem['kv_bytes'])} + state {fmt_bytes(mem['state_bytes'])} + scratch "
          f"{fmt_bytes(mem['scratch_bytes'])} + expert cache {fmt_bytes(mem['expert_cache_bytes'])} "
          f"({mem['expert_slots']} of {mem['experts_total']} experts); peak RSS {fmt_bytes(m['peak_rss'])}")
    out = {}
    if m["cold_bytes_per_token"]:
        ceil_tps = ceil * 1e9 / m["cold_bytes_per_token"]
        out = {"ceiling_tok_s": ceil_tps, "ratio": m["tok_s"] / ceil_tps,
               "ratio_to_bound": m["tok_s"] / min(ceil_tps, m["compute_tok_s"] or ceil_tps)}
        samples = ", ".join(f"{c:.2f}" for c in ceiling)
        print(f"ceiling: O_DIRECT, 8 threads, random whole blobs: {ceil:.2f} GB/s (median of {samples}; two "
              f"before the run, two after) = {ceil_tps:.2f} tok/s at the cold bytes/token")
        print(f"ratio: decode tok/s / ceiling tok/s = {out['ratio']:.3f} (goal >= 0.85); "
              f"to min(ceiling, compute alone) = {out['ratio_to_bound']:.3f}")
    distinct, entropy = uniform_reference(n_exp, k, n_tokens)
    d, h = np.array(m["distinct_per_layer"]), np.array(m["entropy_bits"])
    print(f"routing over {n_tokens} tokens, per layer: distinct experts {d.mean():.1f} (min {d.min()}, max "
          f"{d.max()}) vs uniform E(1-(1-k/E)^N) = {distinct:.1f}; usage entropy {h.mean():.2f} bits (min "
          f"{h.min():.2f}) vs uniform {entropy:.2f} at this N, log2 E = {math.log2(n_exp):.2f} as N grows")
    print(f"note: {UNIFORM_NOTE}")
    return {**out, "uniform_distinct": distinct, "uniform_entropy_bits": entropy}


def sweep(bench: Bench, size: int, header: dict) -> list:
    print(f"\nsweep, {bench.spec['tokens']} decoded tokens per run. Note: {UNIFORM_NOTE}. pagecache keeps no "
          f"engine cache: its hits happen in the OS page cache (counted as misses here), which gets what the "
          f"cgroup limit leaves")
    print(f"{'budget':>9} {'of model':>8} {'policy':>9} {'tok/s':>7} {'hit rate':>8} {'cold/tok':>9} "
          f"{'I/O wait':>8} {'peak RSS':>9}")
    rows = []
    for frac in SWEEP_FRACTIONS:
        budget = int(size * frac)
        for policy in POLICIES:
            run = bench.run(budget, policy)
            row = {"budget": budget, "fraction": frac, "policy": policy}
            lead = f"{fmt_bytes(budget):>9} {frac:>8.0%} {policy:>9}"
            if "error" in run:
                row["error"] = run["error"]
                print(f"{lead}  {run['error']}: {run.get('message')}")
            else:
                m = summarize(run, header)
                row.update({k: m[k] for k in ("tok_s", "hit_rate", "cold_bytes_per_token", "io_wait_share",
                                              "peak_rss")})
                cold = fmt_bytes(m["cold_bytes_per_token"])
                print(f"{lead} {m['tok_s']:>7.2f} {m['hit_rate']:>8.3f} {cold:>9} {m['io_wait_share']:>8.0%} "
                      f"{fmt_bytes(m['peak_rss']):>9}")
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
