"""The CUDA backend's speed in issue 20's settings, each next to its ceiling, measured on this machine.

    python bench/cuda.py --setting hbm    [--preset qwen3.5-35b-a3b] [--layers 8] [--prompts 512,2048]
    python bench/cuda.py --setting pinned [--preset qwen3.5-122b-a10b] [--layers 12] --gpu-budget 4GB
    python bench/cuda.py --setting disk   [--preset ...] [--layers N] --gpu-budget 4GB --budget 8GB
    (--cpu adds the CPU backend on the same model; --torch adds transformers eager, bf16, on the GPU)

A random model of the preset's real per-layer shapes (flashmoe.synth, 4 bits), truncated to --layers, is
written once under --dir (bench/decode.py's model_path: the same models as the CPU benchmarks). Each measurement is a fresh process: load, an untimed --warm prompt that fills the
expert tiers (all of them but the disk setting's), a prompt of each --prompts length (timed), then --tokens
greedy decode steps in generate_tokens' C loop (timed, after a warm-up of 8).

Settings and their ceilings (measured here, in the same run, with torch):
- hbm: everything in GPU memory. Ceiling: the bytes one decode token must read (the dense matrices but the
  embedding, whose one row is read, plus k experts of every MoE layer) over the device-to-device copy
  bandwidth (bytes read + written per second).
- pinned: the experts' host tier holds them all (memory_budget: everything), the VRAM tier what
  --gpu-budget leaves. Ceiling: the VRAM misses' bytes per token over the pinned host→device bandwidth, at
  the measured hit rate (the PCIe roofline), with the HBM time of the token added.
- disk: the host tier too small as well (--budget), cold page cache. Ceiling: the disk's, as
  bench/decode.py measures it (bytes read per token over random O_DIRECT reads of whole blobs).
Random routers pick experts nearly uniformly: the worst case for every cache tier.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flashmoe import presets  # noqa: E402
from flashmoe.model import parse_size  # noqa: E402
from flashmoe.reader import model_bytes  # noqa: E402
from ceilings import disk_read_gbps  # noqa: E402  (bench/ceilings.py)
from decode import BENCH_DIR, drop_page_cache, model_path, run_script  # noqa: E402  (bench/decode.py)


def decode_bytes(header: dict) -> tuple[int, int]:
    """(dense bytes a decode token reads, expert bytes it reads): every dense tensor but the embedding (one
    row), and k blobs per MoE layer."""
    cfg = header["config"]
    dense = 0
    for name, t in header["dense"]["tensors"].items():
        n = t["nbytes"]
        if "group_size" in t:  # fp16 scales and biases, one each per group
            n += 2 * 2 * int(np.prod(t["shape"])) // int(t["group_size"])
        if "embed_tokens" in name:
            n //= int(t["shape"][0])
        dense += n
    k, layers = int(cfg["num_experts_per_tok"]), len(header["experts"]["layers"])
    return dense, k * layers * int(header["experts"]["blob_size"])


def ceilings() -> dict:
    """HBM copy bandwidth (read + write) and pinned host→device bandwidth, GB/s, medians of 5, with torch."""
    import torch

    def timed(fn, n=5):
        out = []
        for _ in range(n + 1):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            out.append(time.perf_counter() - t)
        return statistics.median(out[1:])
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    hbm = 2 * a.numel() / timed(lambda: b.copy_(a)) / 1e9
    h = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    h2d = h.numel() / timed(lambda: a.copy_(h, non_blocking=True)) / 1e9
    del a, b, h
    torch.cuda.empty_cache()
    return {"hbm_gbps": hbm, "h2d_gbps": h2d, "gpu": torch.cuda.get_device_name()}


def child(spec: dict) -> None:
    import flashmoe

    opts = {k: spec[k] for k in ("backend", "memory_budget", "gpu_memory_budget", "context_length", "prefill_chunk",
                                 "threads") if spec.get(k) is not None}
    m = flashmoe.load(spec["path"], **opts)
    rng = np.random.default_rng(0)
    V = spec["vocab"]
    res = {"backend": m.backend, "prompt": {}}
    if spec.get("warm"):  # a prompt that touches (nearly) every expert: the tiers hold what they will hold
        m.forward(rng.integers(0, V, spec["warm"]).tolist(), all_logits=False)
    for n in spec["prompts"]:
        ids = rng.integers(0, V, n).tolist()
        m.forward(ids[:16], all_logits=False)  # warm-up (kernels loaded, scratch grown)
        t = time.perf_counter()
        m.forward(ids, all_logits=False)
        res["prompt"][n] = n / (time.perf_counter() - t)
    ids = rng.integers(0, V, 16).tolist()
    m.forward(ids, all_logits=False)
    # greedy steps in generate_tokens' loop (all in C, as `flashmoe chat` decodes; llama-bench's decode too):
    # a warm-up (the caches fill toward their steady state), then the timed ones
    tok = m.generate_tokens([int(rng.integers(0, V))], 8, stop_token_ids=[], reset=False)[-1]
    m.reset_stats()
    t = time.perf_counter()
    m.generate_tokens([tok], spec["tokens"], stop_token_ids=[], reset=False)
    res["decode"] = spec["tokens"] / (time.perf_counter() - t)
    st = m.stats
    res.update({k: st[k] for k in ("expert_hits", "expert_misses", "bytes_read", "device_expert_slots",
                                   "device_expert_hits", "device_expert_misses", "device_bytes_in",
                                   "device_host_experts")})
    print(json.dumps(res), flush=True)  # the last line: run_script reads it


def run_child(spec: dict, cold: bool) -> dict:
    """child(spec) in a fresh process, after dropping the page cache where cold."""
    if cold:
        drop_page_cache()
    return run_script(__file__, spec)


def torch_eager(preset: str, layers: int, tokens: int) -> float:
    """transformers' model of the same config, random bf16 weights on the GPU, eager: decode tok/s with its
    KV cache (greedy, after a 16-token prompt)."""
    import torch
    import transformers

    cfg = presets.truncate(preset, layers)
    hf = transformers.AutoConfig.for_model(**cfg)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, cfg["vocab_size"], (1, 16), device="cuda")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        torch.cuda.synchronize()
    del model, out
    torch.cuda.empty_cache()
    return tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=("hbm", "pinned", "disk"), default="hbm")
    ap.add_argument("--preset", default="qwen3.5-35b-a3b", choices=presets.NAMES)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompts", default="512,2048", help="prompt lengths (comma list; '' for none)")
    ap.add_argument("--tokens", type=int, default=64, help="timed decode steps")
    ap.add_argument("--gpu-budget", help="gpu_memory_budget (pinned, disk)")
    ap.add_argument("--budget", help="memory_budget (disk: the host tier)")
    ap.add_argument("--runs", type=int, default=2, help="processes per measurement (median)")
    ap.add_argument("--warm", type=int, default=2048,
                    help="tokens of a first, untimed prompt that fills the expert tiers (0: none; the disk "
                         "setting measures from a cold start and takes none)")
    ap.add_argument("--cpu", action="store_true", help="also the CPU backend on the same model")
    ap.add_argument("--cpu-prompts", default="512", help="the CPU backend's prompt lengths (comma list)")
    ap.add_argument("--torch", action="store_true", help="also transformers eager (bf16) on the GPU")
    ap.add_argument("--dir", default=BENCH_DIR)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    path, header = model_path(args)
    ceil = ceilings()
    dense_b, expert_b = decode_bytes(header)
    prompts = [int(p) for p in args.prompts.split(",") if p]
    print(f"{ceil['gpu']}: HBM copy {ceil['hbm_gbps']:.0f} GB/s, pinned host->device {ceil['h2d_gbps']:.1f} GB/s; "
          f"model {path}: {model_bytes(header) / 1e9:.2f} GB, a decode token reads {dense_b / 1e6:.0f} MB dense + "
          f"{expert_b / 1e6:.0f} MB experts", flush=True)
    warm = 0 if args.setting == "disk" else args.warm
    spec = {"path": path, "vocab": header["config"]["vocab_size"], "prompts": prompts, "tokens": args.tokens,
            "context_length": max(prompts + [warm]) + args.tokens + 64, "backend": "cuda", "warm": warm}
    if args.setting != "hbm":
        spec["gpu_memory_budget"] = parse_size(args.gpu_budget)
    if args.setting == "disk":
        spec["memory_budget"] = parse_size(args.budget)
    disk_before = None
    if args.setting == "disk":  # the disk's ceiling before the runs too: its host side caches what they read
        drop_page_cache()
        disk_before = disk_read_gbps(path, header, seconds=3.0, seed=1)[0]
    runs = [run_child(spec, args.setting == "disk") for _ in range(args.runs)]
    dec = statistics.median(r["decode"] for r in runs)
    r0 = runs[0]
    line = f"cuda [{args.setting}]: decode {dec:.1f} tok/s (median of {len(runs)}: " + \
        ", ".join(f"{r['decode']:.1f}" for r in runs) + ")"
    for n in prompts:
        line += f"; prompt {n}: {statistics.median(r['prompt'][str(n)] for r in runs):.0f} tok/s"
    print(line)
    hbm_floor = (dense_b + expert_b) / (ceil["hbm_gbps"] * 1e9)
    if args.setting == "hbm":
        print(f"  HBM roofline {1 / hbm_floor:.0f} tok/s: {dec * hbm_floor:.2f} of it")
    else:
        lookups = r0["device_expert_hits"] + r0["device_expert_misses"]
        hit = r0["device_expert_hits"] / max(1, lookups)
        per_tok = r0["device_bytes_in"] / args.tokens
        floor = per_tok / (ceil["h2d_gbps"] * 1e9) + hbm_floor
        print(f"  VRAM tier: {r0['device_expert_slots']} slots, hit rate {hit:.3f}, {per_tok / 1e6:.0f} MB/token "
              f"copied in; PCIe roofline at that hit rate {1 / floor:.1f} tok/s: {dec * floor:.2f} of it")
        host = r0.get("device_host_experts", 0)
        if host:  # misses the host computed instead of copying: the roofline had they all crossed PCIe
            per_exp = r0["device_bytes_in"] / max(1, r0["device_expert_misses"])
            all_floor = (r0["device_bytes_in"] + host * per_exp) / args.tokens / (ceil["h2d_gbps"] * 1e9) + hbm_floor
            print(f"  host share: {host / args.tokens:.1f} experts/token computed on the host "
                  f"({host / (host + r0['device_expert_misses']):.2f} of the misses); PCIe roofline had every miss "
                  f"been copied {1 / all_floor:.1f} tok/s: {dec * all_floor:.2f} of it")
        if args.setting == "disk":
            host_hit = r0["expert_hits"] / max(1, r0["expert_hits"] + r0["expert_misses"])
            read = r0["bytes_read"] / args.tokens
            drop_page_cache()
            after = disk_read_gbps(path, header, seconds=3.0)[0]
            disk = max(disk_before, after)
            print(f"  host tier: hit rate {host_hit:.3f}, {read / 1e6:.0f} MB/token read from disk "
                  f"({read * dec / 1e9:.2f} GB/s); the disk's ceiling (8 random O_DIRECT blob reads in flight) "
                  f"{disk_before:.2f} GB/s before the runs, {after:.2f} after: at the higher, "
                  f"{disk * 1e9 / max(read, 1):.1f} tok/s, {dec * read / (disk * 1e9):.2f} of it"
                  + (" (above 1: the disk's host side cached what the runs reread)" if dec * read > disk * 1e9 else ""))
    if args.cpu:
        cpu_prompts = [int(p) for p in args.cpu_prompts.split(",") if p]
        cpu = run_child(dict(spec, backend="cpu", gpu_memory_budget=None, threads=os.cpu_count(), prompts=cpu_prompts,
                             tokens=min(args.tokens, 16)), args.setting == "disk")
        print(f"cpu backend ({os.cpu_count()} threads), same model: decode {cpu['decode']:.2f} tok/s"
              + "".join(f"; prompt {n}: {cpu['prompt'][str(n)]:.0f} tok/s" for n in cpu_prompts)
              + f" (cuda x{dec / cpu['decode']:.1f} decode)")
    if args.torch:
        try:
            tt = torch_eager(args.preset, args.layers, min(args.tokens, 32))
            print(f"transformers eager bf16, same config on this GPU: decode {tt:.1f} tok/s (flashmoe x{dec / tt:.1f})")
        except Exception as e:  # a transformers without this architecture, or out of memory: say so, go on
            print(f"transformers eager: failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
