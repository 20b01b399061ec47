"""Matmul kernels: effective GB/s of decode matvecs against DRAM bandwidth, GFLOP/s of prefill matmuls.

    python bench/kernels.py [--threads N] [--quick]

Every CPU kernel variant present (scalar, avx2, ...) is timed on the same weights in one run. Matvec
(one token), with fp32 activations and with int8 ones (csrc/backend/ops.h): weight bytes (data + scales + biases) / time, next to the DRAM read bandwidth measured in
the same run (numpy sum over 1 GiB: a streaming read), on weights of 64+ MB so they come from DRAM, not
cache; the DRAM reads use the same number of threads. Matmul (T tokens): 2·rows·cols·T / time. Prints a table and a JSON line; median of --repeats.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="smaller weights (numbers then include cache effects)")
    args = ap.parse_args()
    _core.set_threads(args.threads)
    rows = 8192 if args.quick else 65536
    isas = _core.cpu_isas()
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
    print(json.dumps(results))


if __name__ == "__main__":
    main()
