"""Time per token of the C sampler at the Qwen3.5 vocabulary (248320) for common settings.

Logits: a realistic shape (a few strong candidates over a broad normal bulk) and a flat one (the worst
case for top_p: the boundary lies deep in the vocabulary). Each call goes through _core.Sampler.sample,
which copies the logits first; the copy alone is timed as "copy" and subtracted in "net".

    python bench/sampling.py
"""

import time

import numpy as np

from flashmoe import _core
from flashmoe.model import SamplingParams

V = 248320
SETTINGS = {
    "greedy": SamplingParams(temperature=0.0),
    "temperature 1": SamplingParams(),
    "temp 0.7 top_p 0.9": SamplingParams(temperature=0.7, top_p=0.9),
    "temp 0.6 top_k 20 top_p 0.95 (Qwen)": SamplingParams(temperature=0.6, top_k=20, top_p=0.95),
    "top_k 40": SamplingParams(top_k=40),
    "min_p 0.05": SamplingParams(min_p=0.05),
    "top_p 0.95 + penalties (500 seen)": SamplingParams(top_p=0.95, repetition_penalty=1.1, presence_penalty=0.5,
                                                        frequency_penalty=0.2),
}


def logits(kind, rng):
    if kind == "flat":
        return rng.normal(0, 1, V).astype(np.float32)
    x = rng.normal(0, 2.5, V).astype(np.float32)
    x[rng.choice(V, 50, replace=False)] += rng.uniform(8, 18, 50).astype(np.float32)
    return x


def timeit(fn, n):
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main():
    rng = np.random.default_rng(0)
    seen = rng.integers(0, V, 500).astype(np.int32)
    print(f"vocab {V}; microseconds per sample (net = minus the logits copy)")
    for kind in ("realistic", "flat"):
        x = logits(kind, rng)
        copy = timeit(lambda: _core.Sampler({"temperature": 0.0}, 16).apply_penalties(np.zeros(16, np.float32)), 1)
        s0 = _core.Sampler({"temperature": 0.0}, V)
        copy = timeit(lambda: s0.apply_penalties(x), 200)
        print(f"\n{kind} logits (copy {copy * 1e6:.0f} us)")
        for name, p in SETTINGS.items():
            s = _core.Sampler(p.core_params(), V)
            s.accept(seen)
            t = timeit(lambda: s.sample(x), 200)
            print(f"  {name:40s} {t * 1e6:7.0f} us   net {max(0.0, t - copy) * 1e6:7.0f} us")


if __name__ == "__main__":
    main()
