"""The gated delta rule, recurrent form against chunked form, at one layer's shape.

    python bench/gated_delta.py [--Hk 16 --Hv 32 --dk 128 --dv 128] [--chunk 16] [--threads N] [--reps 5]

Times `_core.op_gated_delta` (recurrent, one token at a time, one thread) and
`_core.op_gated_delta_chunk` (chunked WY form, value heads over the pool; with 1 thread and with
--threads) for T tokens of one layer, T in 1..512. The default shape is Qwen3.5-35B-A3B's DeltaNet
(16 key heads, 32 value heads, dk = dv = 128), in chunks of 16 as fm_block_deltanet runs it. Each
number is the median of --reps calls minus the binding's own cost (copying the [Hv, dk, dv] state in
and out), measured as a T = 0 call. Prints a table and a JSON line. The 2-thread column needs the
second core idle (another busy process makes it read like the 1-thread one).

    python bench/gated_delta.py --backend cuda [--Hv 64] [--reps 5]   (a CUDA build on a GPU; needs torch)

The CUDA backend's two forms instead: the GPU time of the gated delta rule's kernels (gd_*: the CUDA event
times CUPTI records, through torch.profiler, as bench/cuda_profile.py does) for one `op_gated_delta_auto`
call of T tokens from position 0, chunked (the default) and recurrent (FLASHMOE_CUDA_GD_CHUNKED=0), without
the binding's copies in and out. Medians of --reps calls after a warm one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

from flashmoe import _core


def inputs(rng, T, Hk, Hv, dk, dv):
    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    f = np.float32
    q = (unit(rng.standard_normal((T, Hk, dk))) / np.sqrt(dk)).astype(f)
    k = unit(rng.standard_normal((T, Hk, dk))).astype(f)
    v = rng.standard_normal((T, Hv, dv)).astype(f)
    g = -rng.uniform(0.0, 2.0, (T, Hv)).astype(f)
    beta = rng.uniform(0.0, 1.0, (T, Hv)).astype(f)
    S = (0.5 * rng.standard_normal((Hv, dk, dv))).astype(f)
    return q, k, v, g, beta, S


def median_ms(fn, reps):
    fn()  # warm: pool threads, scratch buffers, caches
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def cuda_kernels_ms(x, reps, chunked):
    """Median GPU time (ms) of the gd_* kernels of one op_gated_delta_auto call on backend cuda."""
    from torch.profiler import ProfilerActivity, profile

    os.environ["FLASHMOE_CUDA_GD_CHUNKED"] = "1" if chunked else "0"
    _core.op_gated_delta_auto(*x, backend="cuda")  # warm: the scratch grown, the kernels loaded
    ts = []
    for _ in range(reps):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _core.op_gated_delta_auto(*x, backend="cuda")
        ts.append(sum(e.time_range.elapsed_us() for e in prof.events()
                      if "gd_" in e.name and "CUDA" in str(getattr(e, "device_type", ""))) / 1e3)
    return statistics.median(ts)


def main_cuda(a):
    import torch

    torch.cuda.init()
    rng = np.random.default_rng(0)
    shape = (a.Hk, a.Hv, a.dk, a.dv)
    rows = []
    for T in a.T:
        x = inputs(rng, T, *shape)
        rec = cuda_kernels_ms(x, a.reps, False)
        ch = cuda_kernels_ms(x, a.reps, True)
        rows.append({"T": T, "recurrent_ms": round(rec, 4), "chunked_ms": round(ch, 4)})
    os.environ.pop("FLASHMOE_CUDA_GD_CHUNKED", None)
    print(f"# cuda: Hk={a.Hk} Hv={a.Hv} dk={a.dk} dv={a.dv}, chunks of 16; {torch.cuda.get_device_name()}; "
          "GPU time of the gd_* kernels")
    print("| T | recurrent ms | chunked ms | speedup | chunked µs/token |")
    print("|---|---|---|---|---|")
    for r in rows:
        rec, ch = r["recurrent_ms"], r["chunked_ms"]
        print(f"| {r['T']} | {rec:.4f} | {ch:.4f} | {rec / ch:.2f}× | {1e3 * ch / r['T']:.2f} |")
    print(json.dumps({"backend": "cuda", "device": torch.cuda.get_device_name(),
                      "shape": dict(zip(("Hk", "Hv", "dk", "dv"), shape)), "rows": rows}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--Hk", type=int, default=16)
    ap.add_argument("--Hv", type=int, default=32)
    ap.add_argument("--dk", type=int, default=128)
    ap.add_argument("--dv", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--T", type=int, nargs="*")
    a = ap.parse_args()
    if a.backend == "cuda":
        a.T = a.T or [1, 2, 16, 64, 128, 512, 2048, 8192]
        return main_cuda(a)
    a.T = a.T or [1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512]
    rng = np.random.default_rng(0)
    shape = (a.Hk, a.Hv, a.dk, a.dv)

    _core.set_threads(1)
    x0 = inputs(rng, 0, *shape)
    overhead = median_ms(lambda: _core.op_gated_delta(*x0), 3 * a.reps)

    rows = []
    for T in a.T:
        x = inputs(rng, T, *shape)
        _core.set_threads(1)
        rec = median_ms(lambda: _core.op_gated_delta(*x), a.reps) - overhead
        ch1 = median_ms(lambda: _core.op_gated_delta_chunk(*x, a.chunk), a.reps) - overhead
        _core.set_threads(a.threads)
        chn = median_ms(lambda: _core.op_gated_delta_chunk(*x, a.chunk), a.reps) - overhead
        rows.append({"T": T, "recurrent_ms": round(rec, 3), "chunk_1t_ms": round(ch1, 3),
                     f"chunk_{a.threads}t_ms": round(chn, 3)})

    print(f"# Hk={a.Hk} Hv={a.Hv} dk={a.dk} dv={a.dv} chunk={a.chunk}; {platform.machine()}, "
          f"{os.cpu_count()} CPUs; binding overhead {overhead:.3f} ms subtracted")
    print(f"| T | recurrent ms (1 thread) | chunk ms (1 thread) | speedup | chunk ms ({a.threads} threads) | speedup |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rec, ch1, chn = r["recurrent_ms"], r["chunk_1t_ms"], r[f"chunk_{a.threads}t_ms"]
        print(f"| {r['T']} | {rec:.3f} | {ch1:.3f} | {rec / ch1:.2f}× | {chn:.3f} | {rec / chn:.2f}× |")
    print(json.dumps({"shape": dict(zip(("Hk", "Hv", "dk", "dv"), shape)), "chunk": a.chunk,
                      "threads": a.threads, "overhead_ms": round(overhead, 3), "rows": rows}))


if __name__ == "__main__":
    main()
