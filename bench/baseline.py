"""Baseline prompt and decode speed of the CPU engine on synthetic models, everything in RAM.

    python bench/baseline.py [--preset demo|35b-shape] [--tokens 32] [--threads N]

Presets: `demo` is the model `flashmoe demo` writes; `35b-shape` has the real per-layer shape of
Qwen3.5-35B-A3B (hidden 2048, 256 experts with 8 active, expert ffn 512, vocab 248320) truncated to
4 layers (3 DeltaNet + 1 attention). The model is written once under --dir and reused.

Prints a table and a JSON line: prompt and decode tokens/s, and the weight bytes each decode step
touches (dense + active experts + lm_head) divided by the step time, next to the machine's DRAM read
bandwidth measured in the same run (numpy sum over a 1 GiB array): the ceiling a memory-bound decode
step can reach.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

import flashmoe
from flashmoe.synth import DEMO_CONFIG, write_random_model

PRESETS = {
    "demo": DEMO_CONFIG,
    "35b-shape": {
        **DEMO_CONFIG,
        "vocab_size": 248320, "hidden_size": 2048, "num_hidden_layers": 4,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"],
        "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
        "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
        "linear_value_head_dim": 128, "num_experts": 256, "num_experts_per_tok": 8,
        "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
    },
}


def dram_read_gbps(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    a = np.ones(n_bytes // 8, dtype=np.float64)
    a.sum()
    best = min(_timed(a.sum) for _ in range(repeats))
    return n_bytes / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bytes_per_decode_step(header) -> int:
    """Weight bytes one decode token reads: all dense tensors except the embedding (one row), plus
    num_experts_per_tok expert blobs per MoE layer."""
    dense = header["dense"]["tensors"]
    total = 0
    for name, t in dense.items():
        if name == "embed_tokens.weight":
            continue
        total += t["nbytes"]
        if "group_size" in t:  # scales and biases, fp16 each
            total += 2 * 2 * t["shape"][0] * (t["shape"][1] // t["group_size"])
    cfg = header["config"]
    total += len(header["experts"]["layers"]) * cfg["num_experts_per_tok"] * header["experts"]["blob_size"]
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "flashmoe-bench"))
    args = ap.parse_args()

    path = os.path.join(args.dir, f"{args.preset}-{args.bits}bit")
    if not os.path.exists(os.path.join(path, "flashmoe.json")):
        print(f"writing {path} ...", flush=True)
        write_random_model(path, PRESETS[args.preset], bits=args.bits, progress=False)
    model = flashmoe.load(path)
    cfg = model.config
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], args.prompt)
    model.generate_tokens(ids[:8], max_tokens=4, stop_token_ids=[])  # warm: experts resident, pages touched

    prompt_tps, decode_tps = [], []
    for r in range(args.runs):
        out = model.generate_tokens(ids, max_tokens=args.tokens, stop_token_ids=[])
        s = model.stats
        prompt_tps.append(s["last_prompt_tokens"] / s["last_prompt_seconds"])
        decode_tps.append((len(out) - 1) / s["last_decode_seconds"])
    dram = dram_read_gbps()
    step_bytes = bytes_per_decode_step(model.header)
    dec = statistics.median(decode_tps)
    result = {
        "preset": args.preset, "bits": args.bits, "prompt_tokens": args.prompt, "decode_tokens": args.tokens,
        "prompt_tok_s": round(statistics.median(prompt_tps), 2), "decode_tok_s": round(dec, 2),
        "bytes_per_decode_step": step_bytes, "decode_weight_gbps": round(dec * step_bytes / 1e9, 2),
        "dram_read_gbps": round(dram, 2), "machine": f"{platform.machine()} {os.cpu_count()} cores",
    }
    print(f"{'preset':>10} {'prompt tok/s':>13} {'decode tok/s':>13} {'MB/step':>8} {'weights GB/s':>13} {'DRAM GB/s':>10}")
    print(f"{args.preset:>10} {result['prompt_tok_s']:>13.1f} {dec:>13.2f} {step_bytes / 1e6:>8.1f} "
          f"{result['decode_weight_gbps']:>13.2f} {dram:>10.1f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
