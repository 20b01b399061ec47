"""Matmul kernels of two or more builds side by side, in one process: speed of each build against the first.

    python bench/kernels_ab.py --pkg /tmp/bi-ab/old --pkg /tmp/bi-ab/new [--isa avx2 --isa avx512]
                               [--threads 2] [--samples 9]

Each --pkg is a directory holding a `flashmoe` package (pip install --target). A round starts one process
per build, which times every case once (a sample: a loop of calls of >= ~20 ms); the builds take turns
round by round (this machine's speed drifts from one minute to the next), and each case's median over the
rounds is compared. Shapes are those of qwen3.5-35b-a3b: the dense projections [4096, 2048], an expert's gate/up
[512, 2048] and down [2048, 512], at decode (T = 1) and prefill T, q4 and q8 with groups of 64, int8 and fp32
activations, bf16. Printed: per case the median ms of each build and its speed relative to the first
(time of the first / its time: > 1 is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402

from flashmoe.quant import f32_to_bf16, quantize  # noqa: E402  (input builders only)


def weight(core, dtype: str, rows: int, cols: int, gs: int = 64):
    w = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)
    if dtype == "bf16":
        return (core.BF16, f32_to_bf16(w), None, None, rows, cols, 0)
    bits = 4 if dtype == "q4" else 8
    q, s, b = quantize(w, bits, gs)
    return (core.Q4 if bits == 4 else core.Q8, q, s.view(np.uint16), b.view(np.uint16), rows, cols, gs)


def sample(fn) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= 0.02:
            return dt / n


CASES = [  # (dtype, rows, cols, T, int8)
    *[(d, 4096, 2048, T, i8) for d in ("q4", "q8") for i8 in (True, False) for T in (1, 4, 32, 128)],
    *[(d, r, c, T, i8) for d in ("q4",) for r, c in ((512, 2048), (2048, 512)) for i8 in (True, False)
      for T in (1, 2, 8, 20)],
    *[("bf16", 4096, 2048, T, False) for T in (1, 32)],
]


def child(isa: str, threads: int) -> None:
    from flashmoe import _core

    _core.set_threads(threads)
    _core.set_cpu_isa(isa)
    out = []
    for dtype, rows, cols, T, i8 in CASES:
        w = weight(_core, dtype, rows, cols)
        x = np.random.default_rng(1).standard_normal((T, cols), dtype=np.float32)
        out.append(sample(lambda: _core.op_matmul(*w, x, i8)))
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pkg", action="append", required=True)
    ap.add_argument("--isa", action="append", default=[])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.threads)
        return
    isas = args.isa or ["auto"]
    print(f"{args.threads} threads; builds: {', '.join(args.pkg)}")
    for isa in isas:
        times = [[[] for _ in CASES] for _ in args.pkg]
        for _ in range(args.rounds):
            for k, pkg in enumerate(args.pkg):
                env = dict(os.environ, PYTHONPATH=pkg)
                out = subprocess.run([sys.executable, __file__, "--child", isa, "--threads", str(args.threads),
                                      "--pkg", pkg], env=env, capture_output=True, text=True, check=True).stdout
                for i, t in enumerate(json.loads(out.splitlines()[-1])):
                    times[k][i].append(t)
        print(f"{'isa':>7} {'dtype':>5} {'shape':>10} {'T':>4} {'x':>5} "
              + " ".join(f"{'ms':>8} {'speed':>6}" for _ in args.pkg))
        for i, (dtype, rows, cols, T, i8) in enumerate(CASES):
            med = [statistics.median(times[k][i]) for k in range(len(args.pkg))]
            print(f"{isa:>7} {dtype:>5} {f'{rows}x{cols}':>10} {T:>4} {'int8' if i8 else 'fp32':>5} "
                  + " ".join(f"{m * 1e3:>8.3f} {med[0] / m:>6.3f}" for m in med), flush=True)


if __name__ == "__main__":
    main()
