"""Matmul kernels: effective GB/s of decode matvecs against DRAM bandwidth, GFLOP/s of prefill matmuls.

    python bench/kernels.py [--threads N] [--quick] [--scales-only]

Every CPU kernel variant present (scalar, avx2, ...) is timed on the same weights in one run. Matvec
(one token), with fp32 activations and with int8 ones (csrc/backend/cpu/cpu.h): weight bytes (data + scales + biases) / time, next to the DRAM read bandwidth measured in
the same run (numpy sum over 1 GiB: a streaming read), on weights of 64+ MB so they come from DRAM, not
cache; the DRAM reads use the same number of threads. Matmul (T tokens): 2·rows·cols·T / time. Prints a table and a JSON line; median of --repeats.

Scale dtypes (--scales-only runs just this): the decode matvec of q4/q8 matrices at the model's shapes
(expert gate/up [512, 2048], expert down [2048, 512], a [4096, 4096] projection), with fp16 scales and
biases against the same matrices with bf16 ones (MLX checkpoints), side by side: samples alternate
between the two, each sample a loop of calls of >= ~20 ms; medians, and the ratio of the bf16 time to
the fp16 one (1.00: bf16 scales cost nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # idle BLAS threads would spin on the cores we time
import numpy as np  # noqa: E402

from flashmoe import _core  # noqa: E402
from flashmoe.quant import f32_to_bf16, quantize  # noqa: E402

DTYPES = {"q4": (_core.Q4, 4), "q8": (_core.Q8, 8), "bf16": (_core.BF16, 16)}


def weight(dtype: str, rows: int, cols: int, gs: int = 64, seed: int = 0):
    """(args for op_matmul without x, bytes of weight data)."""
    rng = np.random.default_rng(seed)
    # Quantize 4096-row blocks of one random block: random enough, fast to build.
    block = rng.standard_normal((min(rows, 4096), cols), dtype=np.float32) / np.sqrt(cols)
    reps = -(-rows // block.shape[0])
    if dtype == "bf16":
        data = np.tile(f32_to_bf16(block), (reps, 1))[:rows]
        return (_core.BF16, data, None, None, rows, cols, 0), data.nbytes
    q, s, b = quantize(block, DTYPES[dtype][1], gs)
    q, s, b = (np.ascontiguousarray(np.tile(a, (reps, 1))[:rows]) for a in (q, s, b))
    return (DTYPES[dtype][0], q, s.view(np.uint16), b.view(np.uint16), rows, cols, gs), q.nbytes + s.nbytes + b.nbytes


def to_bf16_scales(w):
    """The q4/q8 weight tuple w with its fp16 scales and biases re-encoded as bf16 (the same q)."""
    s, b = (f32_to_bf16(a.view(np.float16).astype(np.float32)) for a in (w[2], w[3]))
    return w[:2] + (s, b) + w[4:]


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dram_read_gbps(threads: int, n_bytes: int = 1 << 30) -> float:
    """Streaming read bandwidth with as many threads as the kernels use (numpy releases the GIL in sum)."""
    import concurrent.futures as cf

    a = np.ones(n_bytes // 8, dtype=np.float64)
    parts = np.array_split(a, threads)
    with cf.ThreadPoolExecutor(threads) as pool:
        return n_bytes / timed(lambda: list(pool.map(np.sum, parts)), 5) / 1e9


def scale_dtypes(isas, repeats: int) -> list:
    """fp16 against bf16 scales, decode (T = 1): a row per (shape, dtype, x, kernel), medians in µs."""
    shapes = (("expert gate/up", 512, 2048), ("expert down", 2048, 512), ("projection", 4096, 4096))
    out = []
    print(f"\ndecode matvec, fp16 against bf16 scales and biases (group 64); µs a call, medians of {repeats} "
          f"alternating samples")
    print(f"{'shape':>22} {'dtype':>5} {'x':>5} {'kernel':>7} {'fp16 µs':>9} {'bf16 µs':>9} {'bf16/fp16':>9}")
    for label, rows, cols in shapes:
        x = np.random.default_rng(1).standard_normal((1, cols), dtype=np.float32)
        for dtype in ("q4", "q8"):
            w16, _ = weight(dtype, rows, cols)
            wb16 = to_bf16_scales(w16)
            for int8 in (False, True):
                for isa in isas:
                    _core.set_cpu_isa(isa)
                    # the keyword in both calls: passing one costs the binding ~1 µs (5% of a 20 µs call)
                    calls = {sb: lambda w=w, sb=sb, int8=int8, x=x: _core.op_matmul(*w, x, int8, scale_bf16=sb)
                             for sb, w in ((False, w16), (True, wb16))}
                    for f in calls.values():  # warm both
                        f()
                    t0 = time.perf_counter()
                    calls[False]()
                    n = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6)))  # calls a sample: >= ~20 ms
                    samples = {False: [], True: []}
                    for _ in range(repeats):
                        for sb, f in calls.items():
                            t0 = time.perf_counter()
                            for _ in range(n):
                                f()
                            samples[sb].append((time.perf_counter() - t0) / n)
                    us = {sb: statistics.median(v) * 1e6 for sb, v in samples.items()}
                    xs = "int8" if int8 else "fp32"
                    shape = f"{label} {rows}x{cols}"
                    print(f"{shape:>22} {dtype:>5} {xs:>5} {isa:>7} {us[False]:>9.1f} {us[True]:>9.1f} "
                          f"{us[True] / us[False]:>9.3f}")
                    out.append({"shape": [rows, cols], "dtype": dtype, "x": xs, "kernel": isa,
                                "fp16_us": round(us[False], 2), "bf16_us": round(us[True], 2),
                                "ratio": round(us[True] / us[False], 4)})
    _core.set_cpu_isa("auto")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="smaller weights (numbers then include cache effects)")
    ap.add_argument("--scales-only", action="store_true", help="only the fp16 against bf16 scales comparison")
    args = ap.parse_args()
    _core.set_threads(args.threads)
    rows = 8192 if args.quick else 65536
    isas = _core.cpu_isas()
    if args.scales_only:
        print(f"{_core.get_threads()} threads; kernels: {', '.join(isas)}")
        print(json.dumps({"threads": _core.get_threads(), "scales": scale_dtypes(isas, args.repeats)}))
        return
    dram = dram_read_gbps(_core.get_threads())
    results = {"threads": _core.get_threads(), "dram_read_gbps": round(dram, 2), "matvec": [], "matmul": []}

    print(f"DRAM read bandwidth {dram:.1f} GB/s; {_core.get_threads()} threads; kernels: {', '.join(isas)}")
    print(f"\nmatvec (decode), {rows} x 2048 weights; x in fp32, or int8 per weight group (the default)")
    print(f"{'dtype':>6} {'x':>5} {'kernel':>7} {'ms':>8} {'GB/s':>7} {'of DRAM':>8}")
    for dtype in DTYPES:
        w, nbytes = weight(dtype, rows, 2048)
        x = np.random.default_rng(1).standard_normal((1, 2048), dtype=np.float32)
        for int8 in (False, True) if dtype != "bf16" else (False,):
            for isa in isas:
                _core.set_cpu_isa(isa)
                sec = timed(lambda: _core.op_matmul(*w, x, int8), args.repeats)
                gbps = nbytes / sec / 1e9
                xs = "int8" if int8 else "fp32"
                print(f"{dtype:>6} {xs:>5} {isa:>7} {sec * 1e3:>8.2f} {gbps:>7.2f} {gbps / dram:>8.0%}")
                results["matvec"].append({"dtype": dtype, "x": xs, "kernel": isa, "ms": round(sec * 1e3, 3),
                                          "gbps": round(gbps, 2), "share_of_dram": round(gbps / dram, 3)})
    _core.set_cpu_isa("auto")

    print(f"\nmatmul (prefill), 4096 x 2048 weights; x in fp32, or int8 per weight group (the default)\n"
          f"{'dtype':>6} {'x':>5} {'kernel':>7} {'T':>4} {'ms':>8} {'GFLOP/s':>8}")
    for dtype in DTYPES:
        w, _ = weight(dtype, 4096, 2048)
        for T in (4, 32, 128):
            x = np.random.default_rng(2).standard_normal((T, 2048), dtype=np.float32)
            for int8 in (False, True) if dtype != "bf16" else (False,):
                for isa in isas:
                    _core.set_cpu_isa(isa)
                    sec = timed(lambda: _core.op_matmul(*w, x, int8), max(3, args.repeats // 2))
                    gflops = 2 * 4096 * 2048 * T / sec / 1e9
                    xs = "int8" if int8 else "fp32"
                    print(f"{dtype:>6} {xs:>5} {isa:>7} {T:>4} {sec * 1e3:>8.2f} {gflops:>8.1f}")
                    results["matmul"].append({"dtype": dtype, "x": xs, "kernel": isa, "T": T,
                                              "ms": round(sec * 1e3, 3), "gflops": round(gflops, 1)})
    _core.set_cpu_isa("auto")
    results["scales"] = scale_dtypes(isas, args.repeats)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
