"""llama.cpp built with CUDA on the same models as bench/cuda.py (issue 20, item 5): the peer a user with an NVIDIA
GPU would pick, in its two usual settings.

    python bench/cuda_llamacpp.py --prepare [--preset P] [--layers N]      # the packed model and its Q4_0 GGUF
    python bench/cuda_llamacpp.py --llama-bench BIN [--preset P] [--layers N] [--prompts 512,2048] [--tokens 64]

The model is bench/decode.py's (model_path: the random model of the preset's real per-layer shapes, 4 bits, the
same directory bench/cuda.py reads), exported by bench/gguf_export.py as GGUF Q4_0: 4.5 bits per weight, the bytes
per weight of flashmoe's 4-bit, re-quantized from the packed model's weights (routers, norms, conv and gates F32).

llama.cpp runs as `llama-bench` (its own benchmark: prompt tok/s over random ids in one batch, then decode tok/s
of --tokens steps from an empty cache; flash attention on; --reps repetitions, mean and deviation as it reports
them) in two settings:
  gpu       every tensor on the GPU (-ngl 99): bench/cuda.py's hbm setting.
  exps=CPU  the experts in host RAM, computed by the CPU (-ot exps=CPU, all cores): the usual way to fit a big
            MoE on a small GPU; the counterpart of bench/cuda.py's pinned setting.
The llama-bench binary: llama.cpp as vendored by llama-cpp-python's sdist, built with
-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 (bench/cuda_device.sh llama-build does it on the lent machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import BENCH_DIR, model_path  # noqa: E402  (bench/decode.py)

SETTINGS = {"gpu": ["-ngl", "99"], "exps=CPU": ["-ngl", "99", "-ot", "exps=CPU"]}


def gguf_path(packed: str) -> str:
    return packed.removesuffix("-4bit") + "-q4_0.gguf"


def prepare(args) -> str:
    packed, _ = model_path(args)
    out = gguf_path(packed)
    if not os.path.exists(out):
        from gguf_export import export  # needs the gguf package: only to write one

        t = time.perf_counter()
        r = export(packed, out + ".part", "q4_0", progress=False)
        os.rename(out + ".part", out)
        print(f"{out}: {r['bytes'] / 1e9:.2f} GB, {time.perf_counter() - t:.0f} s", flush=True)
    return out


def llama_bench(args, gguf: str, setting: str) -> list[dict]:
    cmd = [args.llama_bench, "-m", gguf, *SETTINGS[setting], "-fa", "1", "-p", args.prompts, "-n",
           str(args.tokens), "-r", str(args.reps), "-t", str(os.cpu_count()), "-o", "json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3.5-35b-a3b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dir", default=BENCH_DIR)
    ap.add_argument("--prepare", action="store_true", help="write the model and its GGUF, then stop")
    ap.add_argument("--llama-bench", help="the llama-bench binary")
    ap.add_argument("--settings", default="gpu,exps=CPU", help="comma list of " + ", ".join(SETTINGS))
    ap.add_argument("--prompts", default="512,2048")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    gguf = prepare(args)
    if args.prepare:
        return
    if not args.llama_bench:
        sys.exit("--llama-bench BIN: the llama-bench binary to run")
    for setting in args.settings.split(","):
        for r in llama_bench(args, gguf, setting):
            what = f"prompt {r['n_prompt']}" if r["n_prompt"] else f"decode {r['n_gen']}"
            print(f"llama.cpp [{setting}] {os.path.basename(gguf)}: {what}: {r['avg_ts']:.1f} ± {r['stddev_ts']:.1f} "
                  f"tok/s ({r['backends']}, {r['n_threads']} threads)", flush=True)


if __name__ == "__main__":
    main()
