"""The router of an MLX import: kept as MLX's 8-bit groups, or dequantized to float32?

    python bench/router.py [--repeats N]

mlx-lm quantizes each MoE layer's router (`mlp.gate`, [num_experts, hidden]) at 8 bits inside 4-bit models.
The packed format can keep it q8 (what the import does) or store it dequantized in f32 (exact too). This
times one layer's router matvec (decode, T = 1) and matmul (a 128-token prompt chunk) both ways at the real
shapes, with fp32 activations (the router never takes int8 ones), on every CPU kernel variant; the same
weights, interleaved in one run. Prints a table and a JSON line; medians of --repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402

from flashmoe import _core  # noqa: E402
from flashmoe.quant import dequantize, quantize  # noqa: E402

SHAPES = {"qwen3.5-397b-a17b": (512, 4096), "qwen3.5-122b-a10b": (256, 3072), "qwen3.5-35b-a3b": (256, 2048)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=201)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    out = []
    print(f"{'model':>18} {'T':>4} {'kernel':>7} {'q8 us':>8} {'f32 us':>8} {'f32/q8':>7}")
    for model, (rows, cols) in SHAPES.items():
        w = rng.standard_normal((rows, cols), dtype=np.float32) * (1.5 / np.sqrt(cols))
        q, s, b = quantize(w, 8, 64)
        wf = dequantize(q, s, b, 8, 64, (rows, cols))
        q8 = (_core.Q8, q, s.view(np.uint16), b.view(np.uint16), rows, cols, 64)
        f32 = (_core.F32, np.ascontiguousarray(wf), None, None, rows, cols, 0)
        for T in (1, 128):
            x = rng.standard_normal((T, cols), dtype=np.float32)
            for isa in _core.cpu_isas():
                _core.set_cpu_isa(isa)
                times = {"q8": [], "f32": []}
                for _ in range(args.repeats):  # interleaved: drift hits both alike
                    for name, arg in (("q8", q8), ("f32", f32)):
                        t0 = time.perf_counter()
                        _core.op_matmul(*arg, x, False)
                        times[name].append(time.perf_counter() - t0)
                m = {k: statistics.median(v) * 1e6 for k, v in times.items()}
                print(f"{model:>18} {T:>4} {isa:>7} {m['q8']:>8.1f} {m['f32']:>8.1f} {m['f32'] / m['q8']:>7.2f}")
                out.append({"model": model, "T": T, "kernel": isa, "q8_us": round(m["q8"], 1),
                            "f32_us": round(m["f32"], 1)})
    _core.set_cpu_isa("auto")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
