"""Where a CUDA decode step's time goes: the kernels and copies each step launches, their GPU time, and the
step's wall time, from CUPTI through torch.profiler (it records every CUDA call of the process, flashmoe's too).

    python bench/cuda_profile.py [--preset qwen3.5-35b-a3b] [--layers 8] [--tokens 16] [--gpu-budget B] [--prompt N]

The model is bench/cuda.py's (bench/decode.py's model_path). The step is generate_tokens' loop (all in C,
greedy), after a --warm prompt that fills the expert tiers, a 16-token prompt and 8 untimed steps. GPU busy below wall: the step waits on the host
(launches, the router's top-k coming back each MoE layer, Python), not on the GPU.

Launched with programmatic dependent launch (the default on sm_90), a kernel's blocks start while the kernel
before it still runs and wait for it (griddepcontrol.wait): its time here includes that wait, and the kernels'
times add up to more than the wall. Each kernel's own time: FLASHMOE_CUDA_PDL=0 (then the gaps are back).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import BENCH_DIR, model_path  # noqa: E402  (bench/decode.py)
from flashmoe.model import parse_size  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3.5-35b-a3b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--gpu-budget")
    ap.add_argument("--warm", type=int, default=2048,
                    help="an untimed prompt of this many tokens first: it fills the tiers (0: profile the cold start)")
    ap.add_argument("--prompt", type=int, default=0,
                    help="profile a prompt of this many tokens (one forward) instead of decode steps")
    ap.add_argument("--dir", default=BENCH_DIR)
    args = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    import flashmoe

    path, header = model_path(args)
    opts = {"backend": "cuda", "context_length": 4096}
    if args.gpu_budget:
        opts["gpu_memory_budget"] = parse_size(args.gpu_budget)
    m = flashmoe.load(path, **opts)
    V = header["config"]["vocab_size"]
    ids = np.random.default_rng(0).integers(0, V, 16).tolist()
    torch.cuda.init()
    if args.warm:
        m.forward(np.random.default_rng(1).integers(0, V, args.warm).tolist(), all_logits=False)
    if args.prompt:  # per token of the prompt below
        prompt = np.random.default_rng(2).integers(0, V, args.prompt).tolist()
        m.forward(prompt, all_logits=False)
        t = time.perf_counter()
        m.forward(prompt, all_logits=False)
        wall = (time.perf_counter() - t) / args.prompt
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            m.forward(prompt, all_logits=False)
    else:
        last = m.generate_tokens(ids, 8, stop_token_ids=[])[-1]
        s0 = m.stats
        t = time.perf_counter()
        m.generate_tokens([last], args.tokens, stop_token_ids=[], reset=False)
        wall = (time.perf_counter() - t) / args.tokens
        s1 = m.stats
        per = {k: (s1[k] - s0[k]) / args.tokens * 1e3 for k in ("device_launch_seconds", "device_wait_seconds")}
        print(f"unprofiled, ms a token: wall {wall * 1e3:.3f}, of it launching the replayed step "
              f"{per['device_launch_seconds']:.3f}, blocked on the GPU (syncs, the logits copy) {per['device_wait_seconds']:.3f}, the rest "
              f"(the host's own work: sampling, the core) {wall * 1e3 - sum(per.values()):.3f}")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            m.generate_tokens([last], args.tokens, stop_token_ids=[], reset=False)
    spans = []  # the device's kernels and copies, (start, end) in us: the GPU's idle time between them
    h2d = []  # the host-to-device copies: the link's busy and idle time
    kern = collections.defaultdict(lambda: [0, 0.0])
    runtime = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        dev = getattr(e, "device_type", None)
        if dev is not None and "CUDA" in str(dev):
            k = kern[e.name[:150]]
            k[0] += 1
            k[1] += e.time_range.elapsed_us()
            spans.append((e.time_range.start, e.time_range.end))
            if "HtoD" in e.name:
                h2d.append((e.time_range.start, e.time_range.end))
        elif e.name.startswith("cuda"):
            r = runtime[e.name]
            r[0] += 1
            r[1] += e.cpu_time_total
    n = args.prompt or args.tokens
    busy = sum(v[1] for v in kern.values()) / n
    st = m.stats
    print(f"VRAM tier: {st['device_expert_slots']} slots; whole run: {st['device_expert_hits']} hits, "
          f"{st['device_expert_misses']} misses, {st['device_bytes_in'] / 1e9:.2f} GB in")
    print(f"{path}: wall {wall * 1e3:.3f} ms/token unprofiled; GPU busy {busy / 1e3:.3f} ms/token "
          f"({busy / (wall * 1e6):.2f} of the wall), {sum(v[0] for v in kern.values()) / n:.0f} kernels and "
          f"copies per token")
    spans.sort()
    gaps = [b[0] - a[1] for a, b in zip(spans, spans[1:])]
    small = [g for g in gaps if 0 < g < 50]
    print(f"GPU idle between consecutive kernels/copies, per token: {sum(small) / n:.1f} us in {len(small) / n:.0f} "
          f"gaps under 50 us (median {np.median(small) if small else 0:.2f} us), "
          f"{sum(g for g in gaps if g >= 50) / n:.1f} us in longer ones (the host's turn)")
    if h2d:  # copies on one stream run one after another: the link idles between them
        h2d.sort()
        idle = [b[0] - a[1] for a, b in zip(h2d, h2d[1:]) if b[0] > a[1]]
        print(f"host-to-device copies per token: {len(h2d) / n:.1f}, busy {sum(b - a for a, b in h2d) / n:.1f} us, "
              f"the link idle between them {sum(idle) / n:.1f} us ({sum(g >= 50 for g in idle) / n:.1f} gaps of 50 us "
              f"or more: {sum(g for g in idle if g >= 50) / n:.1f} us)")
    print("per token: count, GPU us, name")
    for name, (c, us) in sorted(kern.items(), key=lambda kv: -kv[1][1])[:40]:
        print(f"  {c / n:7.1f} {us / n:9.1f}  {name}")
    print("CUDA runtime calls per token: count, host us")
    for name, (c, us) in sorted(runtime.items(), key=lambda kv: -kv[1][1])[:15]:
        print(f"  {c / n:7.1f} {us / n:9.1f}  {name}")


if __name__ == "__main__":
    main()
