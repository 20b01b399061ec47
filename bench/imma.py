"""CUDA's int8-activation prefill kernels: fm_mm's dp4a kernel (FLASHMOE_CUDA_IMMA=0) against the tensor-core
one (csrc/backend/cuda/matmul_mma.cu), GPU time per call from torch.profiler (CUPTI), and the outputs checked
bitwise equal (the tensor-core kernel's promise: fm_mm's bits for every row and token).

    python bench/imma.py [--q 4,8] [--gs 64] [--rows 2048,4096,8192] [--cols 2048] [--T 16,64,512,2048]
                         [--experts 512] [--H 2048] [--I 512] [--reps 5]

Matmul: op_matmul of a q4/q8 [rows, cols] matrix over T tokens; the time is the matmul kernel's alone (the
quantizer of x, the same for both, is left out: fm_quantize_x). --experts T: op_experts of the 35B's shapes
(H 2048, I 512) over a prompt of T tokens routed 8 of 256 at random (64 experts of a grouped call, about
T·8/256 tokens each, plus a shared expert of all T): gate·up and down together, the experts of fewer than 16
tokens staying on fm_mm in both runs. Each op call builds an instance of its own (weights uploaded): only the
kernels' GPU time is read. The experts' weights are not in VRAM there: op_experts keeps them in pinned host
memory and the kernels read them in place over PCIe (no VRAM slot without an expert's identity), so that case
checks bits and compares the two kernels' reads over that link, not their speed from HBM (a prompt's kernels
with every expert in VRAM: bench/cuda_profile.py --prompt N).
"""

from __future__ import annotations

import argparse
import collections
import os

import numpy as np

from flashmoe import _core
from flashmoe.quant import quantize


def weight(bits: int, rows: int, cols: int, gs: int, seed: int):
    rng = np.random.default_rng(seed)
    block = rng.standard_normal((min(rows, 2048), cols), dtype=np.float32) / np.float32(np.sqrt(cols))
    q, s, b = quantize(np.tile(block, (-(-rows // block.shape[0]), 1))[:rows], bits, gs)
    return (_core.Q4 if bits == 4 else _core.Q8, q, s.view(np.uint16), b.view(np.uint16), rows, cols, gs)


def timed(fn, reps: int, imma: bool):
    """fn's result and its kernels' GPU time per call (us), by kernel name, over reps calls after a warm-up"""
    import torch
    from torch.profiler import ProfilerActivity, profile

    os.environ["FLASHMOE_CUDA_IMMA"] = "1" if imma else "0"
    out = fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    us = collections.defaultdict(float)
    for e in prof.events():
        if "CUDA" in str(getattr(e, "device_type", "")) and ("fm_mm" in e.name or "fm_quantize" in e.name):
            us[e.name.split("<")[0].split("::")[-1].strip()] += e.time_range.elapsed_us() / reps
    return out, us


def kernels(us: dict) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in sorted(us.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--q", default="4,8")
    ap.add_argument("--gs", type=int, default=64)
    ap.add_argument("--rows", default="2048,4096,8192")
    ap.add_argument("--cols", default="2048")
    ap.add_argument("--T", default="16,64,512,2048")
    ap.add_argument("--experts", type=int, default=512, help="prompt tokens of the experts' case (0: none)")
    ap.add_argument("--H", type=int, default=2048, help="the experts' hidden size")
    ap.add_argument("--I", type=int, default=512, help="the experts' intermediate size")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    print("matmul: q, rows x cols, T: GPU us a call dp4a -> tensor cores (speedup); kernels")
    for bits in ints(args.q):
        for rows in ints(args.rows):
            for cols in ints(args.cols):
                w = weight(bits, rows, cols, args.gs, rows + cols)
                for T in ints(args.T):
                    x = np.random.default_rng(T).standard_normal((T, cols), dtype=np.float32)
                    call = lambda: _core.op_matmul(*w, x, True, backend="cuda")  # noqa: E731
                    a, ua = timed(call, args.reps, False)
                    b, ub = timed(call, args.reps, True)
                    same = np.array_equal(a.view(np.uint32), b.view(np.uint32))
                    ta = sum(v for k, v in ua.items() if "quantize" not in k)
                    tb = sum(v for k, v in ub.items() if "quantize" not in k)
                    print(f"q{bits} {rows}x{cols} T{T}: {ta:.1f} -> {tb:.1f} ({ta / max(tb, 1e-9):.2f}x) "
                          f"bitwise {'yes' if same else 'NO'}; {kernels(ua)} | {kernels(ub)}", flush=True)
    if args.experts:
        T, H, I = args.experts, args.H, args.I
        rng = np.random.default_rng(0)
        xn = rng.standard_normal((T, H), dtype=np.float32)
        choice = np.stack([rng.choice(256, 8, replace=False) for _ in range(T)])
        lists = [np.nonzero((choice == e).any(axis=1))[0].astype(np.int32) for e in range(64)]
        lists = [t for t in lists if len(t)] + [np.arange(T, dtype=np.int32)]  # + a shared expert
        for bits in ints(args.q):
            ex = [(weight(bits, I, H, args.gs, 3 * j), weight(bits, I, H, args.gs, 3 * j + 1),
                   weight(bits, H, I, args.gs, 3 * j + 2), tok) for j, tok in enumerate(lists)]
            call = lambda: _core.op_experts(xn, ex, int8_act=True, backend="cuda")  # noqa: E731
            a, ua = timed(call, args.reps, False)
            b, ub = timed(call, args.reps, True)
            same = np.array_equal(a.view(np.uint32), b.view(np.uint32))
            ta = sum(v for k, v in ua.items() if "quantize" not in k)
            tb = sum(v for k, v in ub.items() if "quantize" not in k)
            sizes = sorted(len(t) for t in lists)
            print(f"experts q{bits} T{T} ({len(lists)} experts, tokens {sizes[0]}..{sizes[-2]} and "
                  f"{sizes[-1]}): "
                  f"{ta:.1f} -> {tb:.1f} us ({ta / max(tb, 1e-9):.2f}x) bitwise {'yes' if same else 'NO'}; "
                  f"{kernels(ua)} | {kernels(ub)}", flush=True)


if __name__ == "__main__":
    main()
